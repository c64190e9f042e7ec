"""Headless pretraining entry point.

    python pretrain.py -- --config configs/pretrain_cpu_small.toml --training.steps 500
    torchrun --nproc_per_node 4 pretrain.py -- --config configs/pretrain_gpu.toml
    Slicer --no-main-window --python-script pretrain.py -- --config configs/pretrain_cpu_small.toml

Arguments after ``--`` are those of ``diffusionseg pretrain``. The script exits itself with the status code
(0 done, 2 bad input), as Slicer's ``--python-script`` requires.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the library beside this script (Slicer, plain python)

from DiffusionSegLib.cli import main  # noqa: E402


def _arguments(argv: list[str]) -> list[str]:
    return argv[argv.index("--") + 1 :] if "--" in argv else argv


if __name__ == "__main__":
    sys.exit(main(["pretrain", *_arguments(sys.argv[1:])]))
