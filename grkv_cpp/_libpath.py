"""Point llama-cpp-python at the patched llama.cpp this package built
(grkv_cpp/lib), before anything imports llama_cpp. A LLAMA_CPP_LIB_PATH the
user set wins; without the patched build llama-cpp-python's own library loads
and the blob backend runs."""

import importlib.util
import os
import sys
from pathlib import Path


def patched_lib_dir() -> Path | None:
    spec = importlib.util.find_spec("grkv_cpp._native")
    if spec is None or not spec.origin:
        return None
    lib = Path(spec.origin).parent / "lib"
    return lib if any(lib.glob("libllama.*")) or (lib / "llama.dll").exists() else None


def use_patched_library():
    if "LLAMA_CPP_LIB_PATH" in os.environ:
        return
    lib = patched_lib_dir()
    if lib is None:
        return
    if "llama_cpp" in sys.modules:  # too late to choose the library: say so once
        print("grkv-cpp: llama_cpp was imported before grkv_cpp, so its own libllama is loaded and the patched "
              f"build in {lib} is not; import grkv_cpp first or set LLAMA_CPP_LIB_PATH={lib}", file=sys.stderr)
        return
    os.environ["LLAMA_CPP_LIB_PATH"] = str(lib)
