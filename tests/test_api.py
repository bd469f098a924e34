"""User-facing API on the tiny model: prompts, stats, answer rollback, streaming, errors."""

import json

import pytest
from click.testing import CliRunner

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.cli import main
from grkv_cpp.errors import BadRequestError, CompressionError, GrkvError
from grkv_cpp.methods import parse_method


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return CompressedLlama(tiny_gguf, n_ctx=1024)


CONTEXT = "abc def ghi jkl mno " * 30


def test_plain_prompt_for_models_without_template(tiny):
    assert tiny.info.chat_template is None
    tiny.compress(CONTEXT, method="knorm", ratio=0.5)
    assert tiny._format.question_template == "Question: {question}\nAnswer:"


def test_compress_stats_and_answer_kv_is_removed(tiny):
    st = tiny.compress(CONTEXT, method="snapkv+grkv", budget=64)
    assert st.method == "snapkv+grkv"
    assert st.kv_cells_after == 64 and st.kv_cells_before == st.context_tokens
    assert st.kv_bytes_after * st.kv_cells_before == st.kv_bytes_before * 64
    assert st.prefill_s > 0 and st.compress_s > 0
    n = tiny._context_len
    tiny.ask("abc", max_tokens=5)
    assert tiny.stats.generated_tokens <= 5 and tiny.stats.decode_s > 0
    assert kvstate.pos_range(tiny.ctx)[1] == n - 1  # the answer's KV is gone
    assert tiny.llm.n_tokens == n
    a1 = tiny.ask("abc", max_tokens=5)
    a2 = tiny.ask("abc", max_tokens=5)
    assert a1 == a2  # the same compressed context answers the same way


def test_streaming_yields_the_same_text(tiny):
    tiny.compress(CONTEXT, method="streaming", ratio=0.5)
    whole = tiny.ask("abc", max_tokens=8)
    pieces = list(tiny.ask("abc", max_tokens=8, stream=True))
    assert "".join(pieces).strip() == whole


def test_query_aware_budget(tiny):
    tiny.answer_query_aware(CONTEXT, "abc def", method="snapkv", ratio=0.25, max_tokens=3)
    st = tiny.stats
    assert st.kv_cells_after == round(0.25 * (st.context_tokens + st.question_tokens - 1))


def test_bad_input_is_refused_and_context_kept(tiny):
    with pytest.raises(ValueError, match="unknown method"):
        parse_method("h2o")
    with pytest.raises(ValueError, match="unknown merge"):
        parse_method("snapkv+magic")
    with pytest.raises(ValueError, match="unknown parameter"):
        parse_method("knorm", kernel=3)
    tiny.compress(CONTEXT, method="knorm", ratio=0.5)
    before, n, answer = kvstate.get_blob(tiny.ctx), tiny._context_len, tiny.ask("abc", max_tokens=5)
    other = "zzz yyy xxx www " * 25  # a different context: a failure must not leave it half-installed
    with pytest.raises(BadRequestError, match="exactly one"):
        tiny.compress(other, method="knorm")
    with pytest.raises(BadRequestError, match=r"\(0, 1\]"):
        tiny.compress(other, method="knorm", ratio=1.5)
    with pytest.raises(GrkvError, match="do not fit"):
        tiny.compress(CONTEXT * 20, method="knorm", ratio=0.5)
    # fails inside the native selection, after `other` was prefilled: the old context comes back
    with pytest.raises(CompressionError, match="smaller than"):
        tiny.compress(other, method="snapkv", budget=8)
    with pytest.raises(CompressionError, match="smaller than"):
        tiny.compress(other, method="snapkv", question="abc def", budget=8)
    with pytest.raises(BadRequestError, match="does not fit the budget"):
        tiny.compress_budgeted(other, method="snapkv", budget=8, chunk=64)
    assert kvstate.get_blob(tiny.ctx) == before and tiny._context_len == n
    assert tiny.ask("abc", max_tokens=5) == answer  # no recompression needed


def test_failure_without_a_previous_context_leaves_none(tiny_gguf):
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    with pytest.raises(CompressionError, match="smaller than"):
        m.compress(CONTEXT, method="snapkv", budget=8)
    assert kvstate.pos_range(m.ctx)[1] < 0  # nothing half-made stays in the cache
    with pytest.raises(GrkvError, match="call compress"):
        m.ask("abc")


def test_cli_ask_json(tiny_gguf, tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text(CONTEXT)
    r = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--context-file", str(f), "--question", "abc",
                                  "--question", "def", "--method", "snapkv+merge", "--kv-budget", "64", "--json",
                                  "--max-tokens", "3", "--n-ctx", "1024"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert [x["question"] for x in out["results"]] == ["abc", "def"]
    assert out["results"][0]["stats"]["kv_cells_after"] == 64
    r = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--context-file", str(f), "--question", "abc",
                                  "--method", "snapkv", "--json", "--max-tokens", "2"])  # default: half kept
    assert r.exit_code == 0, r.output
    st = json.loads(r.output[r.output.index("{"):])["results"][0]["stats"]
    assert st["kv_cells_after"] == round(0.5 * st["context_tokens"])
    r = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--context-file", str(f), "--question", "abc",
                                  "--kv-ratio", "0.5", "--kv-budget", "8"])
    assert r.exit_code != 0 and "not both" in r.output
    # our errors end the command with a message, not a traceback
    base = ["ask", "--model", str(tiny_gguf), "--context-file", str(f), "--question", "abc"]
    for extra, message in [(["--method", "knorm", "--kv-ratio", "0.5", "--n-ctx", "64"], "do not fit"),
                           (["--method", "knorm", "--kv-ratio", "1.5"], "(0, 1]"),
                           (["--method", "snapkv", "--kv-budget", "8"], "smaller than"),
                           (["--method", "full", "--query-aware"], "--query-aware compresses"),
                           (["--method", "full", "--decode-budget", "64", "--decode-method", "full"], "unknown method")]:
        r = CliRunner().invoke(main, base + extra)
        assert isinstance(r.exception, SystemExit) and r.exit_code in (1, 2), (extra, r.exception, r.output)
        assert message in r.output, (extra, r.output)


