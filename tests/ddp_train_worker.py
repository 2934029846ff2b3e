"""One process of a multi-process training run, for tests/test_train_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.ddp_train_worker SPEC.json

SPEC holds `train` (TrainParams fields), `models` (ModelsParams fields), `captions` (a caption
stage folder), `plots` (the dvclive folder) and optionally `ema_record`: a folder where each
process that builds an EMA of the U-Net leaves a file named by its rank. accelerate reads the process group from the
environment torchrun sets; ACCELERATE_USE_CPU=true makes it a gloo group on the CPU.
"""

import json
import os
import sys
from pathlib import Path

from components.config import ModelsParams, TrainParams
from components.train import loop, run_train


def record_ema_builds(folder: Path) -> None:
    """Note which processes build an EMA (the trainer's own class, wrapped)."""

    class RecordedEMA(loop.EMA):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank-{os.environ['RANK']}").write_text(str(sum(t.numel() for t in self.shadow)))

    loop.EMA = RecordedEMA


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    if spec.get("ema_record"):
        record_ema_builds(Path(spec["ema_record"]))
    run_train(
        TrainParams(**spec["train"]),
        ModelsParams(**spec["models"]),
        Path(spec["captions"]),
        plots_dir=Path(spec["plots"]),
        progress=False,
    )
