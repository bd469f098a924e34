"""Load a sanitizer build of grkv-cpp's native module in place of the
installed one, when GRKV_NATIVE_SO names it (README, "Fuzzing"). Import this
before anything from grkv_cpp. libasan must be the process's first library:
run under LD_PRELOAD=$(gcc -print-file-name=libasan.so)."""

import importlib.machinery
import importlib.util
import os
import sys


def load_sanitized_native() -> str | None:
    path = os.environ.get("GRKV_NATIVE_SO")
    if not path:
        return None
    # grkv_cpp finds its patched libllama beside the native module: keep pointing at the installed one
    pkg = importlib.util.find_spec("grkv_cpp")
    for where in (pkg.submodule_search_locations or []) if pkg else []:  # an editable install has two
        lib = os.path.join(where, "lib")
        if os.path.isdir(lib):
            os.environ.setdefault("LLAMA_CPP_LIB_PATH", lib)
            break
    loader = importlib.machinery.ExtensionFileLoader("grkv_cpp._native", path)
    spec = importlib.util.spec_from_loader("grkv_cpp._native", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules["grkv_cpp._native"] = mod  # `from grkv_cpp import _native` now finds this one
    print(f"fuzzing the native module at {path}", file=sys.stderr)
    return path


load_sanitized_native()
