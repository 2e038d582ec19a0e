"""Chat templates: a checkpoint folder's Jinja template, rendered the way ``transformers`` renders it.

The template comes from ``chat_template.jinja`` or the ``chat_template`` field of
``tokenizer_config.json`` (a string, or a list of named templates of which ``default`` is used).
It is compiled in Jinja's immutable sandbox with ``trim_blocks`` and ``lstrip_blocks``, the
``loopcontrols`` extension, a pass-through ``{% generation %}`` block, the ``tojson`` filter
(no HTML escaping, ``indent`` / ``separators`` / ``sort_keys``) and the globals ``raise_exception``,
``strftime_now`` and ``namespace``. A render sees ``messages``, ``tools``, ``documents``,
``add_generation_prompt``, the tokenizer's special tokens (``bos_token``, ``eos_token`` ...) and every
template keyword (``enable_thinking``, ``low_effort``, ``force_nonempty_content`` for Nemotron 3).

Messages are checked first: a list of ``{"role": str, "content": str}`` objects, where content may
also be None or a list of text parts (``[{"type": "text", "text": ...}]``, joined), and a message's
reasoning given as ``reasoning`` or ``thinking`` is also passed as ``reasoning_content``.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError

CHAT_TEMPLATE_FILE = "chat_template.jinja"
#: names a message's reasoning may come under; templates read the first
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")


@lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks; rendering ignores it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    class SafeNamespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore names (no reaching into Python internals)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, rest = args[0], args[1:]
            for name in dict(*rest, **kwargs):
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = SafeNamespace
    return env


class ChatTemplate:
    """A compiled chat template; :meth:`render` turns messages into the prompt text."""

    def __init__(self, source: str, *, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        import jinja2

        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"{origin}: the chat template does not compile (line {exc.lineno}: {exc.message}); "
                                  "fix or re-download it") from None

    def render(self, messages: Any, *, add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None, **template_kwargs: Any) -> str:
        """The prompt text for ``messages`` (checked by :func:`normalize_messages`).

        ``template_kwargs`` (``enable_thinking=False``, ...) are visible to the template and take
        precedence over the special tokens. A template's ``raise_exception`` or any render error
        raises :class:`~residency.errors.InputError` with the template's message.
        """
        import jinja2

        chat = normalize_messages(messages)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise InputError("tools must be a list of JSON objects (function schemas)")
        variables = {**self.special_tokens, **template_kwargs}
        try:
            return self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise InputError(f"the chat template refused these messages: {exc}; change the messages to what "
                             "this model's template accepts") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as exc:
            raise InputError(f"the chat template failed on these messages ({type(exc).__name__}: {exc}); "
                             "check the roles and contents") from None


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Plain copies of chat messages, checked; :class:`~residency.errors.InputError` names the first bad field."""
    if isinstance(messages, str):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} objects, not a string; "
                         "wrap it: [{'role': 'user', 'content': text}]")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InputError(f"{where} must be an object with 'role' and 'content', got {type(message).__name__}")
        message = json.loads(json.dumps(message, default=str))  # a deep, plain copy
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InputError(f"{where}.role must be a non-empty string such as 'user', 'assistant' or 'system'")
        message["content"] = _content_text(message.get("content"), f"{where}.content",
                                           allow_none=role == "assistant" or "tool_calls" in message)
        for name in REASONING_FIELDS:
            value = message.get(name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"{where}.{name} must be a string")
        reasoning = next((message[n] for n in REASONING_FIELDS if isinstance(message.get(n), str)), None)
        if reasoning is not None:
            message.setdefault("reasoning_content", reasoning)
        out.append(message)
    return out


def _content_text(content: Any, where: str, *, allow_none: bool) -> str | None:
    if isinstance(content, str):
        return content
    if content is None:
        if allow_none:
            return None
        raise InputError(f"{where} is missing; give the message text as a string")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"{where}[{j}] must be a text part {{'type': 'text', 'text': ...}} "
                                 f"(only text is supported), got {kind or type(part).__name__!r}")
            texts.append(part["text"])
        return "".join(texts)
    raise InputError(f"{where} must be a string (or a list of text parts), got {type(content).__name__}")


def load_chat_template(folder: str | Path, tokenizer_config: dict[str, Any] | None = None, *,
                       special_tokens: dict[str, str] | None = None) -> ChatTemplate | None:
    """The folder's chat template (``chat_template.jinja`` first, then ``tokenizer_config.json``), or None."""
    folder = Path(folder)
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot be read ({exc}); re-download it") from None
        return ChatTemplate(source, special_tokens=special_tokens, origin=str(path))
    if tokenizer_config is None:
        from .tokenizer import read_tokenizer_config

        tokenizer_config = read_tokenizer_config(folder)
    raw = tokenizer_config.get("chat_template")
    origin = f"{folder / 'tokenizer_config.json'} (chat_template)"
    if raw is None:
        return None
    if isinstance(raw, list):
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        raw = named.get("default")
        if raw is None:
            raise CheckpointError(f"{origin}: a list of templates without one named 'default' "
                                  f"(names: {sorted(map(str, named))}); add a 'default' entry")
    if not isinstance(raw, str):
        raise CheckpointError(f"{origin}: must be a string, got {type(raw).__name__}; re-download the file")
    return ChatTemplate(raw, special_tokens=special_tokens, origin=origin)
