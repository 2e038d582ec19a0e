"""Generation defaults of a checkpoint folder: ``generation_config.json`` (sampling, end tokens).

Nemotron 3 Super's card samples with temperature 1.0 and top_p 0.95 for every use, so those are
the defaults where the folder says nothing. End tokens are the union of ``eos_token_id`` in
``generation_config.json`` and ``config.json`` and the tokenizer's ``eos_token``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 0.95


@dataclass(frozen=True)
class GenerationDefaults:
    """What a folder asks for when a call does not say: sampling settings, length, end tokens."""

    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = "defaults"


def _ids(value: Any, where: str) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{where} must be a token id or a list of token ids, got {value!r}; fix the file")
    return tuple(values)


def load_generation_defaults(folder: str | Path | None, *, config_eos: Any = None,
                             tokenizer_eos: int | None = None) -> GenerationDefaults:
    """Read ``generation_config.json`` of ``folder`` (optional) into :class:`GenerationDefaults`.

    Fields it does not set keep the defaults (temperature 1.0, top_p 0.95); ``do_sample: false``
    means greedy (temperature 0). A file that is not a JSON object, or fields of the wrong type,
    raise :class:`~residency.errors.CheckpointError` naming the file and the field.
    """
    eos = list(_ids(config_eos, "config.json eos_token_id"))
    if tokenizer_eos is not None:
        eos.append(int(tokenizer_eos))
    raw: dict[str, Any] = {}
    path = Path(folder) / GENERATION_CONFIG_FILE if folder is not None else None
    if path is not None and path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not readable JSON ({exc}); re-download it or remove it") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object, got {type(raw).__name__}; re-download it")

    def number(name: str, default: float) -> float:
        value = raw.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{path}: {name} must be a number, got {value!r}; fix the file")
        return float(value)

    temperature = number("temperature", DEFAULT_TEMPERATURE)
    if raw.get("do_sample") is False:
        temperature = 0.0
    top_p = number("top_p", DEFAULT_TOP_P)
    max_new = raw.get("max_new_tokens")
    if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
        raise CheckpointError(f"{path}: max_new_tokens must be a whole number >= 1, got {max_new!r}; fix the file")
    eos = list(_ids(raw.get("eos_token_id"), f"{path}: eos_token_id")) + eos
    return GenerationDefaults(temperature=temperature, top_p=top_p, max_new_tokens=max_new,
                              eos_token_ids=tuple(dict.fromkeys(eos)),
                              source=str(path) if raw else "defaults")
