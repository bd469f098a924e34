"""Exceptions raised by grkv-cpp."""

from ._native import NativeError


class GrkvError(Exception):
    """Base class of grkv-cpp's own errors."""


class UnsupportedModelError(GrkvError):
    """The model's architecture, memory or cache type cannot be compressed."""


class CompressionError(GrkvError):
    """A compression failed; the context was rolled back to its state before the call."""


__all__ = ["GrkvError", "UnsupportedModelError", "CompressionError", "NativeError"]
