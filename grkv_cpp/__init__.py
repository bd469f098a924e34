"""grkv-cpp: compressed KV caches for GGUF models through llama.cpp."""

# The patched llama.cpp built with this package, if any, is the libllama to load.
from ._libpath import use_patched_library

use_patched_library()

# llama.cpp's shared libraries load before our extension: the other order crashed a
# CUDA build in llama_model_load_from_file (probably the C++/OpenMP runtimes both link).
import llama_cpp  # noqa: E402,F401

from .errors import BadRequestError, CompressionError, GrkvError, NativeError, UnsupportedModelError
from .dropin import compress_llama
from .llm import CompressedLlama
from .methods import KNorm, SnapKV, StreamingLLM, parse_method
from .stats import Stats

__all__ = ["CompressedLlama", "compress_llama", "Stats", "SnapKV", "KNorm", "StreamingLLM", "parse_method", "GrkvError",
           "BadRequestError", "CompressionError", "UnsupportedModelError", "NativeError"]
__version__ = "0.1.0"
