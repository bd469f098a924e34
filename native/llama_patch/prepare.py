#!/usr/bin/env python3
"""Prepare the patched llama.cpp source: llama.cpp 0c1e57098 as vendored by
the llama-cpp-python 0.3.36 source distribution, plus grkv-cpp's additive
KV-cache extension (this folder).

    python native/llama_patch/prepare.py --out build/llama-src [--sdist PATH]

The sdist comes from --sdist (or GRKV_LLAMA_SDIST) for offline builds, else
through pip by name (`pip download llama-cpp-python==0.3.36 --no-binary
:all:`); either way its sha256 is checked. The output folder then holds
llama.cpp's tree with the patch applied; CMakeLists.txt builds it, or by hand:

    cmake -S build/llama-src -B build/llama -DLLAMA_BUILD_COMMON=OFF ... && ninja -C build/llama llama

Re-running with the same output folder does nothing when it is up to date.
Standard library only: CMake runs it at configure time."""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DIFF = HERE / "llama.cpp-0c1e57098.diff"
NEW_FILES = {"include/llama-kv-ext.h": HERE / "include/llama-kv-ext.h",
             "src/llama-kv-ext.cpp": HERE / "src/llama-kv-ext.cpp"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_sdist(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    want = cache / f"llama_cpp_python-{VERSION}.tar.gz"
    if not want.is_file():
        print(f"grkv-cpp: fetching the llama-cpp-python {VERSION} sdist through pip", file=sys.stderr, flush=True)
        # Inside a pip build (this runs from CMake under `pip install`) the
        # environment points at pip's build overlay and build tracker; a pip
        # started from there fails to prepare the sdist, so it gets the
        # environment the user started with.
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PIP_BUILD_TRACKER", "PIP_REQ_TRACKER")}
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(cache), "-q"], check=True,
                       stdout=sys.stderr, env=env)
    if not want.is_file():
        sys.exit(f"grkv-cpp: pip did not leave {want.name} in {cache}")
    return want


def stamp_of() -> str:
    """The sdist and the diff: the extracted tree is redone when either changes
    (the extension's own files are refreshed one by one, see prepare)."""
    h = hashlib.sha256(SHA256.encode())
    h.update(DIFF.read_bytes())
    return h.hexdigest()


def refresh_new_files(root: Path) -> None:
    """Copy the extension's files that differ, and only those, so that an edit
    to them recompiles them alone instead of the whole re-extracted tree."""
    for rel, src in NEW_FILES.items():
        dst = root / rel
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)


def prepare(out: Path, sdist: Path) -> Path:
    stamp = out / ".grkv-patch-stamp"
    if stamp.is_file() and stamp.read_text() == stamp_of():
        refresh_new_files(out)
        return out
    got = sha256(sdist)
    if got != SHA256:
        sys.exit(f"grkv-cpp: {sdist} has sha256 {got}, expected {SHA256} (llama-cpp-python {VERSION})")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".llama-src-", dir=out.parent)
    try:
        prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        # the diff only adds declarations, one hook call and one source to CMake
        r = subprocess.run(["patch", "-p1", "--forward", "--batch", "-i", str(DIFF)], cwd=tmp,
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"grkv-cpp: the llama.cpp patch did not apply:\n{r.stdout}{r.stderr}")
        refresh_new_files(Path(tmp))
        os.replace(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    stamp.write_text(stamp_of())
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for the patched llama.cpp tree")
    ap.add_argument("--sdist", type=Path, default=os.environ.get("GRKV_LLAMA_SDIST") or None,
                    help="llama_cpp_python-0.3.36.tar.gz (default: fetched through pip)")
    ap.add_argument("--cache", type=Path, default=None, help="where a fetched sdist is kept (default: beside --out)")
    a = ap.parse_args()
    out = a.out.resolve()
    sdist = a.sdist.resolve() if a.sdist else fetch_sdist((a.cache or out.parent / "sdist").resolve())
    if not sdist.is_file():
        sys.exit(f"grkv-cpp: no such sdist: {sdist}")
    print(prepare(out, sdist))


if __name__ == "__main__":
    main()
