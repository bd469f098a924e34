"""Turn (context, question) into token lists such that the context's tokens
are a prefix shared by every question: the compressed context is reused."""

from __future__ import annotations

from dataclasses import dataclass

_MARK = "\u0000GRKV_QUESTION\u0000"


@dataclass
class PromptFormat:
    """Context part and question part of one prompt, as text."""

    context_text: str
    question_template: str  # contains "{question}"
    # where an answer ends: a chat template's turn ends with an end-of-generation
    # token (generate() stops there); a plain prompt would run on into the next
    # "Question: ... Answer: ..." otherwise
    stop: tuple[str, ...] = ()


PLAIN_STOP = ("\nQuestion:", "\n\n")


def build_format(context: str, chat_template: str | None, bos: str = "", eos: str = "") -> PromptFormat:
    """Chat models get their own template (user turn = context + question, then
    the generation prompt); base models get a plain completion prompt."""
    if not chat_template:
        return PromptFormat(context_text=f"{context}\n\n", question_template="Question: {question}\nAnswer:",
                            stop=PLAIN_STOP)
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    fmt = Jinja2ChatFormatter(template=chat_template, eos_token=eos, bos_token=bos, add_generation_prompt=True)
    rendered = fmt(messages=[{"role": "user", "content": f"{context}\n\n{_MARK}"}]).prompt
    i = rendered.find(_MARK)
    if i < 0:  # a template that rewrites content; fall back to plain text
        return PromptFormat(context_text=f"{context}\n\n", question_template="Question: {question}\nAnswer:",
                            stop=PLAIN_STOP)
    tail = rendered[i + len(_MARK):].replace("{", "{{").replace("}", "}}")
    return PromptFormat(context_text=rendered[:i], question_template="{question}" + tail)
