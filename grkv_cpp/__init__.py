"""grkv-cpp: compressed KV caches for GGUF models through llama.cpp."""

from .errors import CompressionError, GrkvError, NativeError, UnsupportedModelError
from .llm import CompressedLlama
from .methods import KNorm, SnapKV, StreamingLLM, parse_method
from .stats import Stats

__all__ = ["CompressedLlama", "Stats", "SnapKV", "KNorm", "StreamingLLM", "parse_method", "GrkvError",
           "CompressionError", "UnsupportedModelError", "NativeError"]
__version__ = "0.1.0"
