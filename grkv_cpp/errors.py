"""Exceptions raised by grkv-cpp."""

from ._native import NativeError


class GrkvError(Exception):
    """Base class of grkv-cpp's own errors."""


class UnsupportedModelError(GrkvError):
    """The model's architecture, memory or cache type cannot be compressed."""


class BadRequestError(GrkvError, ValueError):
    """Arguments that describe no compression (a ratio outside (0, 1], a ratio
    and a budget together...); raised before the cache is touched."""


class CompressionError(GrkvError):
    """A compression failed; the context was rolled back to its state before the call."""


__all__ = ["GrkvError", "UnsupportedModelError", "BadRequestError", "CompressionError", "NativeError"]
