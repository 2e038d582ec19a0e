"""Tokenizers: the checkpoint's own Hugging Face tokenizer when present, else the tiny model's byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

BYTE_TOKENIZER_FILE = "residency_tokenizer.json"


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens: 0 pad, 1 bos, 2 eos; byte b is token b + 3."""

    offset = 3
    vocab_size = 256 + offset
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id] + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def save(self, folder: Path) -> None:
        (folder / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "bytes", "offset": self.offset}) + "\n")


class HFTokenizer:
    """Wraps a local ``transformers`` tokenizer (never downloads)."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer stored with a checkpoint, or None when it has none (token ids only)."""
    folder = Path(folder)
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        try:
            return HFTokenizer(folder)
        except ImportError:
            return None
    return None
