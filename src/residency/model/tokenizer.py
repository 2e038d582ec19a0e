"""Tokenizers: the checkpoint's own Hugging Face tokenizer when present, else the tiny model's byte tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CheckpointError, InputError

BYTE_TOKENIZER_FILE = "residency_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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


def _has_hf_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_TOKENIZER_FILES)


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer stored with a checkpoint, or None when it has none (token ids only).

    None also when the folder has Hugging Face tokenizer files but ``transformers`` is not
    installed (:func:`missing_tokenizer_reason` says which). Tokenizer files that ``transformers``
    cannot read raise :class:`~residency.errors.CheckpointError`.
    """
    folder = Path(folder)
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    if _has_hf_tokenizer(folder):
        try:
            return HFTokenizer(folder)
        except ImportError:
            return None
        except Exception as exc:  # tokenizers/transformers raise many kinds on a corrupt or partial file
            detail = " ".join(str(exc).split())  # one line
            raise CheckpointError(
                f"{folder}: the tokenizer files could not be read ({type(exc).__name__}: {detail}); re-download "
                f"{' / '.join(HF_TOKENIZER_FILES)}, or remove them to use token ids only"
            ) from exc
    return None


def missing_tokenizer_reason(folder: str | Path | None) -> str:
    """Why :func:`load_tokenizer` gave no tokenizer for ``folder``, as a phrase ("has no tokenizer ...")."""
    if folder is not None and _has_hf_tokenizer(Path(folder)):
        return "has tokenizer files but the transformers package that reads them is not installed " \
               "(pip install transformers)"
    return "has no tokenizer (no tokenizer.json)"


def as_token_ids(inputs: Any, vocab_size: int) -> torch.Tensor:
    """A token list, a batch of equal-length token lists or an integer tensor → ``[B, T]`` int64.

    Raises :class:`~residency.errors.InputError` for anything else: no ids, ragged batches,
    non-integers, or ids outside ``[0, vocab_size)``.
    """
    if isinstance(inputs, torch.Tensor):
        ids = inputs
    else:
        try:
            ids = torch.as_tensor(inputs)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise InputError(
                f"token ids must be a list of integers or a batch of equal-length lists of integers ({exc})"
            ) from None
    if ids.dim() == 1:
        ids = ids[None]
    if ids.numel() == 0:
        raise InputError(f"no token ids (shape {tuple(ids.shape)}); pass at least one token id")
    if ids.dim() != 2:
        raise InputError(f"token ids must be a [batch, seq] array, got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InputError(f"token ids must be integers, got {ids.dtype} values such as {ids.flatten()[0].item()!r}")
    ids = ids.to(torch.long)
    bad = (ids < 0) | (ids >= vocab_size)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        prefix = f"row {row}, position {col}" if ids.shape[0] > 1 else f"position {col}"
        raise InputError(
            f"token id {int(ids[row, col])} at {prefix} is outside the vocabulary: "
            f"ids must lie in [0, {vocab_size}) for this model (vocab_size {vocab_size})"
        )
    return ids
