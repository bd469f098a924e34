"""Eviction methods, one per file. Each is a small frozen config; the scoring
itself runs in the native core (native/src/score/<name>.cpp)."""

from ..errors import BadRequestError
from .base import Method
from .compactor import Compactor
from .context import HEADWISE, ContextMethod
from .expected import ExpectedAttention
from .gkv import GKV
from .knorm import KNorm
from .laser import LaserKV
from .reconstruct import Reconstruct
from .snapkv import SnapKV
from .streaming import StreamingLLM

REGISTRY = {"snapkv": SnapKV, "knorm": KNorm, "streaming": StreamingLLM, "gkv": GKV, "laser": LaserKV,
            "reconstruct": Reconstruct, "expected": ExpectedAttention, "compactor": Compactor}


def parse_method(spec, **params):
    """`snapkv`, `snapkv+grkv`, `knorm+merge`, ... -> (Method, Merge or None).
    Keyword parameters go to whichever of the two declares them."""
    import dataclasses

    from ..merges import REGISTRY as MERGES

    if isinstance(spec, Method):
        return spec, None
    name, _, merge_name = spec.lower().partition("+")
    name, _, headwise = name.partition("-")  # compactor-adakv: the head-wise option of a context scorer
    if headwise:
        if headwise not in HEADWISE or not getattr(REGISTRY.get(name), "context_scorer", False):
            raise BadRequestError(f"unknown method {name}-{headwise}; head-wise budgets are -adakv or -global "
                                  "after reconstruct, expected or compactor")
        params = {**params, "headwise": headwise}
    if name not in REGISTRY:
        raise BadRequestError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}")
    mcls = REGISTRY[name]
    gcls = None
    if merge_name:
        if merge_name not in MERGES:
            raise BadRequestError(f"unknown merge {merge_name!r}; choose one of {', '.join(MERGES)}")
        gcls = MERGES[merge_name]
    mfields = {f.name for f in dataclasses.fields(mcls)}
    gfields = {f.name for f in dataclasses.fields(gcls)} if gcls else set()
    unknown = set(params) - mfields - gfields
    if unknown:
        raise BadRequestError(f"unknown parameter(s) for {spec}: {', '.join(sorted(unknown))}")
    method = mcls(**{k: v for k, v in params.items() if k in mfields})
    merge = gcls(**{k: v for k, v in params.items() if k in gfields and k not in mfields}) if gcls else None
    return method, merge


__all__ = ["Method", "ContextMethod", "GKV", "LaserKV", "SnapKV", "KNorm", "StreamingLLM", "Reconstruct",
           "ExpectedAttention", "Compactor", "REGISTRY", "parse_method"]
