"""Split generated text into the reasoning trace and the answer, as the chat template marks them.

Nemotron 3 templates open the thinking span in the prompt (the generation prompt ends with
``<think>`` and a newline) when thinking is on, and close it there (``<think></think>``) when it is
off. :func:`prompt_opens_reasoning` reads which from the rendered prompt: generation starts inside
the span when the prompt's last ``<think>`` comes after its last ``</think>``. From there:

- inside the span, text up to ``</think>`` is reasoning and the rest is content;
- outside it, a reply that opens with ``<think>`` (after optional whitespace) is read the same way,
  and any other reply is all content;
- a span never closed (the length limit hit while thinking) leaves everything in the reasoning;
- the content's leading whitespace (the newlines after ``</think>``) is dropped; the markers
  themselves are in neither part.

:class:`ReasoningSplitter` does this on a stream of text pieces, holding back a tail that could
still be the start of a marker, so a marker split over two tokens is still found and never shows;
:func:`split_reasoning` is the same on a whole text.
"""

from __future__ import annotations

THINK_START, THINK_END = "<think>", "</think>"
REASONING, CONTENT = "reasoning", "content"


def prompt_opens_reasoning(prompt: str, start: str = THINK_START, end: str = THINK_END) -> bool:
    """Whether generation after ``prompt`` starts inside the thinking span the template opened."""
    opened = prompt.rfind(start)
    return opened >= 0 and opened > prompt.rfind(end)


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningSplitter:
    """Feed text pieces, get ``(kind, text)`` pieces back, kind ``"reasoning"`` or ``"content"``."""

    def __init__(self, in_reasoning: bool, *, start: str = THINK_START, end: str = THINK_END) -> None:
        self.start, self.end = start, end
        self.mode = REASONING if in_reasoning else "opening"
        self._buf = ""
        self._content_started = False

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.mode == "opening":
                stripped = self._buf.lstrip()
                if stripped.startswith(self.start):
                    self._buf, self.mode = stripped[len(self.start):], REASONING
                    continue
                if self.start.startswith(stripped):  # empty, or could still become the marker
                    break
                self.mode = CONTENT
                continue
            if self.mode == REASONING:
                i = self._buf.find(self.end)
                if i >= 0:
                    self._emit(out, REASONING, self._buf[:i])
                    self._buf, self.mode = self._buf[i + len(self.end):], CONTENT
                    continue
                keep = _partial(self._buf, self.end)
                self._emit(out, REASONING, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                break
            # content
            if not self._content_started:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._content_started = True
            self._emit(out, CONTENT, self._buf)
            self._buf = ""
            break
        return out

    def finish(self) -> list[tuple[str, str]]:
        """What is still held at the end of the text."""
        out: list[tuple[str, str]] = []
        rest, self._buf = self._buf, ""
        if self.mode == REASONING:
            self._emit(out, REASONING, rest)
        elif self._content_started:
            self._emit(out, CONTENT, rest)
        else:
            self._emit(out, CONTENT, rest.lstrip())
        return out

    @staticmethod
    def _emit(out: list[tuple[str, str]], kind: str, text: str) -> None:
        if text:
            out.append((kind, text))


def split_reasoning(text: str, in_reasoning: bool, *, start: str = THINK_START,
                    end: str = THINK_END) -> tuple[str, str]:
    """``(reasoning, content)`` of a whole generated text; see the module docstring."""
    splitter = ReasoningSplitter(in_reasoning, start=start, end=end)
    parts = splitter.feed(text) + splitter.finish()
    return ("".join(t for k, t in parts if k == REASONING), "".join(t for k, t in parts if k == CONTENT))
