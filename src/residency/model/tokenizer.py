"""Tokenizers: the checkpoint's own Hugging Face tokenizer when present, else the tiny model's byte tokenizer.

A folder's ``tokenizer.json`` is read with the ``tokenizers`` package (what ``transformers``' fast
tokenizers run on); ``tokenizer_config.json`` gives the special tokens (``bos_token``, ``eos_token``
...) and, with ``chat_template.jinja``, the chat template (:mod:`residency.model.chat`). Decoding
hides special tokens (``<s>``, ``<|im_end|>`` ...) but keeps the reasoning markers ``<think>`` and
``</think>``, which the reasoning split reads from the text, whether or not the vocabulary marks
them special.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from ..errors import CheckpointError, InputError

BYTE_TOKENIZER_FILE = "residency_tokenizer.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: special-token names a chat template may read (transformers passes these to templates too)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
#: text markers of the reasoning span; kept when decoding even if the vocabulary marks them special
REASONING_MARKERS = ("<think>", "</think>")


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special tokens: 0 pad, 1 bos, 2 eos; byte b is token b + 3."""

    offset = 3
    vocab_size = 256 + offset
    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None  # set by load_tokenizer when the folder has a chat_template.jinja
    special_tokens: dict[str, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.bos_token_id] * add_special_tokens + [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - self.offset for i in ids if self.offset <= i < self.vocab_size)
        return data.decode("utf-8", errors="replace")

    def token_id(self, text: str) -> int | None:
        """Byte tokens have no named tokens: always None."""
        return None

    def save(self, folder: Path) -> None:
        (folder / BYTE_TOKENIZER_FILE).write_text(json.dumps({"kind": "bytes", "offset": self.offset}) + "\n")


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialised AddedToken ``{"content": ...}``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_tokenizer_config(folder: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` as a dict ({} when absent); :class:`CheckpointError` when it is not a JSON object."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not readable JSON ({exc}); re-download it or remove it") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}; re-download it")
    return raw


class HFTokenizer:
    """A Hugging Face tokenizer folder, never downloading anything.

    ``tokenizer.json`` is read with ``tokenizers``; a folder without one (a slow, sentencepiece-only
    tokenizer) falls back to ``transformers.AutoTokenizer``. Either missing package raises ImportError.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.config = read_tokenizer_config(self.folder)
        self._fast = self._slow = None
        if (self.folder / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as FastTokenizer

            self._fast = FastTokenizer.from_file(str(self.folder / "tokenizer.json"))
            added = self._fast.get_added_tokens_decoder()
            special = {i for i, tok in added.items() if tok.special and tok.content not in REASONING_MARKERS}
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
        else:
            from transformers import AutoTokenizer

            self._slow = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            special = {i for i in self._slow.all_special_ids
                       if self._slow.convert_ids_to_tokens(i) not in REASONING_MARKERS}
            self.vocab_size = len(self._slow)
        self._hidden = frozenset(special)
        self.special_tokens = {name: text for name in SPECIAL_TOKEN_NAMES
                               if (text := _token_text(self.config.get(name))) is not None}
        self.chat_template = None  # set by load_tokenizer
        ids = {name: self.token_id(text) for name, text in self.special_tokens.items()}
        self.bos_token_id, self.eos_token_id = ids.get("bos_token"), ids.get("eos_token")
        self.pad_token_id = ids.get("pad_token")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the tokenizer's post-processor adds (a BOS)."""
        if self._fast is not None:
            return list(self._fast.encode(text, add_special_tokens=add_special_tokens).ids)
        return list(self._slow.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens (the reasoning markers stay); incomplete UTF-8 decodes as U+FFFD."""
        ids = [int(i) for i in ids if i not in self._hidden]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=False)
        return self._slow.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def token_id(self, text: str) -> int | None:
        """The id of ``text`` when it is a single token of the vocabulary, else None."""
        if self._fast is not None:
            return self._fast.token_to_id(text)
        return self._slow.get_vocab().get(text)


def _has_hf_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in HF_TOKENIZER_FILES)


def load_tokenizer(folder: str | Path) -> Tokenizer | None:
    """The tokenizer stored with a checkpoint, or None when it has none (token ids only).

    None also when the folder has Hugging Face tokenizer files but neither ``tokenizers`` nor
    ``transformers`` is installed (:func:`missing_tokenizer_reason` says which). Tokenizer files that
    cannot be read raise :class:`~residency.errors.CheckpointError`. The tokenizer's ``chat_template``
    is the folder's chat template (:func:`residency.model.chat.load_chat_template`), or None.
    """
    from .chat import load_chat_template

    folder = Path(folder)
    tokenizer: Any = None
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        tokenizer = ByteTokenizer()
    elif _has_hf_tokenizer(folder):
        try:
            tokenizer = HFTokenizer(folder)
        except ImportError:
            return None
        except CheckpointError:
            raise
        except Exception as exc:  # tokenizers/transformers raise many kinds on a corrupt or partial file
            detail = " ".join(str(exc).split())  # one line
            raise CheckpointError(
                f"{folder}: the tokenizer files could not be read ({type(exc).__name__}: {detail}); re-download "
                f"{' / '.join(HF_TOKENIZER_FILES)}, or remove them to use token ids only"
            ) from exc
    if tokenizer is not None:
        try:
            tokenizer.chat_template = load_chat_template(folder, getattr(tokenizer, "config", None),
                                                         special_tokens=tokenizer.special_tokens)
        except ImportError:  # the folder has a template but jinja2 is missing: text generation still works
            tokenizer.chat_template = None
            tokenizer.chat_template_missing = "its chat template needs jinja2 (pip install 'residency[chat]')"
    return tokenizer


def missing_tokenizer_reason(folder: str | Path | None) -> str:
    """Why :func:`load_tokenizer` gave no tokenizer for ``folder``, as a phrase ("has no tokenizer ...")."""
    if folder is not None and _has_hf_tokenizer(Path(folder)):
        return ("has tokenizer files but neither the tokenizers nor the transformers package that reads them is "
                "installed (pip install tokenizers)")
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
