"""Share the tunings measured on this machine.

    python -m tritondeconv.tunings export OUT.json                  # the current CUDA GPU
    python -m tritondeconv.tunings export --gpu "NVIDIA H100 80GB HBM3" OUT.json

``export`` writes this machine's tuning cache of a GPU model (as ``torch.cuda``
names it) and of the installed Triton version to ``OUT.json``, in the format of the
tunings the package ships, merged over the entries ``OUT.json`` holds already (this
machine's win).  Added to the package's ``kernels/tunings/`` under the name it prints,
the file answers other users' first calls on that GPU and Triton version without
tuning (see ``tritondeconv.kernels.tuning`` and ``docs/tunings.md``).  Exit status: 0
when written, 1 when the cache holds nothing to export, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

from .kernels import tuning


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tritondeconv.tunings", description=__doc__.splitlines()[0])
    commands = ap.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write this machine's tuning cache of a GPU model to a file")
    export.add_argument("--gpu", metavar="NAME", help="the GPU model's name (default: the current CUDA device's)")
    export.add_argument("out", type=Path, metavar="OUT.json", help="the file to write (merged over its entries)")
    a = ap.parse_args(argv)
    gpu = a.gpu
    if gpu is None:
        if not torch.cuda.is_available():
            export.error("no CUDA GPU here: name the GPU model with --gpu")
        gpu = torch.cuda.get_device_name()
    cache = tuning.cache_path(gpu)
    try:
        count = tuning.export(gpu, a.out)
    except OSError as error:
        export.error(f"cannot write {a.out}: {error.strerror or error}")
    if not count:
        print(f"tritondeconv: no tunings of {gpu} with Triton {triton.__version__} in {cache}: "
              "nothing exported", file=sys.stderr)
        return 1
    print(f"wrote {count} tunings of {gpu} from {cache} to {a.out}; "
          f"to ship them: kernels/tunings/{tuning.cache_name(gpu)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
