"""Eviction methods, one per file. Each is a small frozen config; the scoring
itself runs in the native core (native/src/score/<name>.cpp)."""

from .base import Method
from .knorm import KNorm
from .snapkv import SnapKV
from .streaming import StreamingLLM

REGISTRY = {"snapkv": SnapKV, "knorm": KNorm, "streaming": StreamingLLM}


def get_method(name: str | Method, **params) -> Method:
    """A method from its name (``snapkv``, ``knorm``, ``streaming``) or an instance."""
    if isinstance(name, Method):
        return name
    try:
        cls = REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(REGISTRY)}") from None
    return cls(**params)


__all__ = ["Method", "SnapKV", "KNorm", "StreamingLLM", "REGISTRY", "get_method"]
