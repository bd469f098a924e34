"""compress_llama: an unchanged llama_cpp.Llama whose cache is compressed after each prefill."""

import llama_cpp
import pytest

from grkv_cpp import CompressedLlama, kvstate
from grkv_cpp.dropin import cells, compress_llama
from grkv_cpp.errors import BadRequestError

DOC = "abc def ghi jkl mno " * 40


@pytest.fixture()
def llm(tiny_gguf):
    return llama_cpp.Llama(str(tiny_gguf), n_ctx=1024, verbose=False, seed=0)


def test_completion_runs_on_the_compressed_cache_as_compress_tokens_does(llm, tiny_gguf):
    st = compress_llama(llm, method="knorm", ratio=0.5, min_tokens=64)
    prompt = DOC + "\n\nQuestion: abc\nAnswer:"
    tokens = llm.tokenize(prompt.encode())
    ids = []
    for t in llm.generate(tokens, temp=0.0, top_k=1):  # what create_completion runs
        ids.append(t)
        if len(ids) == 8:
            break
    assert st.compressions == 1 and st.last_cells == (len(tokens), round(0.5 * len(tokens)))
    m = CompressedLlama(tiny_gguf, n_ctx=1024)
    m.compress_tokens(tokens, method="knorm", ratio=0.5)
    ours = []
    for _ in range(8):
        ours.append(m._next_token(0.0, 1.0))
        m._step(ours[-1])
    assert ours == ids
    again = llm.create_completion(prompt, max_tokens=4, temperature=0.0)  # the same prompt: prefilled again
    assert st.refills == 1 and st.compressions == 2 and again["choices"][0]["text"]


def test_a_prompt_diverging_inside_the_compressed_region_is_prefilled_again(llm):
    st = compress_llama(llm, method="knorm", ratio=0.5, min_tokens=64)
    llm.create_completion(DOC + "\n\nQuestion: abc\nAnswer:", max_tokens=4, temperature=0.0)
    assert st.compressions == 1 and st.refills == 0
    a2 = llm.create_completion(DOC + "\n\nQuestion: xyz\nAnswer:", max_tokens=4, temperature=0.0)
    assert st.refills == 1 and st.compressions == 2  # never answered from the remnant
    fresh = llama_cpp.Llama(llm.model_path, n_ctx=1024, verbose=False, seed=0)
    compress_llama(fresh, method="knorm", ratio=0.5, min_tokens=64)
    b2 = fresh.create_completion(DOC + "\n\nQuestion: xyz\nAnswer:", max_tokens=4, temperature=0.0)
    assert a2["choices"][0]["text"] == b2["choices"][0]["text"]


def test_extending_the_compressed_prompt_reuses_it(llm):
    st = compress_llama(llm, method="streaming", ratio=0.5, min_tokens=64)
    p1 = DOC + "\n\nQuestion: abc\nAnswer:"
    a1 = llm.create_completion(p1, max_tokens=3, temperature=0.0)["choices"][0]["text"]
    before = cells(llm)
    llm.create_completion(p1 + a1 + "\nQuestion: def\nAnswer:", max_tokens=3, temperature=0.0)
    assert st.compressions == 1 and st.refills == 0 and cells(llm) > before


def test_refusals(llm):
    with pytest.raises(BadRequestError, match="exactly one"):
        compress_llama(llm, method="knorm", ratio=0.5, budget=10)
    with pytest.raises(ValueError, match="unknown method"):
        compress_llama(llm, method="h2o")
    compress_llama(llm, method="knorm")
    with pytest.raises(BadRequestError, match="already"):
        compress_llama(llm, method="knorm")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_chat_completion_on_both_models(name, smollm2_gguf, gemma3_gguf):
    from grkv_cpp.apply import patched_library
    from grkv_cpp.texts import demo_context

    path = {"smollm2": smollm2_gguf, "gemma3": gemma3_gguf}[name]
    context, needles = demo_context()
    method = "compactor" if patched_library() else "knorm"

    def ask(llm, q):
        msgs = [{"role": "user", "content": f"{context}\n\n{q}"}]
        return llm.create_chat_completion(messages=msgs, max_tokens=12, temperature=0.0)["choices"][0]["message"]

    llm = llama_cpp.Llama(str(path), n_ctx=2048, verbose=False, seed=0)
    st = compress_llama(llm, method=method, ratio=0.5)
    a1 = ask(llm, needles[0].question)
    assert st.compressions == 1 and st.last_cells[1] == round(0.5 * st.last_cells[0]) and a1["content"]
    a2 = ask(llm, needles[1].question)  # diverges inside the compressed region
    assert st.refills == 1 and st.compressions == 2
    fresh = llama_cpp.Llama(str(path), n_ctx=2048, verbose=False, seed=0)
    compress_llama(fresh, method=method, ratio=0.5)
    assert ask(fresh, needles[1].question)["content"] == a2["content"]
