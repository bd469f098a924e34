"""The evaluation harness on the tiny model: prefill once and sweep, resume
after an interruption, summaries and plots."""

import json
import random

import pytest

from grkv_cpp import CompressedLlama
from grkv_cpp.eval.harness import EvalConfig, group_rows, load_results, run_eval
from grkv_cpp.eval.report import AVERAGE, summarise, write_all

WORDS = "abc def ghi jkl mno pqr stu vwx".split()


def dataset(n_groups=3, q_per_group=2, seed=0):
    rng = random.Random(seed)
    rows = []
    for g in range(n_groups):
        ctx = " ".join(rng.choice(WORDS) for _ in range(50))
        for q in range(q_per_group):
            rows.append(dict(context=ctx, question=f"{rng.choice(WORDS)}?", answers=[rng.choice(WORDS)],
                             task=f"t{g % 2}", metric="all" if q == 0 else "part", max_new_tokens=4,
                             length=256, sample=g))
    return rows


@pytest.fixture()
def tiny(tiny_gguf):
    return CompressedLlama(tiny_gguf, n_ctx=512, n_batch=128)


CFG = dict(methods=["full", "knorm", "snapkv", "snapkv+grkv", "knorm@budget"], ratios=[0.5, 0.9], chunk=64)


def test_sweep_rows_and_one_prefill_per_group(tiny, tmp_path, monkeypatch):
    rows = dataset()
    calls = {"prefill_state": 0}
    orig = tiny.prefill_state

    def counting(*a, **k):
        calls["prefill_state"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(tiny, "prefill_state", counting)
    res = run_eval(tiny, rows, EvalConfig(**CFG), tmp_path / "r.jsonl", progress=False)
    n_runs = 1 + 4 * 2  # full + 4 methods x 2 ratios
    assert len(res) == len(rows) * n_runs
    assert calls["prefill_state"] == 3  # once per context group; the budgeted variant runs its own chunks
    for r in res:
        assert 0 <= r["score"] <= 100 and r["mode"] == "agnostic"
        if r["method"] == "full":
            assert r["kv_cells"] == r["context_tokens"]
        else:  # the cache held the kept fraction of the context when the question came
            assert r["kv_cells"] == max(1, round(r["ratio"] * r["context_tokens"]))
    # the same compressed cache answers both questions of a group: full-cache answers equal a plain run
    tiny.prefill(rows[0]["context"])
    plain = tiny.ask(rows[0]["question"], max_tokens=4)
    full0 = next(r for r in res if r["method"] == "full" and r["group"] == 0 and r["qid"] == 0)
    assert full0["prediction"] == plain


def test_resume_after_interruption_gives_the_same_summary(tiny, tmp_path, monkeypatch):
    rows = dataset()
    cfg = EvalConfig(**CFG)
    whole = run_eval(tiny, rows, cfg, tmp_path / "a.jsonl", progress=False)

    orig_ask, n = tiny.ask, {"k": 0}

    def flaky(*a, **k):
        n["k"] += 1
        if n["k"] == 17:
            raise KeyboardInterrupt
        return orig_ask(*a, **k)

    monkeypatch.setattr(tiny, "ask", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny, rows, cfg, tmp_path / "b.jsonl", progress=False)
    partial = load_results(tmp_path / "b.jsonl")
    assert len(partial) == 16
    # a line cut in the middle of writing is dropped and redone
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write('{"group": 0, "qid"')
    monkeypatch.setattr(tiny, "ask", orig_ask)
    resumed = run_eval(tiny, rows, cfg, tmp_path / "b.jsonl", progress=False)
    assert len(resumed) == len(whole)
    keys = [(r["group"], r["qid"], r["method"], r["ratio"]) for r in load_results(tmp_path / "b.jsonl")]
    assert len(keys) == len(set(keys))  # nothing asked twice
    strip = lambda rs: sorted((r["task"], r["method"], r["ratio"], r["score"], r["n"]) for r in rs)  # noqa: E731
    assert strip(summarise(resumed)) == strip(summarise(whole))


def test_summary_and_plots(tiny, tmp_path):
    res = run_eval(tiny, dataset(), EvalConfig(methods=["full", "knorm"], ratios=[0.5, 0.9]),
                   tmp_path / "r.jsonl", progress=False)
    rows = write_all(res, tmp_path)
    avg = [r for r in rows if r["task"] == AVERAGE and r["method"] == "knorm" and r["ratio"] == 0.5][0]
    per = [r for r in rows if r["task"] != AVERAGE and r["method"] == "knorm" and r["ratio"] == 0.5]
    assert avg["score"] == pytest.approx(sum(r["score"] for r in per) / len(per))
    assert (tmp_path / "summary.csv").read_text().startswith("model,mode,task,method,ratio,score")
    assert "| task |" in (tmp_path / "summary.md").read_text()
    pngs = list(tmp_path.glob("plot_*.png"))
    assert pngs and pngs[0].read_bytes()[:4] == b"\x89PNG"


def test_query_aware_mode_one_prefill_per_question(tiny, tmp_path, monkeypatch):
    rows = dataset(2, 2)
    calls = []
    orig = tiny.prefill_state
    monkeypatch.setattr(tiny, "prefill_state", lambda *a, **k: calls.append(k.get("question")) or orig(*a, **k))
    cfg = EvalConfig(methods=["full", "snapkv", "snapkv+grkv", "knorm"], ratios=[0.5, 0.9], mode="aware")
    res = run_eval(tiny, rows, cfg, tmp_path / "r.jsonl", progress=False)
    assert len(res) == len(rows) * (1 + 3 * 2) and {r["mode"] for r in res} == {"aware"}
    assert calls == [r["question"] for r in rows]  # one prefill per question, shared by its 7 runs
    for r in res:  # each answer is the one a fresh query-aware compression gives
        q = rows[2 * r["group"] + r["qid"]]
        if r["method"] == "full":
            continue
        fresh = tiny.answer_query_aware(q["context"], q["question"], method=r["method"], ratio=r["ratio"],
                                        max_tokens=q["max_new_tokens"])
        assert r["prediction"] == fresh, r
        assert r["kv_cells"] == tiny.stats.kv_cells_after


def test_query_aware_mode_and_bad_input(tiny, tmp_path):
    res = run_eval(tiny, dataset(1, 1), EvalConfig(methods=["snapkv"], ratios=[0.5], mode="aware"),
                   tmp_path / "r.jsonl", progress=False)
    assert len(res) == 1 and res[0]["mode"] == "aware"
    with pytest.raises(ValueError, match="answers"):
        group_rows([dict(context="x", question="y", answers=[])])
    with pytest.raises(ValueError, match="kept ratios"):
        EvalConfig(methods=["knorm"], ratios=[1.5])
    json.dumps(res)  # rows are plain JSON


def test_cli_eval_resumes_and_writes_outputs(tiny_gguf, tmp_path):
    from click.testing import CliRunner

    from grkv_cpp.cli import main
    from grkv_cpp.eval.ruler import write_jsonl

    data = tmp_path / "d.jsonl"
    write_jsonl(dataset(2, 1), data)
    args = ["eval", "--model", str(tiny_gguf), "--data", str(data), "--methods", "full,knorm,snapkv",
            "--ratios", "0.5", "--window", "16", "-ngl", "99", "--out", str(tmp_path / "o")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    first = (tmp_path / "o" / "summary.csv").read_text()
    rows = load_results(tmp_path / "o" / "results.jsonl")
    assert len(rows) == 2 * 3
    # every row says where it ran; a CPU build ignores -ngl and runs on the CPU
    import llama_cpp.llama_cpp as L
    assert {r["device"] for r in rows} == {"gpu" if L.llama_supports_gpu_offload() else "cpu"}
    r = CliRunner().invoke(main, args)  # a rerun finds everything done and asks nothing again
    assert r.exit_code == 0, r.output
    assert len(load_results(tmp_path / "o" / "results.jsonl")) == 6
    assert (tmp_path / "o" / "summary.csv").read_text() == first
    r = CliRunner().invoke(main, ["eval", "--model", str(tiny_gguf), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "--data" in r.output


def test_shards_split_the_groups_and_add_up_to_the_whole_run(tiny_gguf, tmp_path):
    from click.testing import CliRunner

    from grkv_cpp.cli import main
    from grkv_cpp.eval.ruler import write_jsonl

    data = tmp_path / "d.jsonl"
    write_jsonl(dataset(3, 1), data)
    # with flash attention (an untransposed V cache in the state blob)
    base = ["eval", "--model", str(tiny_gguf), "--data", str(data), "--methods", "full,knorm",
            "--ratios", "0.5", "--window", "16", "--flash-attn"]
    assert CliRunner().invoke(main, base + ["--out", str(tmp_path / "whole")]).exit_code == 0
    for i in (0, 1):
        r = CliRunner().invoke(main, base + ["--shard", f"{i}/2", "--out", str(tmp_path / "sh")])
        assert r.exit_code == 0, r.output
    shard0 = load_results(tmp_path / "sh" / "results.shard0of2.jsonl")
    shard1 = load_results(tmp_path / "sh" / "results.shard1of2.jsonl")
    assert {r["group"] for r in shard0} == {0, 2} and {r["group"] for r in shard1} == {1}
    # predictions do not depend on which process asked
    strip = lambda rs: sorted((r["group"], r["method"], r["ratio"], r["prediction"]) for r in rs)  # noqa: E731
    assert strip(shard0 + shard1) == strip(load_results(tmp_path / "whole" / "results.jsonl"))
    no_time = lambda p: [line.rsplit(",", 1)[0] for line in p.read_text().splitlines()]  # noqa: E731 (s/q differs)
    assert no_time(tmp_path / "sh" / "summary.csv") == no_time(tmp_path / "whole" / "summary.csv")
    # an unsharded rerun on the same folder finds every row done in the shard files
    r = CliRunner().invoke(main, base + ["--out", str(tmp_path / "sh")])
    assert r.exit_code == 0 and load_results(tmp_path / "sh" / "results.jsonl") == []
    r = CliRunner().invoke(main, base + ["--shard", "2/2", "--out", str(tmp_path / "sh")])
    assert r.exit_code != 0 and "0 <= I < N" in r.output


def test_complete_groups_drops_a_half_done_group_and_report_resummarises(tmp_path):
    from grkv_cpp.eval.harness import complete_groups
    from grkv_cpp.eval.report import main as report_main

    def row(g, method, ratio, score):
        return dict(group=g, qid=0, task="t", method=method, ratio=ratio, mode="agnostic", score=score,
                    seconds=1.0, model="m")

    rows = [row(0, "full", 1.0, 100.0), row(0, "knorm", 0.5, 0.0), row(1, "full", 1.0, 0.0)]
    assert {r["group"] for r in complete_groups(rows)} == {0}
    (tmp_path / "results.shard0of2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    (tmp_path / "results.shard1of2.jsonl").write_text(json.dumps(rows[2]) + "\n")
    report_main([str(tmp_path), "--complete-groups"])
    assert "t,full,1.0,100.0,1" in (tmp_path / "summary.csv").read_text()
    report_main([str(tmp_path)])
    assert "t,full,1.0,50.0,2" in (tmp_path / "summary.csv").read_text()
    with pytest.raises(SystemExit, match="no results"):
        report_main([str(tmp_path / "nothing")])


def test_report_reads_several_folders_as_one_run_and_filters_device(tmp_path, capsys):
    from grkv_cpp.eval.report import main as report_main

    def row(g, method, ratio, score, device="cpu"):
        return dict(group=g, qid=0, task="t", method=method, ratio=ratio, mode="agnostic", score=score,
                    seconds=2.0 + g, prefill_s=1.0, compress_s=0.5, decode_s=0.5, model="m", device=device)

    main_dir, bud_dir, out = tmp_path / "main", tmp_path / "bud", tmp_path / "out"
    main_dir.mkdir(), bud_dir.mkdir()
    # group 0 ran on the GPU in the main sweep; group 2 has no budgeted row yet
    main_rows = [row(0, "snapkv", 0.5, 100.0, "gpu"), row(1, "snapkv", 0.5, 0.0), row(2, "snapkv", 0.5, 100.0),
                 row(1, "knorm", 0.5, 100.0)]
    bud_rows = [row(0, "snapkv@budget", 0.5, 100.0), row(1, "snapkv@budget", 0.5, 100.0)]
    (main_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in main_rows))
    (bud_dir / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bud_rows))
    for d in (main_dir, bud_dir):
        (d / "run.json").write_text(json.dumps({"data": "abc"}))

    report_main([str(bud_dir), str(main_dir), "--methods", "snapkv,snapkv@budget", "--device", "cpu",
                 "--complete-groups", "--out", str(out), "--paired", "snapkv@budget:snapkv", "--times"])
    printed = capsys.readouterr().out
    assert "1 contexts, 2 rows" in printed  # group 0 (GPU) and group 2 (unfinished) left out, knorm filtered
    assert "| snapkv@budget | snapkv | 0.5 | agnostic | 1 | +100.0 |" in printed
    assert "| snapkv | 0.5 | agnostic | 1 | 3.0 | 1.0 | 0.5 | 0.5 |" in printed  # median times of group 1
    assert "t,snapkv@budget,0.5,100.0,1" in (out / "summary.csv").read_text()
    assert not (bud_dir / "summary.csv").exists()  # --out, not the first folder

    with pytest.raises(SystemExit, match="--out"):
        report_main([str(bud_dir), str(main_dir)])
    with pytest.raises(SystemExit, match="no rows for streaming"):
        report_main([str(bud_dir), "--methods", "streaming"])
    (main_dir / "run.json").write_text(json.dumps({"data": "def"}))
    with pytest.raises(SystemExit, match="different data files"):
        report_main([str(bud_dir), str(main_dir), "--out", str(out)])


def test_paired_difference_and_interval():
    from grkv_cpp.eval.report import paired

    rows = []
    for g in range(40):
        for m, sc in (("a", 100.0 if g < 30 else 0.0), ("b", 100.0 if g < 10 else 0.0)):
            rows.append(dict(group=g, qid=0, method=m, ratio=0.5, mode="agnostic", score=sc))
    (p,) = paired(rows, "a", "b")
    assert p["n"] == 40 and p["diff"] == pytest.approx(50.0)  # 20 of 40 questions gained 100
    assert p["a_better"] == 20 and p["b_better"] == 0
    assert 30 < p["ci_low"] < 50 < p["ci_high"] < 70
    assert paired(rows, "b", "b")[0]["diff"] == 0.0
    # 20 wins, no losses: the exact p is 2 / 2^20; 100,000 random sign patterns put it near 1e-5
    assert p["p"] < 1e-4
    with pytest.raises(ValueError, match="no rows for method c"):
        paired(rows, "a", "c")


def test_paired_across_modes():
    from grkv_cpp.eval.report import paired

    rows = [dict(group=g, qid=0, method="snapkv", ratio=0.5, mode=mode, score=100.0 * (mode == "aware" or g < 1))
            for g in range(4) for mode in ("aware", "agnostic")]
    # same mode on both sides unless pinned: each mode against itself
    assert [(p["mode"], p["diff"]) for p in paired(rows, "snapkv", "snapkv")] == [("agnostic", 0.0), ("aware", 0.0)]
    (p,) = paired(rows, "snapkv/aware", "snapkv/agnostic")
    assert p["mode"] == "aware − agnostic" and p["diff"] == 75.0 and (p["a_better"], p["b_better"]) == (3, 0)
    with pytest.raises(ValueError, match="no rows for method knorm"):
        paired(rows, "knorm/aware", "snapkv/agnostic")


def test_sign_flip_p_matches_the_exact_binomial_on_wins_and_losses():
    from math import comb

    from grkv_cpp.eval.report import sign_flip_p

    def binom_two_sided(w, n):  # |wins - losses| at least as large as observed, fair coin
        return sum(comb(n, k) for k in range(n + 1) if abs(2 * k - n) >= abs(2 * w - n)) / 2 ** n

    # 8 questions better, 3 worse, 249 ties (ties cannot flip): exact enumeration
    d = [100.0] * 8 + [-100.0] * 3 + [0.0] * 249
    assert sign_flip_p(d) == pytest.approx(binom_two_sided(8, 11)) == pytest.approx(464 / 2048)
    # 30 against 14: Monte Carlo, within its sampling error of the exact value
    d = [100.0] * 30 + [-100.0] * 14
    assert sign_flip_p(d) == pytest.approx(binom_two_sided(30, 44), abs=0.003)
    assert sign_flip_p([0.0] * 5) == 1.0
    # unequal sizes (RULER's `part` metric): only the all-positive pattern and its mirror reach |sum| = 150
    assert sign_flip_p([100.0, 50.0]) == pytest.approx(0.5)


def test_paired_against_the_full_cache():
    from grkv_cpp.eval.report import paired

    rows = [dict(group=g, qid=0, method="full", ratio=1.0, mode="agnostic", score=100.0) for g in range(4)]
    rows += [dict(group=g, qid=0, method="snapkv", ratio=r, mode="agnostic", score=100.0 * (g < 2))
             for g in range(4) for r in (0.5, 0.9)]
    out = paired(rows, "snapkv", "full")
    assert [(p["ratio"], p["diff"], p["b_better"]) for p in out] == [(0.9, -50.0, 2), (0.5, -50.0, 2)]


def test_loading_skips_a_bad_middle_line_and_drops_duplicate_rows(tmp_path):
    from grkv_cpp.eval.harness import load_run

    def row(g):
        return dict(group=g, qid=0, method="full", ratio=1.0, mode="agnostic", score=1.0)

    f = tmp_path / "results.jsonl"
    f.write_text(json.dumps(row(0)) + "\n{broken\n" + json.dumps(row(1)) + "\n{cut by an interrup")
    with pytest.warns(UserWarning, match="line 2"):
        assert [r["group"] for r in load_results(f)] == [0, 1]  # the cut last line goes silently
    # a shard file left beside the results.jsonl it was merged into counts once
    f.write_text(json.dumps(row(0)) + "\n" + json.dumps(row(1)) + "\n")
    (tmp_path / "results.shard0of2.jsonl").write_text(json.dumps(row(1)) + "\n")
    with pytest.warns(UserWarning, match="dropped 1 rows"):
        assert sorted(r["group"] for r in load_run(tmp_path)) == [0, 1]


def test_cli_eval_refuses_to_resume_a_folder_of_another_run(tiny_gguf, tmp_path):
    from click.testing import CliRunner

    from grkv_cpp.cli import main
    from grkv_cpp.eval.ruler import write_jsonl

    d1, d2 = tmp_path / "d1.jsonl", tmp_path / "d2.jsonl"
    write_jsonl(dataset(1, 1, seed=0), d1)
    write_jsonl(dataset(1, 1, seed=1), d2)
    base = ["eval", "--model", str(tiny_gguf), "--methods", "full", "--ratios", "0.5", "--out", str(tmp_path / "o")]
    assert CliRunner().invoke(main, base + ["--data", str(d1)]).exit_code == 0
    before = (tmp_path / "o" / "results.jsonl").read_text()
    # other data: group 0 would be another context, so its rows must not count as done
    r = CliRunner().invoke(main, base + ["--data", str(d2)])
    assert r.exit_code != 0 and "run.json differs" in r.output and "data" in r.output
    r = CliRunner().invoke(main, base + ["--data", str(d1), "--window", "32"])
    assert r.exit_code != 0 and "window" in r.output
    assert (tmp_path / "o" / "results.jsonl").read_text() == before
    # a --limit run of the same file is the same run
    assert CliRunner().invoke(main, base + ["--data", str(d1), "--limit", "1"]).exit_code == 0


def test_runs_compared_by_cache_type(tmp_path, capsys):
    """Two folders that differ only in -ctk/-ctv: labelled by cache type, not
    merged as duplicates, and paired question by question."""
    from grkv_cpp.eval.report import load_runs, main as report_main, paired

    for types, scores in ((None, [100.0, 100.0, 0.0, 0.0]), (("q8_0", "q8_0"), [100.0, 0.0, 0.0, 0.0]),
                          (("q8_0", "f16"), [100.0, 100.0, 100.0, 0.0])):
        d = tmp_path / ("-".join(types) if types else "f16")
        d.mkdir()
        man = {"data": "abc"} | ({"type_k": types[0], "type_v": types[1]} if types else {})
        (d / "run.json").write_text(json.dumps(man))
        rows = [dict(group=g, qid=0, task="t", method=m, ratio=r, mode="agnostic", score=s)
                for g, s in enumerate(scores) for m, r in (("full", 1.0), ("compactor", 0.5))]
        (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dirs = [tmp_path / "f16", tmp_path / "q8_0-q8_0", tmp_path / "q8_0-f16"]
    rows = load_runs(dirs, by_cache=True)
    assert len(rows) == 24
    assert {r["method"] for r in rows} == {f"{m}[{c}]" for m in ("full", "compactor") for c in ("f16", "q8_0", "q8_0-f16")}
    (p,) = paired(rows, "compactor[q8_0]", "compactor[f16]")
    assert (p["n"], p["diff"], p["a_better"], p["b_better"]) == (4, -25.0, 0, 1)
    (p,) = paired(rows, "compactor[q8_0-f16]", "full[f16]")  # a labelled full cache keeps its ratio-1 pairing
    assert (p["ratio"], p["diff"]) == (0.5, 25.0)
    report_main([*map(str, dirs), "--by-cache", "--out", str(tmp_path / "out"), "--paired",
                 "compactor[q8_0]:compactor[f16]"])
    assert "| compactor[q8_0] | compactor[f16] | 0.5 |" in capsys.readouterr().out
