"""Open a GGUF model with llama-cpp-python, with our eval callback installed,
and describe what the compressor needs to know about it."""

from __future__ import annotations

import contextlib
import ctypes
import os
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as L

from . import _native
from .architectures import ARCHS, REFUSED, attn_scale
from .errors import UnsupportedModelError

SUPPORTED_ARCHS = set(ARCHS)

CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q4_0": 2}  # name -> ggml type code
QUANTIZED_CACHE_TYPES = {"q8_0", "q4_0"}


@dataclass
class ModelInfo:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx_train: int
    attn_scale: float                 # logit scale applied to q.k
    cache_layers: list[int]           # model layer ids held by the compressed cache (part 0)
    iswa: bool = False                # part 1 of the blob is a sliding-window cache, left untouched
    attn_softcap: float = 0.0         # logits become cap * tanh(z / cap) (Gemma-2); 0 = none
    refused_methods: dict = field(default_factory=dict)  # method -> why this architecture cannot run it
    n_swa: int = 0
    chat_template: str | None = None
    # RoPE of the compressed layers, for re-rotating queries (GRKV stratified mode)
    rope_n_rot: int = 0
    rope_base: float = 10000.0
    rope_scale: float = 1.0
    rope_neox: bool = False
    rope_freq_factors: list[float] | None = None  # per-pair frequency divisors (rope_freqs, phi3 long/short)
    rope_rerotation_refused: str | None = None   # why re-rotation would be wrong, if it would
    metadata: dict = field(default_factory=dict, repr=False)

    def rope_params(self) -> _native.RopeParams:
        """The compressed layers' RoPE for the native core (re-rotation, de-rotation)."""
        return _native.RopeParams(self.rope_n_rot, self.rope_base, self.rope_scale, self.rope_neox,
                                  list(self.rope_freq_factors or []))


def _metadata_int(meta: dict, key: str, default=None):
    v = meta.get(key)
    if v is None:
        return default
    try:
        return int(v)
    except ValueError:
        return default


