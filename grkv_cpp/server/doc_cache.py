"""Compressed documents kept for reuse: an LRU capped in bytes, spilling the
least recently used to context files in a folder when one is given.

A document is found by text: a prompt whose rendered text starts with a
cached document's text (same compression settings) reuses its compressed
cache, and only the rest of the prompt is evaluated. Matching text rather
than tokens keeps the match exact: the document's tokens are the ones it was
compressed with, and the rest is tokenized on its own."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from .. import persist


@dataclass
class Entry:
    key: str                 # settings key
    text: str                # the document's rendered text
    saved: persist.SavedContext | None  # None while spilled to disk
    path: Path | None = None
    nbytes: int = 0


class DocumentCache:
    def __init__(self, max_bytes: int, spill_dir: str | None = None):
        self.max_bytes = max_bytes
        self.spill_dir = Path(spill_dir) if spill_dir else None
        if self.spill_dir:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._entries: OrderedDict[tuple[str, str], Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.spilled = 0

    @property
    def bytes_in_memory(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: str, prompt_text: str) -> Entry | None:
        """The longest cached document of `key` that is a proper prefix of the prompt."""
        with self._lock:
            best = None
            for (k, text), e in self._entries.items():
                if k == key and len(text) < len(prompt_text) and prompt_text.startswith(text):
                    if best is None or len(text) > len(best.text):
                        best = e
            if best is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end((best.key, best.text))
            if best.saved is None:  # spilled: read it back
                best.saved = persist.read(best.path)
                self._bytes += best.nbytes
                self._shrink(keep=best)
            return best

    def put(self, key: str, text: str, saved: persist.SavedContext):
        with self._lock:
            old = self._entries.pop((key, text), None)
            if old is not None and old.saved is not None:
                self._bytes -= old.nbytes
            e = Entry(key, text, saved, nbytes=saved.nbytes)
            self._entries[(key, text)] = e
            self._bytes += e.nbytes
            self._shrink(keep=e)

    def _shrink(self, keep: Entry):
        for k in list(self._entries):
            if self._bytes <= self.max_bytes:
                return
            e = self._entries[k]
            if e is keep or e.saved is None:
                continue
            if self.spill_dir is not None:
                if e.path is None:
                    e.path = self.spill_dir / (hashlib.sha256(f"{k[0]}\0{k[1]}".encode()).hexdigest()[:32] + ".grkv")
                    e.saved.write(e.path)
                    self.spilled += 1
                e.saved = None
            else:
                del self._entries[k]
            self._bytes -= e.nbytes
