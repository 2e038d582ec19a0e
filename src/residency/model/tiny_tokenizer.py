"""The tiny model's chat tokenizer: a small byte-level BPE and a Nemotron-style chat template.

:func:`write_chat_tokenizer` trains a byte-level BPE with ``tokenizers`` in-process on a fixed
corpus (deterministic: the same files every time) and writes what a Hugging Face chat checkpoint
ships: ``tokenizer.json``, ``tokenizer_config.json`` (special tokens and :data:`TINY_CHAT_TEMPLATE`)
and ``generation_config.json`` (end tokens only, so the sampling defaults apply).

Token layout, after Nemotron 3's: 0 ``<unk>`` (also padding), 1 ``<s>``, 2 ``</s>``, 10
``<|im_start|>``, 11 ``<|im_end|>`` (end tokens 2 and 11), 12 ``<think>`` and 13 ``</think>``
(plain added tokens, so decoding keeps them), the 256 byte symbols, then the merges.
The template writes ChatML turns; with ``enable_thinking`` (the default) the generation prompt
opens the thinking span (``<think>`` and a newline), without it the span is closed at once
(``<think></think>``); ``low_effort`` adds a line to the system turn; earlier assistant turns keep
their reasoning only after the last user message.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

SPECIAL_TOKENS = (
    ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, 10)]
    + ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]
)
PLAIN_ADDED = ("<think>", "</think>")  # added tokens that decoding keeps
BOS, EOS, IM_END, PAD = "<s>", "</s>", "<|im_end|>", "<unk>"
TARGET_VOCAB = 512

TINY_CHAT_TEMPLATE = r"""{#- residency's tiny chat template: ChatML turns and a <think> span for the reasoning trace -#}
{%- set thinking = enable_thinking if enable_thinking is defined else true -%}
{%- set effort_low = low_effort if low_effort is defined else false -%}
{%- if messages and messages[0]['role'] == 'system' -%}
    {%- set system = messages[0]['content'] or '' -%}
    {%- set turns = messages[1:] -%}
{%- else -%}
    {%- set system = '' -%}
    {%- set turns = messages -%}
{%- endif -%}
{%- if effort_low -%}
    {%- set system = (system ~ '\n\n' if system else '') ~ 'Reasoning effort: low. Think briefly.' -%}
{%- endif -%}
{%- if system or tools -%}
    {{- '<|im_start|>system\n' ~ system -}}
    {%- if tools -%}
        {{- '\n\nTools you may call:' -}}
        {%- for tool in tools -%}
            {{- '\n' ~ (tool | tojson) -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\n' -}}
{%- endif -%}
{%- set ns = namespace(last_user=-1) -%}
{%- for m in turns -%}
    {%- if m['role'] == 'user' -%}
        {%- set ns.last_user = loop.index0 -%}
    {%- endif -%}
{%- endfor -%}
{%- for m in turns -%}
    {%- if m['role'] == 'user' -%}
        {{- '<|im_start|>user\n' ~ m['content'] ~ '<|im_end|>\n' -}}
    {%- elif m['role'] == 'assistant' -%}
        {%- set keep = m['reasoning_content'] is defined and m['reasoning_content'] and loop.index0 > ns.last_user -%}
        {{- '<|im_start|>assistant\n<think>' ~ (m['reasoning_content'] if keep else '') ~ '</think>' -}}
        {{- (m['content'] or '') ~ '<|im_end|>\n' -}}
    {%- elif m['role'] == 'tool' -%}
        {{- '<|im_start|>user\n<tool_response>\n' ~ m['content'] ~ '\n</tool_response><|im_end|>\n' -}}
    {%- elif m['role'] == 'system' -%}
        {{- raise_exception('a system message may only come first') -}}
    {%- else -%}
        {{- raise_exception("unknown role '" ~ m['role'] ~ "': use system, user, assistant or tool") -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' ~ ('<think>\n' if thinking else '<think></think>') -}}
{%- endif -%}
"""

# What the BPE learns its merges from: prose, code, chat phrases and a little non-ASCII text.
_CORPUS = [
    "The expert cache keeps the hottest experts on the GPU.",
    "Offloading moves the rest to pinned host memory, and prefetching guesses the next layer's experts.",
    "Each token reads only a few of the many experts; the router picks them by score.",
    "Hello! How can I help you today? Let me think about that for a moment.",
    "Sure, here is a short answer. First, consider the question. Then answer it clearly.",
    "What is the capital of France? The capital of France is Paris.",
    "Please write a small function that adds two numbers and returns the result.",
    "The river wound slowly through the valley, past orchards heavy with late summer fruit.",
    "She opened the letter at the kitchen table and read it twice before saying a word.",
    "In the morning the harbour was quiet, and the fishing boats rocked gently at their moorings.",
    "History rarely moves in straight lines; it bends around the people who try to steer it.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "for (int i = 0; i < n; ++i) { sum += data[i] * weights[i]; }",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 10;",
    "import torch\nx = torch.randn(4, 8)\ny = x @ x.T\nprint(y.shape)\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1e-5",
    "Grüße aus München, ein Café am Fluss. Ça va très bien, merci.",
    "日本語のテキストと中文文本。 Emoji: 🙂 🚀 ✓ — “quotes” and ellipsis…",
]


@lru_cache(maxsize=1)
def tiny_tokenizer_json() -> str:
    """The tiny BPE's ``tokenizer.json`` text (trained once per process; the same every time)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TARGET_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(_CORPUS * 8, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))])
    raw = json.loads(tok.to_str())
    for entry in raw["added_tokens"]:
        if entry["content"] in PLAIN_ADDED:
            entry["special"] = False
    return json.dumps(raw, ensure_ascii=False, indent=2) + "\n"


def tiny_vocab_size() -> int:
    """Tokens in the tiny BPE (the tiny chat model's ``vocab_size``)."""
    raw = json.loads(tiny_tokenizer_json())
    return len(raw["model"]["vocab"])


def write_chat_tokenizer(folder: str | Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_json(), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END, "unk_token": PAD, "pad_token": PAD,
        "model_max_length": 4096, "clean_up_tokenization_spaces": False,
        "chat_template": TINY_CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": SPECIAL_TOKENS.index(BOS),
                  "eos_token_id": [SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)],
                  "pad_token_id": SPECIAL_TOKENS.index(PAD)}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    return folder
