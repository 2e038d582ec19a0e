"""Chat templates from a checkpoint folder: rendered as ``transformers`` renders them, thinking on and off,
generation defaults, and errors. The tokenizer is a real BPE trained here with ``tokenizers``."""

from __future__ import annotations

import json

import pytest

from residency.errors import CheckpointError, InputError
from residency.model.chat import ChatTemplate, load_chat_template, normalize_messages
from residency.model.generation_config import load_generation_defaults
from residency.model.reasoning import prompt_opens_reasoning
from residency.model.tokenizer import load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

# A template of our own with Nemotron's switches: thinking on opens <think> in the prompt, off closes it.
TEMPLATE = r"""{%- set think = enable_thinking if enable_thinking is defined else true -%}
{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if m.role == 'system' -%}
    {{ '<|im_start|>system\n' ~ m.content ~ ('\nlow effort' if low_effort else '') ~ '<|im_end|>\n' }}
  {%- elif m.role in ('user', 'assistant') -%}
    {%- generation -%}{{ '<|im_start|>' ~ m.role ~ '\n' ~ (m.content or '') ~ '<|im_end|>\n' }}{%- endgeneration -%}
  {%- else -%}{{ raise_exception('role ' ~ m.role ~ ' is not supported') }}
  {%- endif -%}
  {%- if ns.n > 50 -%}{%- break -%}{%- endif -%}
{%- endfor -%}
{%- if tools -%}{{ '<tools>' ~ (tools | tojson) ~ '</tools>\n' }}{%- endif -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' ~ ('<think>\n' if think else '<think></think>') -}}
{%- endif -%}
"""

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, hello chat", "thinking is a span of text",
          "café crème 日本語 🙂"] * 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A folder with a BPE tokenizer.json trained here, a tokenizer_config.json and chat_template.jinja."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    out = tmp_path_factory.mktemp("bpe")
    tok.save(str(out / "tokenizer.json"))  # here <think> stays a *special* token: decoding must keep it anyway
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
        "unk_token": "<unk>", "chat_template": "{{ 'this one is shadowed by chat_template.jinja' }}"}))
    (out / "chat_template.jinja").write_text(TEMPLATE)
    return out


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello 日本"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "and the fox?"}]


def test_template_from_the_jinja_file_with_thinking_branches(folder):
    tok = load_tokenizer(folder)
    on = tok.chat_template.render(MESSAGES)
    off = tok.chat_template.render(MESSAGES, enable_thinking=False)
    assert on.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello 日本<|im_end|>\n")
    assert on.endswith("<|im_start|>user\nand the fox?<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert off.endswith("<|im_start|>assistant\n<think></think>")
    assert prompt_opens_reasoning(on) and not prompt_opens_reasoning(off)
    assert "\nlow effort<|im_end|>" in tok.chat_template.render(MESSAGES, low_effort=True)
    assert not tok.chat_template.render(MESSAGES, add_generation_prompt=False).endswith("<think>\n")
    tools = [{"type": "function", "function": {"name": "add", "description": "adds – «x»"}}]
    assert '<tools>[{"type": "function", "function": {"name": "add", "description": "adds – «x»"}}]</tools>' in \
        tok.chat_template.render(MESSAGES, tools=tools)  # tojson without HTML or ASCII escaping
    ids = tok.encode(on, add_special_tokens=False)
    assert ids[0] == tok.token_id("<|im_start|>") and ids[-2:] == tok.encode("<think>\n", add_special_tokens=False)
    # special tokens are hidden when decoding, the reasoning markers are kept (here they are "special" too)
    assert tok.decode(ids) == on.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_rendering_matches_transformers(folder):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    ours = load_tokenizer(folder)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    for kwargs in ({}, {"enable_thinking": False}, {"low_effort": True}, {"tools": tools}):
        for gen in (True, False):
            expected = theirs.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False, **kwargs)
            got = ours.chat_template.render(MESSAGES, add_generation_prompt=gen, **kwargs)
            assert got == expected
            ids = theirs.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, **kwargs)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.encode(got, add_special_tokens=False) == list(ids)


