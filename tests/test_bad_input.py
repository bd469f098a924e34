"""Bad input gets a clear error, and a loaded context stays as it was."""

import math

import pytest

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.errors import GrkvError

CONTEXT = "abc def ghi jkl mno " * 30


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    return m


def test_model_files(tmp_path, tiny_gguf):
    with pytest.raises(FileNotFoundError):
        CompressedLlama(tmp_path / "missing.gguf")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model at all\n" * 10)
    with pytest.raises(Exception):  # llama-cpp-python: failed to load model
        CompressedLlama(text)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(Exception):
        CompressedLlama(cut)


@pytest.mark.parametrize("kw", [dict(ratio=0.0), dict(ratio=-0.5), dict(ratio=math.nan), dict(ratio=1.5),
                                dict(budget=0), dict(budget=-3), dict(ratio=0.5, budget=10), dict()])
def test_nonsense_ratios_and_budgets_keep_the_context(tiny, kw):
    tiny.compress(CONTEXT, method="knorm", ratio=0.5)
    before = kvstate.get_blob(tiny.ctx)
    answer = tiny.ask("abc", max_tokens=3)
    with pytest.raises(GrkvError):
        tiny.compress("zzz " * 50, method="knorm", **kw)
    assert kvstate.get_blob(tiny.ctx) == before and tiny.ask("abc", max_tokens=3) == answer


def test_a_budget_larger_than_the_context_keeps_it_whole(tiny):
    st = tiny.compress(CONTEXT, method="knorm", budget=100_000)
    assert st.method == "full" and st.kv_cells_after == st.context_tokens and "kept whole" in st.note


@pytest.mark.parametrize("context", ["", "   ", "\n\n\t"])
def test_empty_and_whitespace_contexts(tiny, context):
    tiny.compress(CONTEXT, method="knorm", ratio=0.5)
    before = kvstate.get_blob(tiny.ctx)
    with pytest.raises(GrkvError, match="empty"):
        tiny.compress(context, method="knorm", ratio=0.5)
    assert kvstate.get_blob(tiny.ctx) == before


def test_a_prompt_over_n_ctx_without_a_budget(tiny):
    with pytest.raises(GrkvError, match="do not fit"):
        tiny.compress("word " * 5000, method="knorm", ratio=0.5)
