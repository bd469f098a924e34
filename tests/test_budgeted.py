"""Bounded-memory prefill on the tiny model: a prompt several times n_ctx runs
in a cache that never exceeds budget + chunk cells."""

import json

import pytest
from click.testing import CliRunner

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.cli import main
from grkv_cpp.errors import GrkvError

CONTEXT = "abc def ghi jkl mno pqr " * 400  # ~2,400+ tokens with the byte-level tiny vocabulary


@pytest.mark.parametrize("method", ["snapkv", "knorm", "snapkv+grkv"])
def test_prompt_longer_than_the_context_runs_in_budget(tiny_gguf, method):
    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    with pytest.raises(GrkvError, match="budgeted request"):
        m.compress(CONTEXT, method="knorm", ratio=0.5)
    st = m.compress_budgeted(CONTEXT, budget=256, chunk=128, method=method)
    assert st.context_tokens > 4 * m.n_ctx
    assert max(m.budget_trace) <= 256 and m.budget_trace[-1] == 256
    assert st.compressions == len(m.budget_trace) - 2  # the first two chunks fit the budget
    assert kvstate.pos_range(m.ctx) == (st.context_tokens - 256, st.context_tokens - 1)
    st2 = kvstate.parse(kvstate.get_blob(m.ctx))
    assert st2.part_info(0)["n_cells"] == 256
    m.ask("abc", max_tokens=4)  # decoding continues past n_ctx positions
    assert kvstate.pos_range(m.ctx)[1] == st.context_tokens - 1


def test_cli_budgeted(tiny_gguf, tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text(CONTEXT)
    r = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--context-file", str(f), "--question", "abc",
                                  "--method", "snapkv", "--kv-budget", "200", "--chunk", "100", "--json",
                                  "--max-tokens", "3"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output[r.output.index("{"):])["results"][0]["stats"]
    assert st["kv_cells_after"] == 200 and st["context_tokens"] > 2000


def test_memory_stats(tiny_gguf):
    from grkv_cpp.footprint import simulate

    m = CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)
    st = m.compress_budgeted(CONTEXT, budget=256, chunk=128, method="knorm")
    fp = simulate(st.context_tokens, chunk=128, budget=256, evict_during_prefill=True)
    assert (st.kv_footprint, st.kv_peak) == (fp.footprint, fp.peak)
    assert st.kv_peak == pytest.approx((256 + 128) / st.context_tokens)
    # tiny model: 3 layers, K and V of 2 KV heads x 16 dims in f16 = 384 bytes per cell; 512 cells allocated
    assert st.kv_buffer_bytes == 512 * 3 * 2 * (2 * 16) * 2
    assert st.peak_rss_bytes > 10 * 2**20
    full = m.prefill(CONTEXT[:600])
    assert (full.kv_footprint, full.kv_peak) == (1.0, 1.0)
    post = m.compress(CONTEXT[:600], method="knorm", ratio=0.5)
    assert post.kv_peak == 1.0  # post-fill eviction: the whole prompt was cached first
