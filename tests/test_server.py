"""`grkv-cpp serve` through the official openai client on localhost: completions,
chat, streaming, document reuse (cached_tokens), bad input, a full queue."""

import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from grkv_cpp import CompressedLlama  # noqa: E402
from grkv_cpp.server import ServerSettings, create_app
from grkv_cpp.server.background import serve_in_thread  # noqa: E402
from grkv_cpp.server.engine import Engine  # noqa: E402

DOC = "abc def ghi jkl mno " * 40


@pytest.fixture(scope="module")
def server(tiny_gguf):
    settings = ServerSettings(model=str(tiny_gguf), n_ctx=1024, method="snapkv", kv_ratio=0.5, min_compress=64,
                              max_queue=1)
    engine = Engine(settings, model=CompressedLlama(tiny_gguf, n_ctx=1024))
    srv, url = serve_in_thread(create_app(settings, engine))
    yield engine, url
    srv.should_exit = True


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0)


def test_models(client, tiny_gguf):
    assert [m.id for m in client.models.list().data] == [tiny_gguf.stem]


def test_completion_then_a_cache_hit_answers_the_same(server, client):
    engine, _ = server
    r1 = client.completions.create(model="x", prompt=DOC + "\n\nQuestion: abc\nAnswer:", max_tokens=6)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r1.usage.completion_tokens <= 6 and r1.choices[0].finish_reason in ("stop", "length")
    r2 = client.completions.create(model="x", prompt=DOC + "\n\nQuestion: abc\nAnswer:", max_tokens=6)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < r2.usage.prompt_tokens
    assert r2.choices[0].text == r1.choices[0].text  # the reused compressed cache answers as the fresh one
    assert engine.cache.hits >= 1


def test_hit_matches_a_fresh_compression_of_the_same_document(server, client, tiny_gguf):
    """What a cache hit answers equals what compress() + the rest answers."""
    prompt = DOC + "\n\nQuestion: ghi\nAnswer:"
    client.completions.create(model="x", prompt=prompt, max_tokens=1)
    hit = client.completions.create(model="x", prompt=prompt, max_tokens=8)
    assert hit.usage.prompt_tokens_details.cached_tokens > 0
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    doc = m.tokenize(DOC + "\n\n", bos=True)
    m.compress_tokens(doc, method="snapkv", ratio=0.5)
    m.feed(m.tokenize("Question: ghi\nAnswer:", bos=False))
    assert "".join(m.generate(8)) == hit.choices[0].text


def test_streaming_chat_matches_non_streaming(client):
    msgs = [{"role": "user", "content": DOC + "\n\nabc def?"}]
    whole = client.chat.completions.create(model="x", messages=msgs, max_tokens=8)
    pieces, usage = [], None
    for ev in client.chat.completions.create(model="x", messages=msgs, max_tokens=8, stream=True):
        if ev.choices and ev.choices[0].delta.content:
            pieces.append(ev.choices[0].delta.content)
        usage = ev.usage or usage
    assert "".join(pieces).strip() == whole.choices[0].message.content
    assert usage is not None and usage.prompt_tokens_details.cached_tokens > 0  # the second call reused the doc


def test_per_request_compression_is_validated(client, server):
    for bad in ({"method": "h2o"}, {"kv_ratio": 0}, {"kv_ratio": -1}, {"kv_ratio": 2.0}, {"kv_budget": 0},
                {"kv_ratio": 0.5, "kv_budget": 8}, {"unknown": 1}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="x", prompt=DOC + "\n\nq", max_tokens=2, extra_body={"grkv": bad})
    r = client.completions.create(model="x", prompt=DOC + "\n\nq", max_tokens=2,
                                  extra_body={"grkv": {"method": "knorm", "kv_budget": 64}})
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # other settings: another cache entry


def test_bad_bodies_and_long_prompts_get_400_and_the_server_lives(server, client):
    url = server[1]
    for body in (b"{", b"[]", b'{"prompt": ""}', b'{"prompt": "   "}', b'{"prompt": 3}',
                 b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "temperature": "hot"}'):
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400
    with pytest.raises(openai.BadRequestError, match="do not fit"):
        client.completions.create(model="x", prompt="word " * 3000 + "\n\nq", max_tokens=4)
    assert client.completions.create(model="x", prompt="abc def", max_tokens=2).usage.completion_tokens <= 2


def test_full_queue_answers_503_with_retry_after(server):
    engine, url = server
    engine._admit()  # one request holds the model...
    waiter = threading.Thread(target=engine._admit)  # ...and one waits (max_queue=1)
    waiter.start()
    for _ in range(100):
        if engine._pending == 2:
            break
        time.sleep(0.01)
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        engine._release()
        waiter.join()
        engine._release()
    assert httpx.post(url + "/v1/completions", json={"prompt": "abc", "max_tokens": 1}).status_code == 200


def test_cancelled_stream_frees_the_model(server, client):
    engine, url = server
    with httpx.stream("POST", url + "/v1/completions",
                      json={"prompt": DOC + "\n\nQuestion: x\nAnswer:", "max_tokens": 200, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break  # go away after the first piece
    for _ in range(100):
        if engine._pending == 0:
            break
        time.sleep(0.05)
    assert engine._pending == 0 and not engine._lock.locked()
    assert client.completions.create(model="x", prompt="abc", max_tokens=1).usage.completion_tokens <= 1


@pytest.mark.slow
def test_smollm2_chat_reuses_the_document_and_finds_the_facts(smollm2_gguf):
    from grkv_cpp.texts import demo_context

    context, needles = demo_context()
    settings = ServerSettings(model=str(smollm2_gguf), n_ctx=2048, method="compactor", kv_ratio=0.5)
    srv, url = serve_in_thread(create_app(settings))
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        found, cached = 0, []
        for nd in needles:
            r = client.chat.completions.create(model="m", max_tokens=16,
                                               messages=[{"role": "user", "content": f"{context}\n\n{nd.question}"}])
            found += nd.answer in r.choices[0].message.content
            cached.append(r.usage.prompt_tokens_details.cached_tokens)
            assert r.choices[0].finish_reason in ("stop", "length")
        assert cached[0] == 0 and all(c > 0 for c in cached[1:])  # compressed once, reused after
        assert found >= 2
    finally:
        srv.should_exit = True
