"""`grkv-cpp serve`: an OpenAI-compatible HTTP server whose prompts' documents
are compressed once and reused from a byte-capped LRU of compressed contexts.

settings (what the flags set), types (request bodies), errors (OpenAI-style
error bodies), doc_cache (the LRU), engine (one model, one queue), app (routes)."""

from .app import create_app
from .settings import ServerSettings

__all__ = ["create_app", "ServerSettings"]
