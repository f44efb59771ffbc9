"""A Triton cache of the GPU run's first kernels, compiled on this machine for an H100
(sm_90) by Triton's own JIT, packed small enough to travel to the GPU machine with the
working tree (the device tool carries ignored paths, 64 MiB in all).

    python perf/triton_cache.py build                 # -> perf/triton-cache-sm90.tar.gz
    python perf/triton_cache.py build --stages nd --cells HiFi --out X.tar.gz
    python3 perf/triton_cache.py unpack [ARCHIVE [DIR]]  # on the GPU (gpu_check.sh does it)

Build it with the GPU's Triton (3.6.0): Triton's cache key holds its version, the
compiler's own hash and ptxas's version, so a cache from another Triton is never hit.
The compiler's hash covers the binary ``libtriton``, which differs between the wheels
for each Python version: on another Python than the GPU's (3.12), pass the GPU's wheel
(``--gpu-wheel``, from ``pip download triton==3.6.0 --no-deps --only-binary=:all:
--python-version 3.12 --platform manylinux_2_28_x86_64``) and the keys are computed with
its ``libtriton`` (the code it generates is the same; only the hash differs).  A cache
keyed for this machine's own wheel was never hit on the GPU (0 of 113 kernels, Python
3.11 here, 3.12 there).
``build`` compiles every launch the stages' first calls time (``perf/candidates.py``)
with the JIT answering as an H100 (``common.hopper_jit``), so each cache entry sits
under the key a GPU's first launch looks up, and keeps of each only what a launch
loads (the cubin and the metadata; the intermediate IRs are 6 times larger).  Triton's
cache records its files by absolute path: ``unpack`` rewrites those paths for ``DIR``
(default: Triton's own cache, where the JIT looks).  The smoke stage of ``gpu_check.sh``
reports how many of a stage's kernels it found there.
"""
from __future__ import annotations

import common  # noqa: I001 (first: the compiler's kernels must be defined before tritondeconv is imported)

common.use_compiler()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402
from unittest import mock  # noqa: E402

import candidates  # noqa: E402
import triton  # noqa: E402
import triton.runtime.cache  # noqa: E402

GPU_TRITON = "3.6.0"
GPU_PYTHON = "3.12"
ARCHIVE = Path(__file__).parent / "triton-cache-sm90.tar.gz"
KEPT = (".cubin", ".json")  # what a cache hit loads: the binary, the metadata and the file list
MANIFEST = "tritondeconv-carried.json"  # what was built, at the cache's top


def libtriton_hash(wheel: Path | None = None) -> str:
    """The hash Triton's cache key takes of its binary ``libtriton``: this installation's,
    or the one inside ``wheel``."""
    digest = hashlib.sha256()
    if wheel is None:
        with open(Path(triton.__file__).parent / "_C" / "libtriton.so", "rb") as f:
            digest.update(f.read())
    else:
        with zipfile.ZipFile(wheel) as z:
            digest.update(z.read("triton/_C/libtriton.so"))
    return digest.hexdigest()


@contextlib.contextmanager
def keyed_for(wheel: Path | None):
    """While inside, Triton's cache keys are those of the Triton in ``wheel`` (the same
    version built for another Python: only ``libtriton``'s hash differs); ``None``: this
    installation's own."""
    if wheel is None:
        yield
        return
    own = triton.runtime.cache.triton_key()
    key = own.replace(libtriton_hash(), libtriton_hash(wheel))
    assert key != own, f"{wheel} holds this installation's libtriton"
    with mock.patch.object(triton.runtime.cache, "triton_key", lambda: key):
        yield


def build(stages: str, cells: str, archive: Path, wheel: Path | None = None) -> dict:
    """Compile the stages' launches for sm_90 into an empty Triton cache, keyed for the
    Triton in ``wheel`` (default: this one), and pack what a launch loads into
    ``archive``; returns the manifest."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        failed = 0
        with common.hopper_jit(), keyed_for(wheel):
            for stage in stages.split(","):
                done, bad, _, seconds = candidates.warm(stage, cells=cells)
                print(f"{stage}: compiled {done} kernels ({bad} failed) in {seconds:.1f} s", flush=True)
                failed += bad
        groups = sorted(Path(cache).glob("*/__grp__*.json"))  # one per kernel (stages share some)
        manifest = dict(triton=triton.__version__, target="cuda sm_90", stages=stages, cells=cells,
                        kernels=len(groups), failed=failed, libtriton=libtriton_hash(wheel))
        with tarfile.open(archive, "w:gz") as tar:
            for group in groups:
                # The file list, relative to the cache (unpack makes the paths absolute again).
                children = {name: Path(path).relative_to(cache).as_posix()
                            for name, path in json.loads(group.read_text())["child_paths"].items()
                            if name.endswith(KEPT)}
                _add(tar, group.relative_to(cache).as_posix(), json.dumps({"child_paths": children}).encode())
                for path in children.values():
                    tar.add(Path(cache) / path, arcname=path)
            _add(tar, MANIFEST, json.dumps(manifest).encode())
    return manifest


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, fileobj=io.BytesIO(data))


def unpack(archive: Path, directory: Path) -> dict:
    """Unpack ``archive`` into the Triton cache ``directory``; returns the manifest."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    for group in directory.glob("*/__grp__*.json"):
        children = json.loads(group.read_text())["child_paths"]
        group.write_text(json.dumps({"child_paths": {name: str(directory / path) for name, path in children.items()}}))
    return json.loads((directory / MANIFEST).read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the stages' kernels for sm_90 and pack them")
    b.add_argument("--stages", default=",".join(candidates.STAGES),
                   help="comma-separated, of: " + ", ".join(candidates.STAGES))
    b.add_argument("--cells", default="", help="only the layers whose labels contain one of these (comma-separated)")
    b.add_argument("--out", type=Path, default=ARCHIVE)
    b.add_argument("--gpu-wheel", type=Path, help=f"the GPU's Triton wheel, for Python {GPU_PYTHON} (see above)")
    u = sub.add_parser("unpack", help="unpack an archive as a Triton cache")
    u.add_argument("archive", type=Path, nargs="?", default=ARCHIVE)
    u.add_argument("directory", type=Path, nargs="?", default=None, help="default: Triton's cache")
    a = ap.parse_args(argv)
    if a.command == "build":
        if triton.__version__ != GPU_TRITON:
            print(f"triton_cache: this is Triton {triton.__version__}; the GPU's is {GPU_TRITON}, "
                  "whose first launches will not find these kernels", flush=True)
        python = f"{sys.version_info.major}.{sys.version_info.minor}"
        if python != GPU_PYTHON and a.gpu_wheel is None:
            print(f"triton_cache: this is Python {python}, the GPU's is {GPU_PYTHON}: without --gpu-wheel "
                  "the keys hold this wheel's libtriton, and the GPU's first launches will not find these kernels",
                  flush=True)
        manifest = build(a.stages, a.cells, a.out, a.gpu_wheel)
        print(f"wrote {a.out}: {manifest['kernels']} kernels, {a.out.stat().st_size / 2**20:.1f} MiB")
        return 1 if manifest["failed"] else 0
    manifest = unpack(a.archive, a.directory or Path(triton.knobs.cache.dir))
    note = ""
    if manifest["triton"] != triton.__version__:
        note = f" (this is Triton {triton.__version__}: no hits)"
    elif manifest.get("libtriton") != libtriton_hash():
        note = " (keyed for another build of libtriton: no hits)"
    print(f"{manifest['kernels']} kernels of {manifest['stages']} for Triton {manifest['triton']} "
          f"{manifest['target']}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
