#!/usr/bin/env bash
# Regenerate infra/requirements.lock from pyproject.toml's pinned direct dependencies.
# Resolves in a scratch venv (pip may take a few minutes), then freezes the full set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRATCH="$(mktemp -d)"
trap 'rm -rf "$SCRATCH"' EXIT
python3.11 -m venv "$SCRATCH/venv"
deps="$("$SCRATCH/venv/bin/python" - "$ROOT/pyproject.toml" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["dev"]))
PY
)"
# shellcheck disable=SC2086
"$SCRATCH/venv/bin/pip" install --quiet $(echo "$deps" | sed 's/ *#.*//' | tr '\n' ' ')
{
  echo "# Full pinned dependency set for Easel (Python 3.11, x86_64). Regenerate with: infra/lock.sh"
  "$SCRATCH/venv/bin/pip" freeze | sort -f
} > "$ROOT/infra/requirements.lock"
echo "wrote infra/requirements.lock"