def describe(llm: llama_cpp.Llama) -> ModelInfo:
    """Read the model's shape and refuse what the compressor cannot handle."""
    meta = dict(llm.metadata)
    arch = meta.get("general.architecture", "?")
    model = llm._model.model
    if L.llama_model_is_recurrent(model) or L.llama_model_is_hybrid(model):
        raise UnsupportedModelError(
            f"architecture '{arch}' has a recurrent or hybrid memory; grkv-cpp compresses attention KV caches only"
        )
    if arch in REFUSED:
        raise UnsupportedModelError(f"architecture '{arch}' is not supported: {REFUSED[arch]}")
    rope = L.llama_model_rope_type(model)
    if rope not in (L.LLAMA_ROPE_TYPE_NORM, L.LLAMA_ROPE_TYPE_NEOX):
        raise UnsupportedModelError(
            f"architecture '{arch}' uses RoPE type {rope} (M-RoPE or vision RoPE); only standard RoPE is supported"
        )
    if arch not in ARCHS:
        raise UnsupportedModelError(
            f"architecture '{arch}' is not supported yet (supported: {', '.join(sorted(ARCHS))}; "
            "`grkv-cpp models` lists what was verified for each)"
        )
    spec = ARCHS[arch]
    n_layer = L.llama_model_n_layer(model)
    n_head = L.llama_model_n_head(model)
    n_head_kv = L.llama_model_n_head_kv(model)
    n_embd = L.llama_model_n_embd(model)
    head_dim = _metadata_int(meta, f"{arch}.attention.key_length", n_embd // n_head)
    n_swa = L.llama_model_n_swa(model)
    cache_layers = list(range(n_layer))
    iswa = False
    if spec.iswa_pattern and n_swa > 0:
        # llama.cpp's set_swa_pattern(n): every n-th layer is global and lives in
        # the base cache; the others use the sliding window and are not compressed.
        pattern = _metadata_int(meta, f"{arch}.attention.sliding_window_pattern", spec.iswa_pattern)
        iswa = True
        cache_layers = [il for il in range(n_layer) if il % pattern >= pattern - 1]
    n_rot = _metadata_int(meta, f"{arch}.rope.dimension_count", head_dim)
    factors = _rope_factors(llm, spec, n_rot) if spec.rope_factor_tensors else None
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    refused = None
    if scaling not in ("none", "linear"):
        refused = f"RoPE scaling '{scaling}' mixes frequencies per dimension, which re-rotation does not reproduce"
    return ModelInfo(
        rope_n_rot=n_rot,
        rope_base=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scale=float(L.llama_model_rope_freq_scale_train(model)),
        rope_neox=rope == L.LLAMA_ROPE_TYPE_NEOX,
        rope_freq_factors=factors,
        rope_rerotation_refused=refused,
        arch=arch,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        n_ctx_train=L.llama_model_n_ctx_train(model),
        attn_scale=attn_scale(arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, head_dim=head_dim),
        cache_layers=cache_layers,
        iswa=iswa,
        attn_softcap=_softcap(meta, spec),
        refused_methods=dict(spec.refused_methods),
        n_swa=n_swa,
        chat_template=meta.get("tokenizer.chat_template"),
        metadata=meta,
    )


def _softcap(meta: dict, spec) -> float:
    if not spec.softcap:
        return 0.0
    try:
        return float(meta.get(f"{spec.name}.attn_logit_softcapping", spec.softcap))
    except ValueError:
        return spec.softcap


def _rope_factors(llm: llama_cpp.Llama, spec, n_rot: int) -> list[float] | None:
    """The per-pair frequency divisors llama.cpp's graph passes to RoPE, read
    from the GGUF. llama.cpp's choice (llama_model::get_rope_factors): the
    model's rope_freqs if present, else phi3's long factors when the context
    is longer than the original training context, else the short ones."""
    import gguf
    import numpy as np

    try:
        tensors = {t.name: t for t in gguf.GGUFReader(str(llm.model_path)).tensors
                   if t.name in spec.rope_factor_tensors}
    except Exception as e:  # llama.cpp loaded the file, so this is unexpected: say so
        raise UnsupportedModelError(f"cannot read the RoPE factor tensors of {llm.model_path}: {e}") from e
    if not tensors:
        return None
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
    else:
        meta = llm.metadata
        arch = spec.name
        orig = _metadata_int(meta, f"{arch}.rope.scaling.original_context_length",
                             _metadata_int(meta, f"{arch}.context_length", 0))
        # llama.cpp compares the per-sequence context (n_ctx / n_seq_max; one sequence here)
        which = "rope_factors_long.weight" if llm.n_ctx() > orig else "rope_factors_short.weight"
        t = tensors.get(which)
        if t is None:
            return None
    vals = np.asarray(t.data, dtype=np.float32).ravel()
    if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(vals) != n_rot // 2:
        raise UnsupportedModelError(f"RoPE factor tensor {t.name} is not {n_rot // 2} float32 values")
    return [float(x) for x in vals]


def amx_compiled_in() -> bool:
    """True if this llama.cpp build carries ggml's AMX kernels, which segfault
    on some CPUs that advertise AMX (see README, "Build")."""
    info = L.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" in info


def ggml_library() -> ctypes.CDLL:
    """The libggml-base already loaded by llama_cpp (same handle)."""
    libdir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        p = libdir / name
        if p.exists():
            return ctypes.CDLL(str(p))
    raise FileNotFoundError(f"libggml-base not found in {libdir}")


def open_llama(model_path: str | os.PathLike, *, callback=None, user_data: int | None = None,
               type_k: str = "f16", type_v: str = "f16", **kwargs) -> llama_cpp.Llama:
    """Create a ``llama_cpp.Llama`` whose context carries ``callback`` as its
    eval callback (``Llama()`` has no argument for it) and whose model skips
    the extra buffer types when AMX kernels are compiled in."""
    if type_k not in CACHE_TYPES or type_v not in CACHE_TYPES:
        raise UnsupportedModelError(
            f"KV cache type {type_k}/{type_v} is not supported: grkv-cpp edits f16, bf16, f32, q8_0 and q4_0 caches"
        )
    if type_v in QUANTIZED_CACHE_TYPES and not kwargs.get("flash_attn"):
        raise UnsupportedModelError(f"a {type_v} V cache needs flash attention in llama.cpp: pass flash_attn=True (-fa)")
    if not Path(model_path).is_file():
        raise FileNotFoundError(f"model file not found: {model_path}")
    # Llama() gives batch (prefill) work every core unless told otherwise, so
    # `n_threads=1` alone still prefilled on all cores: two 1-thread processes
    # on 2 cores then fought over them. One thread count for both.
    if kwargs.get("n_threads") and not kwargs.get("n_threads_batch"):
        kwargs["n_threads_batch"] = kwargs["n_threads"]
    c0, m0 = L.llama_context_default_params, L.llama_model_default_params
    disable_extra = amx_compiled_in()

    def ctx_params():
        p = c0()
        if callback is not None:
            p.cb_eval = callback
            p.cb_eval_user_data = ctypes.c_void_p(user_data)
        return p

    def model_params():
        p = m0()
        if disable_extra:
            p.use_extra_bufts = False
        return p

    L.llama_context_default_params, L.llama_model_default_params = ctx_params, model_params
    try:
        llm = llama_cpp.Llama(
            model_path=str(model_path),
            type_k=CACHE_TYPES[type_k],
            type_v=CACHE_TYPES[type_v],
            **kwargs,
        )
    finally:
        L.llama_context_default_params, L.llama_model_default_params = c0, m0
    return llm


@contextlib.contextmanager
def quiet():
    """Silence llama.cpp's logging to stderr."""
    from llama_cpp._utils import suppress_stdout_stderr

    with suppress_stdout_stderr(disable=False):
        yield
