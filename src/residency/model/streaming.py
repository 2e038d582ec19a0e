"""Streams of generated text and their results.

A :class:`TextStream` runs one generation lazily: iterating it yields text pieces as tokens are
decoded (:class:`~residency.model.detokenize.IncrementalDecoder`, so no piece ends inside a UTF-8
character), cut at the first stop string (:class:`~residency.model.detokenize.StopMatcher`); an end
token stops it too and is not shown. :meth:`TextStream.cancel` (from any thread) stops it before the
next token. When it ends, ``result`` holds the whole text, the generated token ids (the end token
included), the finish reason (``"stop"``, ``"length"`` or ``"cancelled"``) and the token counts.

A :class:`ChatStream` wraps a text stream with the reasoning split
(:class:`~residency.model.reasoning.ReasoningSplitter`) and yields :class:`ChatDelta` pieces;
its ``result`` is a :class:`ChatResult`. Not iterating a stream at all runs nothing; ``read()``
runs it to the end. Joined, the pieces of a stream are exactly what the non-streamed call returns,
because that call is the same stream read to the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .detokenize import IncrementalDecoder, StopMatcher
from .reasoning import CONTENT, REASONING, ReasoningSplitter


@dataclass
class GenerationResult:
    """One finished generation: ``text`` (stop string and end token excluded) and its bookkeeping."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    stopped_by: str | int | None = None  # the stop string or end-token id that ended it

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def __str__(self) -> str:
        return self.text


@dataclass
class ChatResult:
    """One chat reply: ``content`` (the answer) and ``reasoning`` (the thinking trace), split as the
    template marks the thinking span; ``text`` is the raw generated text with the markers."""

    content: str
    reasoning: str
    text: str
    finish_reason: str
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    prompt: str = ""
    stopped_by: str | int | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def message(self) -> dict[str, Any]:
        """The reply as a message to append to the history."""
        out: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning:
            out["reasoning_content"] = self.reasoning
        return out

    def __str__(self) -> str:
        return self.content


@dataclass(frozen=True)
class ChatDelta:
    """A piece of a streamed chat reply: reasoning text or content text (one of them is non-empty)."""

    reasoning: str = ""
    content: str = ""

    @property
    def text(self) -> str:
        return self.reasoning or self.content


TokenSource = Callable[[threading.Event], Iterator[int]]


class TextStream:
    """Text pieces of one generation; see the module docstring."""

    def __init__(self, tokens: TokenSource, decode: Callable[[list[int]], str], *, end_ids: Iterable[int] = (),
                 stop: Iterable[str] = (), prompt_tokens: int = 0) -> None:
        self._tokens = tokens
        self._decode = decode
        self.end_ids = frozenset(int(i) for i in end_ids)
        self.stop = tuple(stop)
        self.prompt_tokens = prompt_tokens
        self.result: GenerationResult | None = None
        self._cancel = threading.Event()
        self._gen = self._run()

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def cancel(self) -> None:
        """Stop before the next token (safe from another thread); the stream then ends as ``"cancelled"``."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def close(self) -> None:
        """Stop now (from the consuming thread); ``result`` keeps what was generated."""
        self._gen.close()

    def read(self) -> GenerationResult:
        """Run to the end; the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> Iterator[str]:
        decoder = IncrementalDecoder(self._decode)
        stops = StopMatcher(self.stop)
        ids: list[int] = []
        parts: list[str] = []
        reason: str | None = None
        stopped_by: str | int | None = None
        tokens = self._tokens(self._cancel)
        try:
            cut = False
            for tok in tokens:
                ids.append(int(tok))
                if tok in self.end_ids:
                    reason, stopped_by = "stop", int(tok)
                    break
                piece, cut = stops.feed(decoder.push(tok))
                if piece:
                    parts.append(piece)
                    yield piece
                if cut:
                    reason, stopped_by = "stop", stops.matched
                    break
            else:
                reason = "cancelled" if self._cancel.is_set() else "length"
            if not cut:
                piece, cut = stops.feed(decoder.flush())
                if cut:
                    reason, stopped_by = "stop", stops.matched
                else:
                    piece += stops.flush()
                if piece:
                    parts.append(piece)
                    yield piece
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            self.result = GenerationResult("".join(parts), ids, reason or "cancelled", self.prompt_tokens, stopped_by)


class ChatStream:
    """:class:`ChatDelta` pieces of one chat reply; ``result`` is the :class:`ChatResult` once it ends.

    ``force_nonempty_content``: when the reply never left the thinking span (no content), the
    reasoning is given as the content too (one last content piece), so the answer is never empty.
    """

    def __init__(self, text: TextStream, *, prompt: str, in_reasoning: bool,
                 force_nonempty_content: bool = False) -> None:
        self.text_stream = text
        self.prompt = prompt
        self.in_reasoning = in_reasoning
        self.force_nonempty_content = force_nonempty_content
        self.result: ChatResult | None = None
        self._gen = self._run()

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> ChatDelta:
        return next(self._gen)

    def cancel(self) -> None:
        self.text_stream.cancel()

    @property
    def cancelled(self) -> bool:
        return self.text_stream.cancelled

    @property
    def prompt_tokens(self) -> int:
        return self.text_stream.prompt_tokens

    def close(self) -> None:
        self._gen.close()

    def read(self) -> ChatResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _run(self) -> Iterator[ChatDelta]:
        splitter = ReasoningSplitter(self.in_reasoning)
        parts: dict[str, list[str]] = {REASONING: [], CONTENT: []}

        def delta(kind: str, text: str) -> ChatDelta:
            parts[kind].append(text)
            return ChatDelta(reasoning=text) if kind == REASONING else ChatDelta(content=text)

        try:
            for piece in self.text_stream:
                for kind, text in splitter.feed(piece):
                    yield delta(kind, text)
            for kind, text in splitter.finish():
                yield delta(kind, text)
            if self.force_nonempty_content and not parts[CONTENT] and parts[REASONING]:
                yield delta(CONTENT, "".join(parts[REASONING]))
        finally:
            self.text_stream.close()
            base = self.text_stream.result
            assert base is not None
            self.result = ChatResult(
                content="".join(parts[CONTENT]), reasoning="".join(parts[REASONING]), text=base.text,
                finish_reason=base.finish_reason, prompt_tokens=base.prompt_tokens, token_ids=base.token_ids,
                prompt=self.prompt, stopped_by=base.stopped_by,
            )
