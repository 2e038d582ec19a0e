"""Text out of a token stream: incremental detokenization and stop strings.

:class:`IncrementalDecoder` turns token ids into text pieces as they arrive. It decodes a short
window of recent tokens twice (without and with the new one) and emits the difference, and holds
text back while it ends in U+FFFD: with byte-level BPE one character may span several tokens, and
a piece never ends inside a character. :meth:`IncrementalDecoder.flush` releases what is held at
the end (bytes that never formed a character decode as U+FFFD, as a full decode gives them), so
the pieces joined always equal ``decode(all_ids)``.

:class:`StopMatcher` cuts the text at the first stop string. It holds back the longest tail that
could still begin one, so no piece ever contains part of a stop string; the text returned never
contains the stop string itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..errors import InputError

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Token ids in, text pieces out; the pieces joined equal ``decode(ids)`` once :meth:`flush` ran."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here (a clean character boundary)
        self._read = 0  # text of ids[_prefix:_read] was emitted

    def push(self, token_id: int) -> str:
        """Add one token; returns the text it completes ("" while a character is still incomplete)."""
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (incomplete bytes become U+FFFD, as in a full decode)."""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return after[len(before):]


def check_stop(stop: str | Iterable[str] | None, name: str = "stop") -> tuple[str, ...]:
    """``stop`` as a tuple of non-empty strings (None → ()); :class:`InputError` otherwise."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise InputError(f"{name} must be a string or a list of strings, got {type(stop).__name__}; "
                         "e.g. stop=['\\n\\n']")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InputError(f"{name} must hold non-empty strings, got {s!r}; drop it or give the text to stop at")
    return tuple(dict.fromkeys(stop))


class StopMatcher:
    """Cut a stream of text pieces at the first of ``stops``; :meth:`feed` returns ``(safe_text, stopped)``."""

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(stops)
        self._pending = ""
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        text = self._pending + piece
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            i, self.matched = min(hits)
            self._pending = ""
            return text[:i], True
        keep = self._partial(text)
        self._pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail at the end of the stream (no stop string followed)."""
        out, self._pending = self._pending, ""
        return out

    def _partial(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
