"""Generation over the (compressed) cache: sampling, streaming answers to
questions, teacher-forced log-probabilities and logits, and the switch for
decode-time compression (its schedule lives in decode_compression.py)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import numpy as np
import llama_cpp.llama_cpp as L

from . import decode_compression, kvstate
from .capture import QUERIES
from .errors import GrkvError
from .methods import Method


class Generation:
    """ask / generate / logprobs (a mixin of CompressedLlama)."""

    def continuation_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced logits [len(tokens), n_vocab] (float32): row i is
        the next-token distribution after the current sequence + tokens[:i+1]
        (so rows predict tokens[1:] and one more). The tokens are evaluated in
        batches over the current cache and removed again."""
        if self._decode is not None:
            raise GrkvError("continuation_logits evaluates in batches; switch decode compression off first")
        llm = self.llm
        n_vocab = llm.n_vocab()
        self._check_room(self._live + len(tokens))
        out = np.empty((len(tokens), n_vocab), np.float32)
        start = llm.n_tokens
        try:
            body = list(tokens)
            for i in range(0, len(body), llm.n_batch):
                piece = body[i: i + llm.n_batch]
                llm._batch.set_batch(batch=piece, n_past=llm.n_tokens, logits_all=True)
                llm._ctx.decode(llm._batch)
                llm.n_tokens += len(piece)
                self._live += len(piece)
                z = np.ctypeslib.as_array(L.llama_get_logits(self.ctx), shape=(len(piece), n_vocab))
                out[i: i + len(piece)] = z
        finally:
            kvstate.remove_from(self.ctx, start)
            self._live -= llm.n_tokens - start
            llm.n_tokens = start
        return out

    def _next_token(self, temperature: float, top_p: float) -> int:
        logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.llm.n_vocab(),))
        if temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p)
            cut = np.searchsorted(np.cumsum(p[order]), top_p) + 1
            mask = np.zeros_like(p)
            mask[order[:cut]] = 1
            p = p * mask / (p * mask).sum()
        return int(self.rng.choice(len(p), p=p))

    def generate(self, max_tokens: int = 64, *, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), ignore_eos: bool = False) -> Iterator[str]:
        """Stream text pieces continuing the current sequence (`ignore_eos`:
        run to max_tokens, as decode benchmarks do)."""
        t0 = time.perf_counter()
        out = b""
        emitted = 0
        n = 0
        self.finish_reason = "length"
        policy = self._decode
        if policy:  # queries of every generated token are kept until the next compression
            self.capture.set_targets([QUERIES])
        try:
            for n in range(1, max_tokens + 1):
                tok = self._next_token(temperature, top_p)
                if not ignore_eos and L.llama_vocab_is_eog(self.vocab, tok):
                    n -= 1
                    self.finish_reason = "stop"
                    break
                out += self.llm.detokenize([tok])
                text = out.decode("utf-8", errors="ignore")
                hit = [text.find(s) for s in stop if s and s in text]
                if hit:
                    cut = min(hit)
                    if cut > emitted:
                        yield text[emitted:cut]
                    emitted = cut
                    self.finish_reason = "stop"
                    break
                if len(text) > emitted:  # a character split across tokens shows once complete
                    yield text[emitted:]
                    emitted = len(text)
                if n == max_tokens:
                    break
                self._step(tok)
        finally:
            self.stats.decode_s += time.perf_counter() - t0
            self.stats.generated_tokens += n

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """Teacher-forced: the log-probability of each of `tokens` continuing
        the current sequence, fed one at a time as generation would (so
        decode-time compression runs on its schedule). The tokens stay in
        the cache. Float64, one value per token."""
        out = np.empty(len(tokens))
        if self._decode:
            self.capture.set_targets([QUERIES])
        for i, tok in enumerate(tokens):
            z = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.llm.n_vocab(),))
            z = z.astype(np.float64)
            m = z.max()
            out[i] = z[tok] - m - np.log(np.exp(z - m).sum())
            self._step(tok)
        return out

    def _step(self, tok: int):
        """Decode one generated token; with decode compression on, capture its
        queries and compress when the schedule says so."""
        self._check_room(self._live + 1)
        policy = self._decode
        if policy is None:
            self._eval([tok])
            return
        with self.capture.enabled(clear=self._decode_since == 0):
            self._eval([tok])
        self._decode_since += 1
        self._maybe_compress_decode(policy)

    def ask(self, question: str, *, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
            stop: Sequence[str] | None = None, answer_prefix: str = "", stream: bool = False,
            ignore_eos: bool = False):
        """Answer `question` against the compressed context; the answer's KV is
        removed afterwards so the next question sees the same context.
        `answer_prefix` starts the answer (e.g. "The pass key is"). `stop`:
        strings that end the answer (default: the prompt format's, so a
        plain-text answer ends before a next "Question:")."""
        if self._context_len == 0:
            raise GrkvError("call compress() or prefill() with a context first")
        if stop is None:
            stop = self._format.stop if self._format is not None else ()
        q = self._question_tokens(question, answer_prefix)
        if self._decode is None:
            self._check_room(self._cells + len(q) + max_tokens)
        else:  # decode-time compression rewrites the context's cells: keep them to restore
            self._check_room(self._cells + len(q) + min(max_tokens, self._decode.every))
            saved = (kvstate.get_blob(self.ctx), self._gkv_hist)
        self.stats.question_tokens = len(q)
        self.stats.question_s = self.stats.decode_s = 0.0
        self.stats.generated_tokens = 0

        def run():
            try:
                t0 = time.perf_counter()
                self._eval(q)
                self.stats.question_s = time.perf_counter() - t0
                yield from self.generate(max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                         ignore_eos=ignore_eos)
            finally:
                if self._decode is None:
                    kvstate.remove_from(self.ctx, self._context_len)
                elif not kvstate.set_blob(self.ctx, saved[0]):
                    raise GrkvError("could not restore the context's cache after the answer")
                else:
                    self._gkv_hist = saved[1]
                self.llm.n_tokens = self._context_len
                self._live = self._cells
                self._decode_since = 0

        return run() if stream else "".join(run()).strip()

    def answer_query_aware(self, context: str, question: str, *, max_tokens: int = 64, temperature: float = 0.0,
                           stop: Sequence[str] = (), answer_prefix: str = "", **compress_kw) -> str:
        """Compress with the question inside the observation window, then answer it."""
        self.compress(context, question=question, answer_prefix=answer_prefix, **compress_kw)
        return "".join(self.generate(max_tokens, temperature=temperature, stop=stop)).strip()

    def begin(self, tokens: Sequence[int]):
        """A fresh sequence of raw tokens with the full cache and no saved
        context (a prompt too short to compress); continue with generate()."""
        self._check_room(len(tokens) + 1)
        self._reset()
        self._context_len = self._cells = 0
        self._tokens, self._format, self._settings = [], None, {}
        self._eval(list(tokens))

    def feed(self, tokens: Sequence[int]):
        """Evaluate tokens after the current sequence (a prompt's tail before
        `generate()`)."""
        self._check_room(self._live + len(tokens) + 1)
        self._eval(list(tokens))

    def decode_compression(self, budget: int | None, *, every: int = 128, method: str | Method = "gkv",
                           **params):
        """Re-compress the cache to `budget` cells every `every` generated
        tokens (G-KV's schedule; None switches it off), so a long generation
        holds at most budget + every cells. The method scores with the last
        generated tokens' queries (`gkv`: global score with history, the
        default; `snapkv`, `knorm`, ... work too); its window is protected."""
        self._decode = decode_compression.policy(budget, every, method, **params)
        self._decode_since = 0

    def _maybe_compress_decode(self, p: "decode_compression.DecodePolicy"):
        decode_compression.maybe_compress(self, p)
