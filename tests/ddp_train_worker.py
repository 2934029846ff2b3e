"""One process of a multi-process training run, for tests/test_train_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.ddp_train_worker SPEC.json

SPEC holds `train` (TrainParams fields), `models` (ModelsParams fields), `captions` (a caption
stage folder) and `plots` (the dvclive folder). accelerate reads the process group from the
environment torchrun sets; ACCELERATE_USE_CPU=true makes it a gloo group on the CPU.
"""

import json
import sys
from pathlib import Path

from components.config import ModelsParams, TrainParams
from components.train import run_train

if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_train(
        TrainParams(**spec["train"]),
        ModelsParams(**spec["models"]),
        Path(spec["captions"]),
        plots_dir=Path(spec["plots"]),
        progress=False,
    )
