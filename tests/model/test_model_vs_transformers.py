"""Logits and greedy generation equal Hugging Face transformers' NemotronHForCausalLM (fp32, tiny random models).

The checkpoints compared here are the ones transformers itself saves: a tiny model is written,
loaded into transformers, saved again with ``save_pretrained``, and both implementations load
that folder.
"""

from __future__ import annotations

import pytest
import torch

from residency import OffloadedNemotron
from residency.testing import write_tiny_checkpoint

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "tiny-latent": {},
    "non-latent-nano-style": dict(moe_latent_size=None, pattern="ME*EMEM-E", n_routed_experts=16,
                                  num_experts_per_tok=2),
    "groups-4-topk-8": dict(n_groups=4, mamba_num_heads=8, num_experts_per_tok=8, chunk_size=8,
                            pattern="M*EMME"),
    "topk-1-grouped-routing": dict(num_experts_per_tok=1, n_group=4, topk_group=2, pattern="EM*ME"),
    "top-22-of-64": dict(n_routed_experts=64, num_experts_per_tok=22, pattern="MEME*E"),
    "tied-embeddings": dict(tie_word_embeddings=True),  # lm_head reads the embedding table; no lm_head.weight
}


def hf_saved_checkpoint(tmp_path, name, overrides):
    ours = write_tiny_checkpoint(tmp_path / f"{name}-ours", seed=7, **overrides)
    hf = transformers.NemotronHForCausalLM.from_pretrained(ours, dtype=torch.float32).eval()
    folder = tmp_path / f"{name}-hf"
    hf.save_pretrained(folder)
    (folder / "residency_tokenizer.json").write_bytes((ours / "residency_tokenizer.json").read_bytes())
    return folder, hf


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_logits_match(tmp_path, name):
    folder, hf = hf_saved_checkpoint(tmp_path, name, CONFIGS[name])
    ours = OffloadedNemotron.from_pretrained(folder, device="cpu")
    for batch, seq in ((1, 1), (2, 37), (1, 50)):  # chunk sizes 16/8: 37 and 50 are not multiples
        ids = torch.randint(0, ours.config.vocab_size, (batch, seq))
        with torch.no_grad():
            expected = hf(ids).logits.float()
        got = ours(ids)
        assert got.shape == expected.shape
        assert rel_err(got, expected) <= 1e-4, (name, batch, seq)


def test_greedy_generate_matches_transformers_and_recompute(tmp_path):
    folder, hf = hf_saved_checkpoint(tmp_path, "gen", {})
    ours = OffloadedNemotron.from_pretrained(folder, device="cpu")
    prompt = torch.randint(3, 259, (1, 19))
    new = 24
    got = ours.generate(prompt, max_new_tokens=new, temperature=0, stop_at_eos=False)
    # recompute the full sequence every step, no cache
    seq = prompt.clone()
    for _ in range(new):
        seq = torch.cat([seq, ours(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(got, seq)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=new, do_sample=False, eos_token_id=None,
                               min_new_tokens=new, pad_token_id=0)
    assert torch.equal(got, expected)


def test_cached_decode_matches_full_forward_batched(tiny_model):
    ids = torch.randint(0, 259, (3, 40))
    full = tiny_model(ids)
    cache = tiny_model.model.new_cache(3)
    parts = [tiny_model.model(ids[:, :33], cache)]
    for t in range(33, 40):
        parts.append(tiny_model.model(ids[:, t:t + 1], cache))
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5


def test_tied_checkpoint_without_lm_head_reads_the_embedding_table(tmp_path):
    """tie_word_embeddings and no lm_head.weight stored: lm_head is the embedding table (one tensor, loaded
    once), resident and offloaded. transformers 5 does not tie NemotronH (it initialises a random lm_head),
    so the reference here is transformers with its lm_head set to the embedding table."""
    from residency.offload import fixed_bytes

    folder = write_tiny_checkpoint(tmp_path / "tied", seed=3, tie_word_embeddings=True)
    hf = transformers.NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    hf.lm_head.weight = hf.get_input_embeddings().weight
    ours = OffloadedNemotron.from_pretrained(folder, device="cpu")
    assert ours.model.lm_head.weight is ours.model.backbone.embeddings.weight
    ids = torch.randint(0, ours.config.vocab_size, (1, 19))
    with torch.no_grad():
        expected = hf(ids).logits.float()
    assert rel_err(ours(ids), expected) <= 1e-4
    fixed = fixed_bytes(ours.config, torch.float32, context=256)
    untied = fixed_bytes(ours.config.replace(tie_word_embeddings=False), torch.float32, context=256,
                         embeddings_on_host=False)
    table = ours.config.vocab_size * ours.config.hidden_size * 4
    assert fixed.host_embeddings == 0 and untied.dense - fixed.dense == table  # counted once, on the device
    budget = fixed.total + 8 * fixed.layout.record_bytes
    offloaded = OffloadedNemotron.from_pretrained(folder, device="cpu", vram_budget=f"{budget}B", context=256,
                                                  quiet=True)
    try:
        assert rel_err(offloaded(ids), expected) <= 1e-4
    finally:
        offloaded.runtime.close()
