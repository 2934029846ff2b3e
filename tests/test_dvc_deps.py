"""dvc.yaml lists every in-project module each stage runs: the import closure, derived from the code.

A stage runs `easel <stage>`: components/cli.py (its module-level imports) and the imports of its
`cmd_<stage>` function, then, transitively, every module those import, at module level or inside
a function (over-approximate on purpose: a module a stage may import is code the stage depends on).
DVC reruns a stage when a dependency changes, so a missing module means a stage that silently
keeps results made by old code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import REPO

PACKAGE = "components"


def module_file(name: str, root: Path = REPO) -> Path | None:
    """components.a.b -> components/a/b.py or components/a/b/__init__.py (None: not a project module)."""
    base = root / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_names(node: ast.AST) -> set[str]:
    """The project modules an AST imports (`from components.a import b` may name module a.b)."""
    found: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Import):
            found |= {alias.name for alias in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module)
            found |= {f"{n.module}.{alias.name}" for alias in n.names}
    return {name for name in found if name.split(".")[0] == PACKAGE and module_file(name)}


def with_packages(name: str) -> set[str]:
    """Importing components.a.b runs components/__init__ and components/a/__init__ too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def closure(roots: set[str], seen: set[str] | None = None) -> set[Path]:
    """Every project module `roots` import, transitively; modules already in `seen` are not walked."""
    seen = set(seen or ())
    todo = [m for root in roots for m in with_packages(root)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse(module_file(name).read_text())
        todo += [m for imported in imported_names(tree) for m in with_packages(imported)]
    return {module_file(name).relative_to(REPO) for name in seen}


def stage_closure(stage: str) -> set[Path]:
    cli = ast.parse((REPO / "components/cli.py").read_text())
    module_level = {
        n for stmt in cli.body if isinstance(stmt, ast.Import | ast.ImportFrom) for n in imported_names(stmt)
    }
    command = next(f for f in cli.body if isinstance(f, ast.FunctionDef) and f.name == f"cmd_{stage}")
    loader = next(f for f in cli.body if isinstance(f, ast.FunctionDef) and f.name == "_load")  # every cmd loads params
    # cli.py is walked only where this stage goes: its module level, `_load` and `cmd_<stage>`.
    roots = module_level | imported_names(command) | imported_names(loader)
    return closure(roots, seen={"components.cli"}) | {Path("components/cli.py")}


def code_deps(stage: str) -> list[Path]:
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    return [Path(d) for d in spec["deps"] if str(d).startswith(PACKAGE)]


def covered(module: Path, deps: list[Path]) -> bool:
    return any(module == d or d in module.parents for d in deps)


def test_every_module_a_stage_imports_is_a_dependency_of_it():
    missing = {}
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]:
        deps = code_deps(stage)
        lacking = sorted(str(m) for m in stage_closure(stage) if not covered(m, deps))
        if lacking:
            missing[stage] = lacking
    assert missing == {}, f"dvc.yaml misses these code dependencies: {missing}"


def test_no_stage_depends_on_code_it_does_not_import():
    """The other direction: a dependency no import reaches reruns a stage for nothing."""
    extra = {}
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]:
        modules = stage_closure(stage)
        unused = [str(d) for d in code_deps(stage) if not any(covered(m, [d]) for m in modules)]
        if unused:
            extra[stage] = unused
    assert extra == {}, f"dvc.yaml lists code these stages never import: {extra}"


def test_the_closure_follows_imports_inside_functions():
    # cmd_evaluate imports components.evaluate lazily; the scorer is imported inside the stage module.
    modules = stage_closure("evaluate")
    assert Path("components/scoring.py") in modules and Path("components/cli.py") in modules
    assert Path("components/train/loop.py") not in modules  # not imported by evaluate at all


def test_every_tracked_param_exists_in_every_profile():
    """DVC refuses to run a stage whose tracked param is missing: switching profile must not break it."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    missing = []
    for stage, spec in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        for key in spec.get("params", []):
            names = list(params["profiles"]) if key.startswith("profiles.${profile}.") else [None]
            for profile in names:
                path = key.replace("${profile}", profile) if profile else key
                data = params
                for part in path.split("."):
                    data = data.get(part, KeyError) if isinstance(data, dict) else KeyError
                if data is KeyError:
                    missing.append(f"{stage}: {path}")
    assert missing == []


def stages_importing(module: str) -> set[str]:
    """The stages whose closure holds `module` (what DVC must rerun when it changes)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    return {stage for stage in stages if Path(module) in stage_closure(stage)}


def test_bytecode_is_not_code_to_dvc(tmp_path, s3_server, tiny_models):
    """Python writes __pycache__ beside the modules a stage imports (the default everywhere but on the
    dev machines): DVC must not take it for a code change, or every stage reruns and the PR gate
    retrains for a pull request that changes nothing."""
    import os
    import pkgutil
    import subprocess
    import sys

    from tests.conftest import make_project

    project = make_project(tmp_path / "project", "http://127.0.0.1:9", s3_server, tiny_models)
    # Each stage's outputs as placeholders: `dvc commit` records the stages without running them
    # (what matters here is how DVC hashes their code dependencies).
    for folder in ("data/download", "data/validate", "data/caption", "data/train", "data/evaluate", "data/promote"):
        (project / folder).mkdir(parents=True, exist_ok=True)
        (project / folder / "placeholder.txt").write_text(folder)
    for name in ("data/validate/accepted.parquet", "data/caption/captions.parquet", "data/leaderboard.csv"):
        (project / name).write_text("placeholder")
    for stage in ("download", "validate", "caption", "train", "evaluate"):
        (project / "data/metrics").mkdir(parents=True, exist_ok=True)
        (project / f"data/metrics/{stage}.json").write_text("{}")
    (project / "data/plots/train/plots/metrics").mkdir(parents=True)
    (project / "data/plots/evaluate").mkdir(parents=True)
    (project / "data/plots/evaluate/scores.csv").write_text("clip_score,aesthetic_score\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dvc = [sys.executable, "-m", "dvc"]

    def run(args: list[str]) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
        return proc

    run([*dvc, "commit", "--force", "--quiet"])
    lock_before = (project / "dvc.lock").read_text()
    assert "components/cli.py" in lock_before
    # Every stage's code imported the way a stage imports it, with bytecode writing on.
    modules = sorted(m.name for m in pkgutil.walk_packages([str(REPO / "components")], prefix="components."))
    run([sys.executable, "-c", "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)])
    written = list((project / "components").rglob("*.pyc"))
    assert len(written) > 20, "the imports wrote no bytecode: the test would prove nothing"
    status = run([*dvc, "status", "--quiet"])
    assert status.stdout.strip() == "", status.stdout
    run([*dvc, "commit", "--force", "--quiet"])
    assert (project / "dvc.lock").read_text() == lock_before
