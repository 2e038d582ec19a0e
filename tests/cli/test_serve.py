"""The OpenAI-compatible server on the tiny model: the official ``openai`` client (streaming and not),
raw HTTP for errors (400 naming the field, 401, 404, 429 when the queue is full), and a client that
disconnects mid-stream stopping its generation. Servers bind 127.0.0.1 on a free port and are shut down."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from residency import OffloadedNemotron
from residency.testing import write_tiny_checkpoint

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("tokenizers")

from residency.cli.serve import build_app, serve_in_thread  # noqa: E402

NAME = "tiny-nemotron"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@pytest.fixture(scope="module")
def one_thread():
    """Decoding the tiny model is fastest on one thread on a busy CPU; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("serve") / NAME, tokenizer="bpe")


@pytest.fixture(scope="module")
def model(chat_checkpoint, one_thread):
    return OffloadedNemotron.from_pretrained(chat_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def server(model):
    app = build_app(model, model_name=NAME, max_queue=0)
    handle = serve_in_thread(app)
    handle.app = app
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def endless(model, monkeypatch):
    """No end tokens: a long generation runs to its limit unless something stops it."""
    monkeypatch.setattr(model, "end_token_ids", lambda: ())


def wait_idle(server, deadline: float = 30.0) -> None:
    slot = server.app.state.generator
    end = time.monotonic() + deadline
    while slot.admitted and time.monotonic() < end:
        time.sleep(0.02)
    assert slot.admitted == 0, "a generation is still running"


def test_models_and_health(server, client, model):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    health = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    assert health == {"status": "ok", "model": NAME, "running": 0, "waiting": 0, "max_queue": 0}


def test_chat_completion_matches_the_python_api(server, client, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an expert?"}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, seed=7, temperature=0.9,
                                           top_p=0.9)
    expected = model.chat(messages, max_new_tokens=20, seed=7, temperature=0.9, top_p=0.9)
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content == expected.content
    assert message.reasoning_content == (expected.reasoning or None)
    assert reply.choices[0].finish_reason == {"stop": "stop", "length": "length"}[expected.finish_reason]
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens
    assert reply.model == NAME and reply.id.startswith("chatcmpl-")


def test_chat_streaming_equals_non_streaming(server, client):
    kwargs = dict(model=NAME, messages=[{"role": "user", "content": "Stream, please."}], max_tokens=24, seed=3)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    content = "".join(d.content or "" for d in deltas)
    assert deltas[0].role == "assistant"
    assert reasoning == (whole.choices[0].message.reasoning_content or "")
    assert content == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_template_kwargs_and_stop(server, client, model):
    messages = [{"role": "user", "content": "No thinking."}]
    reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    expected = model.chat(messages, max_new_tokens=12, temperature=0, enable_thinking=False)
    assert reply.choices[0].message.content == expected.content and expected.reasoning == ""
    assert reply.choices[0].message.reasoning_content is None
    assert reply.usage.prompt_tokens == expected.prompt_tokens  # the prompt closed the thinking span
    stop = expected.content.strip()[2:4]
    cut = client.chat.completions.create(model=NAME, messages=messages, max_tokens=12, temperature=0, stop=[stop],
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == expected.content[:expected.content.index(stop)].lstrip()


def test_completions(server, client, model):
    reply = client.completions.create(model=NAME, prompt="The expert cache", max_tokens=10, seed=2)
    assert reply.choices[0].text == model.generate("The expert cache", max_new_tokens=10, seed=2)
    assert reply.usage.prompt_tokens == model.encode("The expert cache").shape[1]
    pieces = list(client.completions.create(model=NAME, prompt="The expert cache", max_tokens=10, seed=2, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == reply.choices[0].text
    ids = client.completions.create(model=NAME, prompt=[1, 40, 41], max_tokens=3, temperature=0)
    assert ids.usage.prompt_tokens == 3 and ids.usage.completion_tokens <= 3


BAD_REQUESTS = [
    ("/v1/chat/completions", b"{not json", None, "not valid JSON"),
    ("/v1/chat/completions", b"[1, 2]", None, "must be a JSON object"),
    ("/v1/chat/completions", {}, "messages", "messages: must be a non-empty list"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "messages: must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages", "unknown role 'robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages", "messages[0].content is missing"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature",
     "temperature: must be a number"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p",
     "top_p: must lie in (0, 1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens",
     "max_tokens: must be >= 1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, "max_tokens",
     "exceed the model's context of 4096 tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed",
     "seed: must be a whole number"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop",
     "stop: must be a non-empty string"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "only n=1"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream",
     "stream: must be true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": [1]},
     "chat_template_kwargs", "chat_template_kwargs: must be an object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "chat_template_kwargs": {"enable_thinking": "no"}},
     "chat_template_kwargs.enable_thinking", "must be true or false"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}},
     "stream_options.include_usage", "must be true or false"),
    ("/v1/completions", {"prompt": 5}, "prompt", "prompt: must be a string or a list of token ids"),
    ("/v1/completions", {"prompt": [1, 99999]}, "prompt", "outside the vocabulary"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo", "echo is not supported"),
]


@pytest.mark.parametrize("path, body, param, message", BAD_REQUESTS)
def test_malformed_requests_get_400_naming_the_field(server, path, body, param, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    wait_idle(server)


def test_openai_client_sees_bad_request_and_unknown_model(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], temperature=-1)
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    r = httpx.get(f"{client.base_url}".rstrip("/") + "/nothing", timeout=TIMEOUT)
    assert r.status_code == 404 and "no such endpoint" in r.json()["error"]["message"]


def test_queue_full_gets_429_and_disconnect_stops_generation(server, endless):
    """max_queue=0: while one generation runs, the next request is refused; closing the stream cancels it."""
    slot = server.app.state.generator
    done_before = len(slot.finished)
    body = {"model": NAME, "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 3000,
            "stream": True, "temperature": 1.0, "seed": 0}
    with httpx.Client(timeout=TIMEOUT) as first:
        with first.stream("POST", f"{server.url}/v1/chat/completions", json=body) as events:
            assert events.status_code == 200
            data = (line for line in events.iter_lines() if line.startswith("data: "))
            got = [next(data) for _ in range(3)]  # the role chunk, then generated pieces: it is running
            assert '"role": "assistant"' in got[0] and slot.running == 1
            busy = httpx.post(f"{server.url}/v1/chat/completions", timeout=TIMEOUT,
                              json={"model": NAME, "messages": [{"role": "user", "content": "me too"}]})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert "the server is busy" in busy.json()["error"]["message"]
            assert busy.json()["error"]["type"] == "rate_limit_error"
        # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 30
    while len(slot.finished) == done_before and time.monotonic() < deadline:
        time.sleep(0.02)
    last = slot.finished[-1]
    assert last["finish_reason"] == "cancelled" and last["completion_tokens"] < 3000
    wait_idle(server)
    ok = httpx.get(f"{server.url}/health", timeout=TIMEOUT).json()
    assert ok["running"] == 0 and ok["waiting"] == 0


def test_non_streaming_client_that_hangs_up_stops_generation(server, endless):
    slot = server.app.state.generator
    before = len(slot.finished)
    body = {"model": NAME, "messages": [{"role": "user", "content": "long"}], "max_tokens": 3000}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(1.0, connect=10.0))
    deadline = time.monotonic() + 30
    while len(slot.finished) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert slot.finished[-1]["finish_reason"] == "cancelled" and slot.finished[-1]["completion_tokens"] < 3000
    wait_idle(server)


def test_a_queued_request_waits_its_turn(model, endless):
    """max_queue=1: the second request waits while the first streams; a third gets 429; all end cleanly."""
    import threading

    app = build_app(model, model_name=NAME, max_queue=1)
    handle = serve_in_thread(app)
    slot = app.state.generator
    try:
        long = {"model": NAME, "messages": [{"role": "user", "content": "long"}], "max_tokens": 3000, "stream": True}
        short = {"model": NAME, "messages": [{"role": "user", "content": "short"}], "max_tokens": 3, "seed": 1}
        answers = []
        with httpx.Client(timeout=TIMEOUT) as first, first.stream("POST", f"{handle.url}/v1/chat/completions",
                                                                  json=long) as events:
            data = (line for line in events.iter_lines() if line.startswith("data: "))
            next(data), next(data)  # the role chunk, then a generated piece: the long one is running
            assert slot.running == 1
            waiter = threading.Thread(target=lambda: answers.append(
                httpx.post(f"{handle.url}/v1/chat/completions", json=short, timeout=TIMEOUT)))
            waiter.start()
            deadline = time.monotonic() + 30
            while slot.waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert slot.running == 1 and slot.waiting == 1
            third = httpx.post(f"{handle.url}/v1/chat/completions", json=short, timeout=TIMEOUT)
            assert third.status_code == 429 and "1 wait" in third.json()["error"]["message"]
            assert not answers  # still waiting behind the stream
        waiter.join(60)
        assert answers and answers[0].status_code == 200
        assert answers[0].json()["usage"]["completion_tokens"] <= 3
        assert [f["finish_reason"] for f in slot.finished][0] == "cancelled"
    finally:
        handle.stop()


def test_api_key(model):
    app = build_app(model, model_name=NAME, api_key="s3cret")
    handle = serve_in_thread(app)
    try:
        r = httpx.get(f"{handle.url}/v1/models", timeout=TIMEOUT)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
        assert httpx.get(f"{handle.url}/health", timeout=TIMEOUT).status_code == 200
        good = openai.OpenAI(base_url=f"{handle.url}/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.models.list().data[0].id == NAME
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{handle.url}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        handle.stop()


def test_serve_command(chat_checkpoint, tmp_path):
    """`residency serve` in its own process: prints its address, answers, stops on SIGINT."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "residency", "serve", "--model", str(chat_checkpoint), "--port",
                             "0", "--served-model-name", "cli-model", "--log-level", "warning", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 90
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith("serving 'cli-model' at http://127.0.0.1:"), (line, proc.poll())
        url = line.split(" at ")[1].split()[0]
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        assert c.models.list().data[0].id == "cli-model"
        reply = c.chat.completions.create(model="cli-model", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4)
        assert reply.usage.completion_tokens <= 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert out.strip().splitlines()[-1] == "experts: all resident"


def test_serve_command_errors(chat_checkpoint, tiny_checkpoint, capsys):
    from residency.cli import main

    assert main(["serve", "--model", str(chat_checkpoint), "--port", "70000"]) == 2
    assert "--port must lie in [0, 65535]" in capsys.readouterr().err
    assert main(["serve", "--model", str(chat_checkpoint), "--max-queue", "-1"]) == 2
    assert "--max-queue must be a whole number >= 0" in capsys.readouterr().err
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        assert main(["serve", "--model", str(chat_checkpoint), "--port", str(taken.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert "cannot listen on 127.0.0.1:" in err and "pick another --port" in err and err.count("\n") == 1
    finally:
        taken.close()
