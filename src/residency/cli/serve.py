"""``residency serve``: an OpenAI-compatible HTTP server for one model (Starlette on uvicorn).

    residency serve --model DIR [--host 127.0.0.1] [--port 8000] [--vram-budget 20GiB]
                    [--served-model-name NAME] [--api-key KEY] [--max-queue 8]

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, each streaming over server-sent events when ``"stream": true``. Chat
replies carry the reasoning trace in ``reasoning_content`` (also as ``reasoning``) beside
``content``, as vLLM's reasoning parsers return them; ``chat_template_kwargs`` reach the template.

One generation runs at a time (batch 1), on a worker thread so the server stays responsive;
up to ``--max-queue`` more wait their turn and a request beyond that gets 429. A malformed request
gets 400 naming the field; a client that disconnects stops its generation before the next token.
See docs/serving.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..errors import InputError, ResidencyError

DEFAULT_MAX_QUEUE = 8
MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def register(sub: argparse._SubParsersAction) -> None:
    from .model import _add_load_options

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions)")
    p.add_argument("--model", type=Path, required=True, help="Hugging Face Nemotron-H folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's name)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $RESIDENCY_API_KEY, else no key)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help=f"requests that may wait behind the running one before 429 (default {DEFAULT_MAX_QUEUE})")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    _add_load_options(p)
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import os

    from .model import _load, preflight

    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InputError(f"residency serve needs Starlette and uvicorn ({exc.name} is missing): "
                         "pip install 'residency[serve]'") from None
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must lie in [0, 65535], got {args.port}")
    if isinstance(args.max_queue, bool) or args.max_queue < 0:
        raise InputError(f"--max-queue must be a whole number >= 0, got {args.max_queue}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("RESIDENCY_API_KEY") or None
    config, has_tokenizer, device = preflight(args.model, args.device)
    if not has_tokenizer:
        from ..model.tokenizer import missing_tokenizer_reason

        raise InputError(f"serving needs a tokenizer, but {args.model} {missing_tokenizer_reason(args.model)}; "
                         "add the model's tokenizer.json (and chat template) to the folder")
    sock = bind_socket(args.host, args.port)
    model = _load(args, config, device)
    name = args.served_model_name or Path(args.model).resolve().name
    app = build_app(model, model_name=name, api_key=api_key, max_queue=args.max_queue)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {name!r} at http://{shown}:{port}/v1 (one generation at a time, {args.max_queue} may wait"
          f"{', API key required' if api_key else ''}); Ctrl-C stops", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then passes the Ctrl-C on
        pass
    finally:
        sock.close()
        app.state.generator.shutdown()
    print("server stopped")
    print(model.telemetry_line())
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; an address in use or not available is one line naming the flag."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
                         "(or stop what uses it)") from None
    sock.set_inheritable(True)
    return sock


# ---------------------------------------------------------------------- errors and field checks


class RequestError(Exception):
    """A request the server refuses: HTTP status, message and (for 400) the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error_body(message: str, kind: str, param: str | None, status: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _bad(param: str, message: str) -> RequestError:
    return RequestError(400, f"{param}: {message}", param)


class Fields:
    """Typed reads of a JSON request body; each wrong value raises 400 naming the field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise _bad(name, f"must be true or false, got {json.dumps(value)}")
        return value

    def number(self, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(name, f"must be a number, got {json.dumps(value)}")
        if not (lo < value if lo_open else lo <= value) or not value <= hi:
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise _bad(name, f"must lie in {interval}, got {value}")
        return float(value)

    def integer(self, name: str, lo: int | None = None, hi: int | None = None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, f"must be a whole number, got {json.dumps(value)}")
        if lo is not None and value < lo:
            raise _bad(name, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise _bad(name, f"must be <= {hi}, got {value}")
        return value

    def stop(self) -> list[str] | None:
        value = self.body.get("stop")
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
            raise _bad("stop", "must be a non-empty string or a list of non-empty strings")
        if len(value) > 16:
            raise _bad("stop", f"at most 16 stop strings, got {len(value)}")
        return value

    def unsupported(self, name: str, allowed: tuple[Any, ...], why: str) -> None:
        value = self.body.get(name)
        if value is not None and value not in allowed:
            raise _bad(name, why)


def _sampling(f: Fields) -> dict[str, Any]:
    f.unsupported("n", (1,), "only n=1 is supported (one generation per request)")
    f.unsupported("best_of", (1,), "only best_of=1 is supported")
    f.unsupported("logprobs", (False, 0), "log probabilities are not supported")
    f.unsupported("top_logprobs", (0,), "log probabilities are not supported")
    return {
        "temperature": f.number("temperature", 0.0, 100.0),
        "top_p": f.number("top_p", 0.0, 1.0, lo_open=True),
        "seed": f.integer("seed", -(2**63), 2**64 - 1),
        "stop": f.stop(),
    }


def _max_tokens(f: Fields, names: tuple[str, ...]) -> tuple[int | None, str]:
    for name in names:
        value = f.integer(name, 1)
        if value is not None:
            return value, name
    return None, names[0]


# ---------------------------------------------------------------------- scheduling


class GenerationSlot:
    """One running generation plus a bounded queue, on the event loop; a thread runs the model."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.admitted = 0  # running + waiting
        self.running = 0
        self._lock: asyncio.Lock | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="residency-generate")
        self.finished: list[dict[str, Any]] = []  # recent generations: finish reason, tokens (tests, /health)

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def admit(self) -> Ticket:
        if self.admitted >= 1 + self.max_queue:
            raise RequestError(
                429, f"the server is busy: one generation is running and {self.waiting} wait (the queue holds "
                f"{self.max_queue}, --max-queue); retry shortly", kind="rate_limit_error")
        self.admitted += 1
        return Ticket(self)

    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def record(self, stream: Any) -> None:
        result = stream.result
        if result is not None:
            self.finished.append({"finish_reason": result.finish_reason, "completion_tokens": result.completion_tokens})
            del self.finished[:-32]

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Ticket:
    """A request's place: wait for the model, run on the worker thread, give the place back exactly once."""

    def __init__(self, slot: GenerationSlot) -> None:
        self.slot = slot
        self._holding = False
        self._done = False

    async def acquire(self) -> None:
        await self.slot.lock().acquire()
        self._holding = True
        self.slot.running += 1

    @property
    def released(self) -> bool:
        return self._done

    def release(self) -> None:
        if self._done:
            return
        self._done = True
        self.slot.admitted -= 1
        if self._holding:
            self.slot.running -= 1
            self._holding = False
            self.slot.lock().release()


