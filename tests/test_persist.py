"""Compressed contexts saved to disk and loaded back (grkv_cpp.persist)."""

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from grkv_cpp import CompressedLlama, kvstate, persist
from grkv_cpp.cli import main
from grkv_cpp.persist import ContextFileError

from tiny_model import write_tiny_llama

CONTEXT = "abc def ghi jkl mno " * 30


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return CompressedLlama(tiny_gguf, n_ctx=1024)


def _saved(tiny, tmp_path):
    st = tiny.compress(CONTEXT, method="snapkv", ratio=0.5)
    path = tmp_path / "ctx.grkv"
    size = tiny.save(path)
    return st, path, size


def test_save_load_restores_the_same_cache_and_answers(tiny, tmp_path):
    st, path, size = _saved(tiny, tmp_path)
    blob = kvstate.get_blob(tiny.ctx)
    answers = [tiny.ask(q, max_tokens=6) for q in ("abc", "ghi jkl")]
    assert size == path.stat().st_size and len(blob) < size < len(blob) + 64 * 1024
    tiny.compress("zzz yyy " * 40, method="knorm", ratio=0.5)  # something else in the cache
    loaded = tiny.load(path)
    assert kvstate.get_blob(tiny.ctx) == blob  # byte-identical cache
    assert loaded.kv_cells_after == st.kv_cells_after and loaded.context_tokens == st.context_tokens
    assert [tiny.ask(q, max_tokens=6) for q in ("abc", "ghi jkl")] == answers


def test_a_second_model_instance_loads_it(tiny, tiny_gguf, tmp_path):
    _, path, _ = _saved(tiny, tmp_path)
    want = tiny.ask("abc", max_tokens=6)
    other = CompressedLlama(tiny_gguf, n_ctx=512)
    other.load(path)
    assert other.ask("abc", max_tokens=6) == want


def test_header_records_identity_and_settings(tiny, tmp_path):
    _, path, _ = _saved(tiny, tmp_path)
    h = persist.read(path).header
    assert h["format"] == persist.FORMAT_VERSION and h["llama_cpp"] == persist.LLAMA_CPP_COMMIT
    assert h["model_sha256"] == persist.model_identity(tiny.model_path)
    assert (h["type_k"], h["type_v"]) == ("f16", "f16")
    assert h["compression"]["method"] == "snapkv" and h["compression"]["ratio"] == 0.5
    assert h["cells"] < h["context_tokens"] == len(persist.read(path).tokens)


def _corruptions(data: bytes):
    yield "empty", b""
    yield "not a context file", b"GGUF" + data[4:]
    yield "truncated", data[: len(data) // 2]
    yield "one byte short", data[:-1]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    yield "bit flip", bytes(flipped)
    old = bytearray(data)
    old[8:12] = struct.pack("<I", 0)
    yield "old version", bytes(old)


@pytest.mark.parametrize("case", [c for c, _ in _corruptions(b"x" * 64)])
def test_bad_files_are_refused_and_the_context_kept(tiny, tmp_path, case):
    _, path, _ = _saved(tiny, tmp_path)
    data = path.read_bytes()
    bad = dict(_corruptions(data))[case]
    before = kvstate.get_blob(tiny.ctx)
    answer = tiny.ask("abc", max_tokens=4)
    (tmp_path / "bad.grkv").write_bytes(bad)
    with pytest.raises(ContextFileError):
        tiny.load(tmp_path / "bad.grkv")
    assert kvstate.get_blob(tiny.ctx) == before and tiny.ask("abc", max_tokens=4) == answer


def test_another_model_or_cache_type_is_refused(tiny, tmp_path):
    _, path, _ = _saved(tiny, tmp_path)
    other_gguf = write_tiny_llama(tmp_path / "other.gguf", seed=123)
    other = CompressedLlama(other_gguf, n_ctx=512)
    with pytest.raises(ContextFileError, match="another model"):
        other.load(path)
    f32 = CompressedLlama(tiny.model_path, n_ctx=512, type_k="f32", type_v="f32")
    with pytest.raises(ContextFileError, match="K cache type"):
        f32.load(path)
    with pytest.raises(ContextFileError, match="not found"):
        tiny.load(tmp_path / "missing.grkv")


def test_nothing_to_save_is_an_error(tiny_gguf):
    fresh = CompressedLlama(tiny_gguf, n_ctx=256)
    with pytest.raises(Exception, match="no context to save"):
        fresh.save("/tmp/never.grkv")


def test_parser_bounds_random_bytes():
    rng = np.random.default_rng(0)
    good = persist.SavedContext({"a": 1}, np.arange(5, dtype=np.uint32), b"blob").to_bytes()
    assert persist.from_bytes(good).blob == b"blob"
    for _ in range(300):
        n = int(rng.integers(0, len(good) + 8))
        data = bytearray(good[:n]) if rng.random() < 0.5 else bytearray(rng.integers(0, 256, n, dtype=np.uint8))
        if data and rng.random() < 0.5:
            data[int(rng.integers(0, len(data)))] ^= 1 << int(rng.integers(0, 8))
        try:
            persist.from_bytes(bytes(data))
        except ContextFileError:
            pass


def test_cli_save_then_load(tiny_gguf, tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    f = tmp_path / "c.grkv"
    r = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--context-file", str(ctx), "--question", "abc",
                                  "--method", "snapkv", "--save-context", str(f), "--max-tokens", "4", "--json"])
    assert r.exit_code == 0, r.output
    r2 = CliRunner().invoke(main, ["ask", "--model", str(tiny_gguf), "--load-context", str(f), "--question", "abc",
                                   "--max-tokens", "4", "--json"])
    assert r2.exit_code == 0, r2.output
    def answer(out):
        return json.loads(out[out.index("{"):])["results"][0]["answer"]

    assert answer(r.output) == answer(r2.output)


def test_short_context_is_kept_whole_with_a_note(tiny):
    st = tiny.compress("abc def", method="snapkv", ratio=0.5)
    assert st.method == "full" and "kept whole" in st.note
    assert st.kv_cells_after == st.context_tokens
    tiny.ask("abc", max_tokens=2)
