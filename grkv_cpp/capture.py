"""Window-query capture through llama.cpp's eval callback (native, C++).

The callback stays installed for the whole context; while disabled it costs a
few nanoseconds per graph node, so decoding speed is unchanged (measured by
scripts/bench_callback.py)."""

from __future__ import annotations

import contextlib
import ctypes

import numpy as np
import llama_cpp.llama_cpp as L

from . import _native
from .loader import ggml_library


class GraphCapture:
    """Captures named tensors (``<prefix>-<layer>``) while enabled."""

    def __init__(self):
        ggml = ggml_library()
        get = ctypes.cast(ggml.ggml_backend_tensor_get, ctypes.c_void_p).value
        op_name = ctypes.cast(ggml.ggml_op_name, ctypes.c_void_p).value
        self._native = _native.Capture(get, op_name)
        self._ggml = ggml  # keep the library handle alive
        self.c_callback = ctypes.cast(self._native.callback_address, L.ggml_backend_sched_eval_callback)
        self.user_data = self._native.user_data
        self._targets: list[tuple[str, int, int]] = []
        self._ctx = None  # set by attach(): the callback is then installed only while enabled

    def attach(self, ctx):
        """With the patched llama.cpp: install the callback on `ctx` only
        while capturing (llama_kv_ext_set_eval_callback), so the rest of the
        context's decodes run without it."""
        self._ctx = ctx
        L._lib.llama_kv_ext_set_eval_callback.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        L._lib.llama_kv_ext_set_eval_callback.restype = None

    def _install(self, on: bool):
        if self._ctx is not None:
            cb = ctypes.cast(self.c_callback, ctypes.c_void_p) if on else None
            L._lib.llama_kv_ext_set_eval_callback(self._ctx, cb, self.user_data if on else None)

    def op(self, name: str) -> int:
        code = self._native.op_code(name)
        if code < 0:
            raise RuntimeError(f"this ggml has no op named {name}")
        return code

    def set_targets(self, targets: list[tuple]):
        """targets: (name prefix, op name or None, token dim[, positions to keep])."""
        self._targets = [(t[0], -1 if t[1] is None else self.op(t[1]), t[2], list(t[3]) if len(t) > 3 else [])
                         for t in targets]
        self._native.set_targets(self._targets)

    @contextlib.contextmanager
    def enabled(self, clear: bool = True):
        """Capture while inside; `clear=False` appends to the rows kept so far."""
        if clear:
            self._native.clear()
        self._native.enable(True)
        self._install(True)
        try:
            yield self
        finally:
            self._native.enable(False)
            self._install(False)
        if self._native.error:
            raise RuntimeError(self._native.error)

    def rows(self, target: int, layer: int) -> np.ndarray:
        """[n_rows, row_len] float32 rows captured for (target, layer)."""
        return self._native.get(target, layer)

    def positions(self, target: int, layer: int) -> np.ndarray:
        """Position of each captured row (ROPE nodes only)."""
        return self._native.positions(target, layer)

    def layers(self, target: int) -> list[int]:
        return self._native.layers(target)

    def clear(self):
        self._native.clear()


# Standard targets.
QUERIES = ("Qcur", "ROPE", 2)       # post-RoPE queries [head_dim, n_head, T]
ATTN_OUT = ("kqv_out", None, 1)     # attention output before o_proj [head_dim*n_head, T]
