"""Long work reports its progress: a prefill counts its tokens up to the
prompt's total, a compression reports before and after, a budgeted prefill
counts every chunk toward one total; nothing is reported without a listener."""

import io

from grkv_cpp.llm import CompressedLlama
from grkv_cpp.loader import quiet
from grkv_cpp.progress import TerminalBar

TEXT = "The grass is green. The sky is blue. The pass key is 4711. " * 10


def _model(path, **kw):
    with quiet():
        m = CompressedLlama(path, n_ctx=1024, n_batch=64, **kw)
    events = []
    m.progress.callback = lambda *e: events.append(e)
    return m, events


def test_prefill_and_compression_report_progress(tiny_gguf):
    m, events = _model(tiny_gguf)
    st = m.compress(TEXT, method="snapkv", ratio=0.5)
    pre = [e for e in events if e[0] == "prefill"]
    n = st.context_tokens
    assert pre[0] == ("prefill", 0, n) and pre[-1] == ("prefill", n, n)
    done = [e[1] for e in pre]
    assert done == sorted(done) and len(pre) >= n // 64  # one report per batch of 64
    comp = [e for e in events if e[0] == "compress"]
    assert comp == [("compress", 0, n), ("compress", n, n)]
    assert events.index(comp[0]) > events.index(pre[-1])


def test_budgeted_prefill_counts_all_chunks_toward_one_total(tiny_gguf):
    m, events = _model(tiny_gguf)
    st = m.compress_budgeted(TEXT, budget=128, chunk=64, method="snapkv")
    n = st.context_tokens
    assert events[0] == ("prefill", 0, n) and events[-1] == ("prefill", n, n)
    assert {e[0] for e in events} == {"prefill"} and [e[2] for e in events] == [n] * len(events)


def test_no_listener_no_reports_and_the_bar_closes(tiny_gguf):
    with quiet():
        m = CompressedLlama(tiny_gguf, n_ctx=1024)
    assert m.progress.callback is None
    m.compress(TEXT, method="knorm", ratio=0.5)  # runs without a listener
    out = io.StringIO()
    bar = TerminalBar(file=out)
    bar("prefill", 0, 10)
    bar("prefill", 10, 10)
    assert bar._bar is None  # a finished phase closes its bar


def test_stats_are_json_ready_after_every_kind_of_compression(tiny_gguf):
    import json

    with quiet():
        m = CompressedLlama(tiny_gguf, n_ctx=1024)
    for method in ("compactor", "snapkv+grkv", "gkv"):  # compactor/gkv carry per-cell arrays in the report
        st = m.compress(TEXT, method=method, ratio=0.5)
        d = json.loads(json.dumps(st.to_dict()))
        assert d["kv_cells_after"] == st.kv_cells_after and d["method"] == st.method
