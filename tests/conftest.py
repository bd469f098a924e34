import os
import sys
from pathlib import Path

import pytest

import grkv_cpp  # noqa: F401  (first: it picks the patched libllama before any test imports llama_cpp)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import write_tiny_llama  # noqa: E402

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama.gguf")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    from grkv_cpp.models import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    from grkv_cpp.models import gemma3_path

    return gemma3_path()
