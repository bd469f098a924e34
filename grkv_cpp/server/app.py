"""The routes: /v1/completions, /v1/chat/completions (SSE streaming or not),
/v1/models, and /health with the document cache's counters."""

from __future__ import annotations

import json
import time
import uuid
import weakref
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from . import errors
from .engine import Engine, Job
from .settings import ServerSettings
from .types import ChatCompletionRequest, CompletionRequest


def create_app(settings: ServerSettings, engine: Engine | None = None) -> FastAPI:
    engine = engine or Engine(settings)
    model_id = settings.alias or Path(settings.model).stem
    app = FastAPI(title="grkv-cpp", description="OpenAI-compatible server with compressed, reused KV caches")
    app.state.engine = engine
    errors.install(app)

    def _stream(job: Job, chunk) -> StreamingResponse:
        async def events():
            try:
                async for piece in iterate_in_threadpool(job.pieces()):
                    yield f"data: {json.dumps(chunk(piece, None))}\n\n"
                last = chunk("", job.finish_reason)
                last["usage"] = job.usage
                yield f"data: {json.dumps(last)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # a client that went away frees the model at once
                job.cancel.set()
                await run_in_threadpool(job.release)

        body = events()
        # a client gone before the first chunk never starts the generator, so its
        # finally never runs: release the model when the generator is dropped
        weakref.finalize(body, job.release)
        return StreamingResponse(body, media_type="text/event-stream")

    def _run(job: Job) -> str:
        return "".join(job.pieces())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "grkv-cpp"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompt = engine.split_completion(req.prompt)
        job = await run_in_threadpool(engine.start, req, prompt)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            return {"id": rid, "object": "text_completion", "created": created, "model": model_id,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            return _stream(job, chunk)
        text = await run_in_threadpool(_run, job)
        body = chunk(text, job.finish_reason)
        body["usage"] = job.usage
        return body

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest):
        prompt = await run_in_threadpool(engine.render_chat, req)
        job = await run_in_threadpool(engine.start, req, prompt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text, finish):
            delta = {"role": "assistant", "content": text} if finish is None else {}
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        if req.stream:
            return _stream(job, chunk)
        text = await run_in_threadpool(_run, job)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.strip()},
                             "finish_reason": job.finish_reason}],
                "usage": job.usage}

    return app