_END = object()


def _pump(stream: Any, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
    """Worker thread: run ``stream`` and hand each piece to the event loop; then an end marker."""

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is stopping
            stream.cancel()

    try:
        for piece in stream:
            put(piece)
    except BaseException as exc:  # noqa: BLE001 - reported to the client as an error event
        put(exc)
    finally:
        stream.close()
        put(_END)


# ---------------------------------------------------------------------- the app


def build_app(model: Any, *, model_name: str, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> Any:
    """The Starlette app serving ``model`` (an :class:`~residency.OffloadedNemotron`) under ``model_name``."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    slot = GenerationSlot(max_queue)
    created = int(time.time())
    has_template = getattr(model.tokenizer, "chat_template", None) is not None

    def error_response(exc: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        if exc.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param, exc.status), status_code=exc.status,
                            headers=headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
                               "with the key the server was started with", kind="authentication_error")

    async def read_body(request: Request) -> Fields:
        data = await request.body()
        if len(data) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {len(data)} bytes exceeds {MAX_BODY_BYTES}")
        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError(400, f"the body is not valid JSON ({exc}); send a JSON object") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        f = Fields(body)
        requested = body.get("model")
        if requested is not None and not isinstance(requested, str):
            raise _bad("model", "must be a string")
        if requested and requested != model_name:
            raise RequestError(404, f"model {requested!r} is not served here; this server serves {model_name!r} "
                               "(GET /v1/models)", "model", kind="not_found_error")
        return f

    def endpoint(handler: Any) -> Any:
        async def wrapped(request: Request) -> Any:
            try:
                check_key(request)
                return await handler(request)
            except RequestError as exc:
                return error_response(exc)
        return wrapped

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_name, "running": slot.running, "waiting": slot.waiting,
                             "max_queue": slot.max_queue})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "residency",
            "max_model_len": model.context_length, "root": str(model.path) if model.path else model_name,
        }]})

    def budget(ids_len: int, max_tokens: int | None, name: str, default: int | None, prompt_field: str) -> int:
        """Tokens to generate: what was asked (checked against the context) or the default / the rest of it."""
        room = model.context_length - ids_len
        if room < 1:
            raise _bad(prompt_field, f"the prompt has {ids_len} tokens but the model's context holds "
                       f"{model.context_length}; shorten it")
        if max_tokens is None:
            return min(default, room) if default else room
        if max_tokens > room:
            raise _bad(name, f"the prompt's {ids_len} tokens plus {name}={max_tokens} exceed the model's context of "
                       f"{model.context_length} tokens; ask for at most {room}")
        return max_tokens

    async def chat_completions(request: Request) -> Any:
        f = await read_body(request)
        if not has_template:
            raise RequestError(400, f"{model_name} has no chat template; use /v1/completions with a plain prompt",
                               "messages")
        messages = f.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("messages", "must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
        sampling = _sampling(f)
        max_tokens, max_name = _max_tokens(f, ("max_completion_tokens", "max_tokens"))
        stream_flag = f.boolean("stream")
        include_usage = _stream_options(f, stream_flag)
        kwargs = f.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise _bad("chat_template_kwargs", "must be an object such as {\"enable_thinking\": false}")
        kwargs = dict(kwargs or {})
        for name in ("enable_thinking", "low_effort", "force_nonempty_content"):
            if name in kwargs and not isinstance(kwargs[name], bool):
                raise _bad(f"chat_template_kwargs.{name}", f"must be true or false, got {json.dumps(kwargs[name])}")
        effort = f.get("reasoning_effort")
        if effort is not None:
            if effort not in ("low", "medium", "high"):
                raise _bad("reasoning_effort", f"must be 'low', 'medium' or 'high', got {json.dumps(effort)}")
            kwargs.setdefault("low_effort", effort == "low")
        tools = f.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise _bad("tools", "must be a list of tool objects")
        _response_format(f)
        try:  # the same prompt model.chat renders below, to check its length first
            prompt = model.apply_chat_template(messages, tools=tools,
                                               **{"enable_thinking": True, "low_effort": False, **kwargs})
            ids = model.encode_prompt(prompt)
        except InputError as exc:
            raise _bad("messages", str(exc)) from None
        n_new = budget(ids.shape[1], max_tokens, max_name, None, "messages")
        try:
            stream = model.chat(messages, tools=tools, max_new_tokens=n_new, stream=True,
                                chat_template_kwargs=kwargs, **sampling)
        except InputError as exc:
            raise RequestError(400, str(exc)) from None
        ticket = slot.admit()
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if stream_flag:
            return StreamingResponse(_chat_events(stream, ticket, rid, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _run_to_end(request, stream, ticket)
        message: dict[str, Any] = {"role": "assistant", "content": result.content,
                                   "reasoning_content": result.reasoning or None}
        message["reasoning"] = message["reasoning_content"]
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _finish(result.finish_reason),
                         "stop_reason": result.stopped_by}],
            "usage": _usage(result),
        })

    async def completions(request: Request) -> Any:
        f = await read_body(request)
        prompt = f.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise _bad("prompt", "is empty; give the text to continue")
            ids = model.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool)
                                                        for i in prompt):
            try:
                ids = model.encode(prompt)
            except InputError as exc:
                raise _bad("prompt", str(exc)) from None
        else:
            raise _bad("prompt", "must be a string or a list of token ids (one prompt per request)")
        sampling = _sampling(f)
        max_tokens, max_name = _max_tokens(f, ("max_tokens",))
        stream_flag = f.boolean("stream")
        include_usage = _stream_options(f, stream_flag)
        f.unsupported("echo", (False,), "echo is not supported")
        f.unsupported("suffix", ("",), "suffix (insertion) is not supported")
        n_new = budget(ids.shape[1], max_tokens, max_name, DEFAULT_COMPLETION_TOKENS, "prompt")
        try:
            stream = model.generate(ids, max_new_tokens=n_new, stream=True, **sampling)
        except InputError as exc:
            raise RequestError(400, str(exc)) from None
        ticket = slot.admit()
        rid = f"cmpl-{uuid.uuid4().hex}"
        if stream_flag:
            return StreamingResponse(_completion_events(stream, ticket, rid, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        result = await _run_to_end(request, stream, ticket)
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "text": result.text, "logprobs": None,
                         "finish_reason": _finish(result.finish_reason), "stop_reason": result.stopped_by}],
            "usage": _usage(result),
        })

    # -------------------------------------------------------------- running a generation

    async def _run_to_end(request: Request, stream: Any, ticket: Ticket) -> Any:
        """Wait for the model, run the whole stream on the worker thread; a client gone stops it."""
        loop = asyncio.get_running_loop()
        try:
            turn = asyncio.ensure_future(ticket.acquire())  # keeps its place in the queue while we watch the client
            while not (await asyncio.wait({turn}, timeout=0.25))[0]:
                if await request.is_disconnected():
                    turn.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await turn
                    raise RequestError(499, "client closed the request")
            future = loop.run_in_executor(slot.executor, stream.read)
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    break
                if await request.is_disconnected():
                    stream.cancel()
            try:
                result = future.result()
            except InputError as exc:
                raise RequestError(400, str(exc)) from None
            slot.record(stream)
            return result
        finally:
            stream.cancel()
            ticket.release()

    async def _stream_pieces(stream: Any, ticket: Ticket) -> Any:
        """Yield the stream's pieces as the worker thread makes them. However this ends (done, an error,
        the client gone), the generation is cancelled and the place is given back once the worker
        thread has let go of the model; when it ends normally, before the last chunk goes out."""
        loop = asyncio.get_running_loop()
        future = None

        def finished(_: Any = None) -> None:
            if not ticket.released:
                slot.record(stream)
                ticket.release()

        try:
            await ticket.acquire()
            queue: asyncio.Queue = asyncio.Queue()
            future = loop.run_in_executor(slot.executor, _pump, stream, queue, loop)
            while True:
                item = await queue.get()
                if item is _END:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
            await future
            finished()
        finally:
            stream.cancel()
            if future is None:
                ticket.release()
            elif future.done():
                finished()
            else:
                future.add_done_callback(finished)

    def _sse(payload: dict[str, Any]) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    async def _chat_events(stream: Any, ticket: Ticket, rid: str, include_usage: bool) -> Any:
        now = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            return _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                         "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}]})

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for delta in _stream_pieces(stream, ticket):
                if delta.reasoning:
                    yield chunk({"reasoning_content": delta.reasoning, "reasoning": delta.reasoning})
                else:
                    yield chunk({"content": delta.content})
        except Exception as exc:  # noqa: BLE001 - a failure mid-stream becomes an error event
            yield _sse(_error_body(f"generation failed: {exc}", "server_error", None, 500))
            yield "data: [DONE]\n\n"
            return
        result = stream.result
        yield chunk({}, _finish(result.finish_reason), stop_reason=result.stopped_by)
        if include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                        "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"

    async def _completion_events(stream: Any, ticket: Ticket, rid: str, include_usage: bool) -> Any:
        now = int(time.time())

        def chunk(text: str, finish: str | None = None, **extra: Any) -> str:
            return _sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                         "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish, **extra}]})

        try:
            async for piece in _stream_pieces(stream, ticket):
                yield chunk(piece)
        except Exception as exc:  # noqa: BLE001
            yield _sse(_error_body(f"generation failed: {exc}", "server_error", None, 500))
            yield "data: [DONE]\n\n"
            return
        result = stream.result
        yield chunk("", _finish(result.finish_reason), stop_reason=result.stopped_by)
        if include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [], "usage": _usage(result)})
        yield "data: [DONE]\n\n"

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = {404: f"no such endpoint {request.url.path}; see GET /v1/models, POST /v1/chat/completions, "
                        "POST /v1/completions, GET /health",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return JSONResponse(_error_body(message, kind, None, exc.status_code), status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None, 500),
                            status_code=500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})
    app.state.generator = slot
    app.state.model = model
    app.state.model_name = model_name
    return app


def _stream_options(f: Fields, streaming: bool) -> bool:
    options = f.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _bad("stream_options", "must be an object such as {\"include_usage\": true}")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise _bad("stream_options.include_usage", f"must be true or false, got {json.dumps(include)}")
    if not streaming and include:
        raise _bad("stream_options", "is only allowed with \"stream\": true")
    return include


def _response_format(f: Fields) -> None:
    fmt = f.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "text":
        raise _bad("response_format", "only {\"type\": \"text\"} is supported (no JSON mode or schemas)")


def _finish(reason: str) -> str:
    return {"stop": "stop", "length": "length"}.get(reason, "abort")


def _usage(result: Any) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> Any:
    """Start ``app`` on uvicorn in a background thread (tests, notebooks); returns a handle with
    ``url``, ``port`` and ``stop()``. Binds ``host`` (default 127.0.0.1) on ``port`` (0: a free one)."""
    import uvicorn

    sock = bind_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="residency-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise ResidencyError("the server did not start (see its log above)")
        time.sleep(0.02)
    bound = sock.getsockname()[1]

    class Handle:
        url = f"http://{host}:{bound}"
        port = bound

        @staticmethod
        def stop(timeout: float = 10.0) -> None:
            server.should_exit = True
            thread.join(timeout)
            sock.close()
            app.state.generator.shutdown()

    return Handle()
