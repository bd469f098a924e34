"""Argument checks and labels shared by the prefill and compression paths."""

from __future__ import annotations

import dataclasses

from .errors import BadRequestError, GrkvError
from .methods import Method


def label(method: Method, merge, shared: bool) -> str:
    name = getattr(method, "label", method.name)
    return name + (f"+{merge.name}" if merge else "") + ("-shared" if shared else "")


def require_window_queries(merge, what: str, reread_ok: bool = False):
    """GRKV's stratified queries need capture over the whole prefill, which
    chunked, restored and decode-time compressions do not have (a restored
    state can still run the re-read pass for GRKV's reread queries)."""
    mode = getattr(merge, "query_mode", "window") if merge is not None else "window"
    if mode != "window" and not (reread_ok and mode == "reread"):
        raise GrkvError(f"{what} supports GRKV's window queries only")


def require_window_fits(window: int, budget: int):
    """The protected window is always kept: a smaller budget cannot hold it."""
    if window > budget:
        raise BadRequestError(f"the protected window ({window}) does not fit the budget ({budget})")


def default_method(method, query_aware: bool):
    """No method given: Compactor scores a context best without its question
    (docs/results.md); with the question in the window, SnapKV."""
    if method is not None:
        return method
    return "snapkv" if query_aware else "compactor"


def jsonable_params(params: dict) -> dict:
    """Method parameters as JSON values (a context file's header)."""
    return {k: (v if isinstance(v, (bool, int, float, str, type(None))) else repr(v)) for k, v in params.items()}


def needs_reread(m: Method, merge) -> bool:
    return m.reread or getattr(merge, "query_mode", "") == "reread"


def widen_to_question(m: Method, n_question: int) -> Method:
    """Query-aware: the whole question sits inside the observation window."""
    if n_question and m.needs_queries and not m.context_scorer and n_question > m.window:
        return dataclasses.replace(m, window_size=n_question)
    return m