def test_shared_selection_always_keeps_the_last_position(tiny):
    # KNorm rarely ranks the last token first; the shared layout must keep it anyway
    for q in ["abc", "mno pqr", "xyz"]:
        tiny.answer_query_aware(CONTEXT, q, method="knorm", ratio=0.2, shared=True, max_tokens=2)
        tiny.compress(CONTEXT, method="knorm", ratio=0.2, shared=True)
        assert kvstate.pos_range(tiny.ctx)[1] == tiny._context_len - 1


def test_threads_cover_prefill_too(tiny_gguf):
    # llama-cpp-python defaults batch (prefill) threads to every core: --threads 1 must mean one
    import llama_cpp.llama_cpp as L

    m = CompressedLlama(tiny_gguf, n_ctx=256, n_threads=1)
    assert L.llama_n_threads(m.ctx) == 1 and L.llama_n_threads_batch(m.ctx) == 1


@pytest.mark.parametrize("method", ["snapkv", "snapkv+grkv", "full"])
def test_query_aware_state_equals_a_fresh_query_aware_compress(tiny, method):
    """One prefill of context + question, compressed from a restored copy,
    gives the cache and the answer of compress(..., question=...)."""
    q = "abc def ghi jkl mno pqr stu vwx abc def ghi jkl mno pqr stu vwx abc def ghi jkl mno pqr stu vwx abc def"
    st = tiny.prefill_state(CONTEXT, window=32, question=q)
    assert st.question_tokens > 32  # longer than SnapKV's window: the window widens to the whole question
    assert st.window == st.question_tokens and st.cached_tokens == st.context_tokens + st.question_tokens - 1
    if method == "full":
        tiny.restore(st)
        books = (tiny._cells, tiny._context_len, tiny.llm.n_tokens)
        shared = "".join(tiny.generate(6)).strip()
        tiny.compress(CONTEXT, method="knorm", ratio=1.0, question=q)  # keeps every cell: the full cache
    else:
        tiny.compress_state(st, method=method, ratio=0.5)
        books = (tiny._cells, tiny._context_len, tiny.llm.n_tokens)
        shared_stats = tiny.stats
        shared = "".join(tiny.generate(6)).strip()
        tiny.compress(CONTEXT, method=method, ratio=0.5, question=q)
        assert shared_stats.kv_cells_after == tiny.stats.kv_cells_after
        assert shared_stats.question_tokens == tiny.stats.question_tokens == st.question_tokens
    assert books == (tiny._cells, tiny._context_len, tiny.llm.n_tokens)  # the pending token counted alike
    fresh_blob = kvstate.get_blob(tiny.ctx)
    fresh = "".join(tiny.generate(6)).strip()
    assert shared == fresh
    (tiny.restore(st) if method == "full" else tiny.compress_state(st, method=method, ratio=0.5))
    assert kvstate.get_blob(tiny.ctx) == fresh_blob


def test_query_aware_state_errors_keep_the_context(tiny, monkeypatch):
    with pytest.raises(GrkvError, match="context as text"):
        tiny.prefill_state(tokens=[1, 2, 3], question="abc")
    st = tiny.prefill_state(CONTEXT, window=16, question="abc")
    tiny.compress(CONTEXT, method="knorm", ratio=0.5)
    before = (kvstate.get_blob(tiny.ctx), tiny._context_len)
    with pytest.raises(GrkvError, match="needs the last 32 queries"):
        tiny.compress_state(st, method="snapkv", ratio=0.5)  # window 32 > the 16 kept
    with pytest.raises(BadRequestError):
        tiny.compress_state(st, method="knorm", ratio=1.5)
    assert (kvstate.get_blob(tiny.ctx), tiny._context_len) == before

    def broken(*a, **k):
        raise CompressionError("injected")

    monkeypatch.setattr("grkv_cpp.prefilled.compress_cache", broken)  # fails after the state was put back
    with pytest.raises(CompressionError, match="injected"):
        tiny.compress_state(st, method="knorm", ratio=0.5)
    assert (kvstate.get_blob(tiny.ctx), tiny._context_len) == before
    # right after a prefill the cache holds no answerable context: a failure leaves none, not a stale one
    st = tiny.prefill_state(CONTEXT, window=16, question="abc")
    with pytest.raises(CompressionError, match="injected"):
        tiny.compress_state(st, method="knorm", ratio=0.5)
    with pytest.raises(GrkvError, match="call compress"):
        tiny.ask("abc")