def test_tiny_checkpoint_template_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from residency.model.tiny_tokenizer import write_chat_tokenizer

    write_chat_tokenizer(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    ours = load_tokenizer(tmp_path)
    history = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
               {"role": "assistant", "content": "a1", "reasoning_content": "r1"}, {"role": "user", "content": "q2"},
               {"role": "assistant", "content": "a2", "reasoning_content": "r2"}]
    for kwargs in ({}, {"enable_thinking": False}, {"low_effort": True}):
        expected = theirs.apply_chat_template(history, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.chat_template.render(history, **kwargs) == expected
    text = ours.chat_template.render(history)
    assert "<think></think>a1" in text and "<think>r2</think>a2" in text  # reasoning kept after the last user turn
    assert ours.eos_token_id == 11 and ours.bos_token_id == 1


def test_template_globals():
    t = ChatTemplate("{% set ns = namespace(x=1) %}{% set ns.x = ns.x + 1 %}{{ ns.x }}"
                     "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}"
                     "{{ strftime_now('%Y')|length }}{{ bos_token }}{{ x | tojson(indent=1) }}")
    out = t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], x=[1], bos_token="<s>")
    assert out == "2user4<s>[\n 1\n]"
    with pytest.raises(InputError, match="may not set '_x'"):
        ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}").render([{"role": "user", "content": "a"}])
    with pytest.raises(InputError, match="unsafe|not safely|access"):
        ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "a"}])


def test_message_checks():
    with pytest.raises(InputError, match="not a string; wrap it"):
        normalize_messages("hello")
    with pytest.raises(InputError, match="non-empty list"):
        normalize_messages([])
    with pytest.raises(InputError, match=r"messages\[1\].role must be a non-empty string"):
        normalize_messages([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(InputError, match=r"messages\[0\].content is missing"):
        normalize_messages([{"role": "user"}])
    with pytest.raises(InputError, match=r"messages\[0\].content\[1\] must be a text part .*'image_url'"):
        normalize_messages([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                         {"type": "image_url", "image_url": {}}]}])
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    out = normalize_messages([{"role": "user", "content": parts},
                              {"role": "assistant", "content": None, "thinking": "t"}])
    assert out[0]["content"] == "ab" and out[1]["reasoning_content"] == "t"


def test_template_errors(folder, tmp_path):
    tok = load_tokenizer(folder)
    with pytest.raises(InputError, match="refused these messages: role tool is not supported"):
        tok.chat_template.render([{"role": "tool", "content": "x"}])
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(CheckpointError, match=r"chat_template.jinja: the chat template does not compile \(line 1"):
        load_tokenizer(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "tool_use",
                                                                                     "template": "x"}]}))
    with pytest.raises(CheckpointError, match="without one named 'default'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default",
                                                                                     "template": "{{ 1 }}"}]}))
    assert load_tokenizer(tmp_path).chat_template.render([{"role": "user", "content": "a"}]) == "1"
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    assert load_tokenizer(tmp_path).chat_template is None
    assert load_chat_template(tmp_path) is None


def test_generation_defaults(tmp_path):
    d = load_generation_defaults(tmp_path)
    assert (d.temperature, d.top_p, d.max_new_tokens, d.eos_token_ids) == (1.0, 0.95, None, ())
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "max_new_tokens": 7, "eos_token_id": [2, 11]}))
    d = load_generation_defaults(tmp_path, config_eos=2, tokenizer_eos=11)
    assert (d.temperature, d.top_p, d.max_new_tokens, d.eos_token_ids) == (0.6, 0.9, 7, (2, 11))
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": 5}))
    d = load_generation_defaults(tmp_path, config_eos=[2])
    assert d.temperature == 0.0 and d.top_p == 0.95 and d.eos_token_ids == (5, 2)
    for bad, message in (("{", "not readable JSON"), ('{"temperature": "hot"}', "temperature must be a number"),
                         ('{"eos_token_id": ["x"]}', "eos_token_id must be a token id"),
                         ('{"max_new_tokens": 0}', "max_new_tokens must be a whole number")):
        (tmp_path / "generation_config.json").write_text(bad)
        with pytest.raises(CheckpointError, match=message):
            load_generation_defaults(tmp_path)
