"""Argument checks and labels shared by the prefill and compression paths."""

from __future__ import annotations

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
