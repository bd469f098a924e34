"""One model, one context, one request at a time; the others wait in a
bounded queue. Each request: render the prompt, split off its document,
reuse the document's compressed cache if one is cached (else compress it
and cache it), evaluate the rest, generate."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import BadRequestError, GrkvError
from .doc_cache import DocumentCache
from .errors import QueueFullError
from .settings import ServerSettings
from .types import ChatCompletionRequest, CompletionRequest

_MARK = "\u0000GRKV_TAIL\u0000"


@dataclass
class Prompt:
    """A prompt split into its document (compressed and reused) and the rest."""

    doc_text: str
    tail_text: str
    n_prefix_text: str = ""   # the template's text before the first message (protected sinks)


@dataclass
class Job:
    """A request that holds the model: prepared, then generating."""

    engine: "Engine"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "length"
    cancel: threading.Event = field(default_factory=threading.Event)
    _gen: Iterator[str] | None = None
    _released: bool = False

    def pieces(self) -> Iterator[str]:
        try:
            for piece in self._gen:
                if self.cancel.is_set():
                    break
                yield piece
            m = self.engine.model
            self.completion_tokens = m.stats.generated_tokens
            self.finish_reason = m.finish_reason or "length"
        finally:
            self.release()

    def release(self):
        if not self._released:
            self._released = True
            if self._gen is not None:
                self._gen.close()
            self.engine._release()

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Engine:
    def __init__(self, settings: ServerSettings, model=None):
        from ..llm import CompressedLlama
        from ..loader import quiet

        self.settings = settings
        if model is None:
            with quiet():
                model = CompressedLlama(settings.model, n_ctx=settings.n_ctx, n_gpu_layers=settings.n_gpu_layers,
                                        n_threads=settings.n_threads, type_k=settings.type_k,
                                        type_v=settings.type_v, flash_attn=settings.flash_attn)
        self.model = model
        if settings.decode_budget is not None:
            model.decode_compression(settings.decode_budget, every=settings.decode_every)
        self.cache = DocumentCache(settings.cache_bytes, settings.cache_dir)
        self._lock = threading.Lock()
        self._count = threading.Lock()
        self._pending = 0
        self.requests = self.errors = 0

    # ---------------------------------------------------------------- queue
    def _admit(self):
        with self._count:
            if self._pending > self.settings.max_queue:
                raise QueueFullError(f"{self._pending} requests are running or queued (--max-queue "
                                     f"{self.settings.max_queue}); retry later")
            self._pending += 1
        self._lock.acquire()

    def _release(self):
        self._lock.release()
        with self._count:
            self._pending -= 1

    # --------------------------------------------------------------- prompts
    def _tokenize(self, text: str, bos: bool) -> list[int]:
        return self.model.tokenize(text, bos=bos) if text else []

    def _bos(self) -> tuple[str, str]:
        llm = self.model.llm
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
        return bos, eos

    def render_chat(self, req: ChatCompletionRequest) -> Prompt:
        """The chat template over the messages; the document ends where the
        last message's question begins (its last paragraph when the last
        message is the only one: "document\\n\\nquestion")."""
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        last = msgs[-1]["content"]
        head, tail_q = "", last
        if len(msgs) == 1:
            j = last.rfind("\n\n")
            if j > 0:
                head, tail_q = last[: j + 2], last[j + 2:]
            else:
                head, tail_q = last, ""
        template = self.model.info.chat_template
        if not template:  # a base model: plain turns
            body = "".join(f"{m['content']}\n\n" for m in msgs[:-1])
            return Prompt(body + head, tail_q + "\n")
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        bos, eos = self._bos()
        fmt = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
        marked = msgs[:-1] + [dict(msgs[-1], content=head + _MARK)]
        rendered = fmt(messages=marked).prompt
        i = rendered.find(_MARK)
        if i < 0:
            raise BadRequestError("the model's chat template rewrites message content; cannot split the document")
        first = rendered.find(msgs[0]["content"]) if msgs[0]["content"] else -1
        return Prompt(rendered[:i], tail_q + rendered[i + len(_MARK):], rendered[:first] if first > 0 else "")

    @staticmethod
    def split_completion(prompt: str) -> Prompt:
        j = prompt.rfind("\n\n")
        if j > 0:
            return Prompt(prompt[: j + 2], prompt[j + 2:])
        return Prompt(prompt, "")

    # ---------------------------------------------------------------- serving
    def _compression(self, req) -> tuple[str, float | None, int | None]:
        s = self.settings
        g = req.grkv
        method = (g.method if g and g.method else None) or s.method
        ratio, budget = s.kv_ratio, s.kv_budget
        if g and (g.kv_ratio is not None or g.kv_budget is not None):
            ratio, budget = g.kv_ratio, g.kv_budget
        return method, ratio, budget

    def start(self, req, prompt: Prompt) -> Job:
        """Take the model (or raise QueueFullError), prepare the sequence and
        return a Job whose pieces() generate; errors before generation
        release the model and propagate (the route answers 400)."""
        self._admit()
        job = Job(self)
        self.requests += 1
        try:
            self._prepare(job, req, prompt)
        except BaseException:
            self.errors += 1
            job.release()
            raise
        return job

    def _prepare(self, job: Job, req, prompt: Prompt):
        m = self.model
        s = self.settings
        method, ratio, budget = self._compression(req)
        key = json.dumps([method, ratio, budget])
        max_tokens = req.max_tokens or s.max_tokens
        full_text = prompt.doc_text + prompt.tail_text
        bos, _ = self._bos()
        add_bos = not (bos and full_text.startswith(bos))
        entry = self.cache.lookup(key, full_text) if method != "full" else None
        if entry is not None:
            m.restore_context(entry.saved)
            tail = self._tokenize(full_text[len(entry.text):], bos=False)
            job.cached_tokens = len(entry.saved.tokens)
        else:
            doc = self._tokenize(prompt.doc_text, bos=add_bos)
            tail = self._tokenize(prompt.tail_text, bos=False)
            if not tail:  # nothing after the document: its last token starts the answer
                doc, tail = doc[:-1], doc[-1:]
            if method != "full" and len(doc) >= s.min_compress:
                m._check_room(len(doc) + 1)
                n_prefix = min(len(self._tokenize(prompt.n_prefix_text, bos=add_bos)), len(doc) - 1)
                m.compress_tokens(doc, n_prefix=n_prefix, method=method, ratio=ratio, budget=budget)
                if prompt.tail_text:  # the document ends on a text boundary: reusable
                    self.cache.put(key, prompt.doc_text, m.snapshot())
            else:
                m.begin(doc)
            job.cached_tokens = 0
            job.prompt_tokens = len(doc) + len(tail)
        if entry is not None:
            job.prompt_tokens = len(entry.saved.tokens) + len(tail)
        room = m._live + len(tail) + (max_tokens if m._decode is None else min(max_tokens, m._decode.every))
        if room > m.n_ctx:
            raise GrkvError(f"the prompt ({job.prompt_tokens} tokens, {m._live} cells after compression) plus "
                            f"max_tokens {max_tokens} needs {room} cells; the context has {m.n_ctx} (-c)")
        m.feed(tail)
        m.stats.generated_tokens = 0
        stops = list(req.stops)
        job._gen = m.generate(max_tokens, temperature=req.temperature, top_p=req.top_p, stop=stops)

    def stats(self) -> dict:
        c = self.cache
        looked = c.hits + c.misses
        return {"requests": self.requests, "errors": self.errors, "cache_entries": len(c),
                "cache_bytes": c.bytes_in_memory, "cache_hits": c.hits, "cache_misses": c.misses,
                "cache_hit_rate": c.hits / looked if looked else 0.0, "spilled": c.spilled,
                "queued": self._pending, "time": time.time()}
