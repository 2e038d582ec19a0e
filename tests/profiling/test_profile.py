"""The profiler: counts, masses and saliency against brute force; no effect on logits; traces; comparisons."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from residency.errors import ResidencyError
from residency.model.moe import ExpertBackend, MoEObserver
from residency.profiling.profile import Profile, coverage, top_n_jaccard

PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99, 100, 101], [1, 7, 8]]


class Recorder(MoEObserver):
    """Keeps every routing decision (the router outputs the brute force counts from)."""

    def __init__(self):
        self.events = []

    def on_routing(self, event):
        self.events.append((event.moe_index, event.is_decode, event.ids.clone(), event.weights.clone()))


def test_counts_and_mass_equal_brute_force(tiny_model):
    rec = Recorder()
    detach = tiny_model.model.add_observer(rec)
    try:
        profile = tiny_model.profile(PROMPTS, decode_tokens=3)
    finally:
        detach()
    cfg = tiny_model.config
    counts = torch.zeros(cfg.num_moe_layers, cfg.n_routed_experts, dtype=torch.float64)
    mass = torch.zeros_like(counts)
    decode_counts = torch.zeros_like(counts)
    for m, is_decode, ids, weights in rec.events:
        for t in range(ids.shape[0]):
            for j in range(ids.shape[1]):
                counts[m, ids[t, j]] += 1
                mass[m, ids[t, j]] += float(weights[t, j])
                if is_decode:
                    decode_counts[m, ids[t, j]] += 1
    assert torch.equal(profile.counts, counts)
    assert torch.allclose(profile.gate_mass, mass, rtol=1e-6, atol=1e-9)
    assert torch.equal(profile.phase("decode").counts, decode_counts)
    tokens = sum(len(p) for p in PROMPTS) + 3 * len(PROMPTS)
    assert profile.tokens == tokens
    assert profile.prompt_tokens[:, 1].tolist() == [3, 3, 3]
    per_layer = float(tokens * cfg.num_experts_per_tok)
    assert torch.equal(profile.counts.sum(-1), torch.full((cfg.num_moe_layers,), per_layer))


def test_saliency_equals_direct_computation(tiny_model):
    """REAP saliency = mean over routed tokens of weight x ||expert output|| (latent space), recomputed by hand."""
    net = tiny_model.model
    mixer = net.moe_mixers[1]
    latents, decisions = [], []
    h1 = mixer.fc1_latent_proj.register_forward_hook(lambda mod, inp, out: latents.append(out.detach().clone()))
    rec = Recorder()
    detach = net.add_observer(rec)
    try:
        profile = tiny_model.profile([PROMPTS[1]])
    finally:
        h1.remove()
        detach()
    decisions = [(ids, w) for m, _, ids, w in rec.events if m == 1]
    x, (ids, weights) = latents[0], decisions[0]
    experts = mixer.experts
    checked = 0
    for e in ids.flatten().unique()[:5].tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        y = F.linear(torch.relu(F.linear(x[t], experts.up_proj[e])) ** 2, experts.down_proj[e])
        direct = (weights[t, j].double() * y.double().norm(dim=-1)).mean()
        assert profile.saliency[1, e].item() == pytest.approx(direct.item(), rel=1e-5)
        checked += 1
    assert checked == 5
    assert (profile.saliency[profile.counts == 0] == 0).all()


def test_profiler_does_not_change_logits(tiny_model):
    ids = torch.tensor([PROMPTS[1]])
    plain = tiny_model(ids)
    from residency.profiling.profile import ProfileObserver

    obs = ProfileObserver(tiny_model.config.num_moe_layers, tiny_model.config.n_routed_experts,
                          torch.device("cpu"), record_trace=True, co_activation=True)
    detach = tiny_model.model.add_observer(obs)
    try:
        observed = tiny_model(ids)
    finally:
        detach()
    assert torch.equal(plain, observed)
    assert obs.counts.sum() > 0


def test_trace_matches_profile(tiny_model):
    profile, trace = tiny_model.profile(PROMPTS, decode_tokens=2, trace=True)
    assert trace.num_tokens == profile.tokens and trace.num_prompts == 3
    assert trace.prompt_offsets.tolist() == [0, 10, 25, 30]
    assert trace.is_decode.sum() == 6 and trace.fingerprint == profile.fingerprint
    counts = torch.zeros_like(profile.counts)
    for m in range(trace.num_moe_layers):
        counts[m] += torch.bincount(trace.ids[:, m].reshape(-1), minlength=trace.num_experts).double()
    assert torch.equal(counts, profile.counts)
    mass = torch.zeros_like(profile.gate_mass)
    for m in range(trace.num_moe_layers):
        mass[m].index_add_(0, trace.ids[:, m].reshape(-1), trace.weights[:, m].reshape(-1).double())
    assert torch.allclose(mass, profile.gate_mass, rtol=1e-6)


def test_text_prompts_jsonl_dicts_and_errors(tiny_model):
    p = tiny_model.profile([{"id": "a", "text": "hello"}, {"input_ids": [1, 5, 6]}, "plain text"])
    assert p.prompt_names == ["a", "prompt-1", "prompt-2"] and len(set(p.prompt_hashes)) == 3
    with pytest.raises(ValueError, match="none of the keys"):
        tiny_model.profile([{"body": "x"}])
    with pytest.raises(ValueError, match="no prompts"):
        tiny_model.profile([])


def test_co_activation_pairs(tiny_model):
    p = tiny_model.profile(PROMPTS, co_activation=3)
    assert len(p.co_activation) == tiny_model.config.num_moe_layers
    a, b, n = p.co_activation[0][0]
    assert a < b and n >= 1


def test_coverage_jaccard_and_concentration():
    values = torch.tensor([[50.0, 30.0, 15.0, 5.0], [25.0, 25.0, 25.0, 25.0]])
    assert coverage(values, (0.5, 0.8, 0.9, 0.95)).tolist() == [[1, 2, 3, 3], [2, 4, 4, 4]]
    other = torch.tensor([[50.0, 0.0, 15.0, 30.0], [25.0, 25.0, 25.0, 25.0]])
    assert top_n_jaccard(values, other, 2).tolist() == [1 / 3, 1.0]


def test_select_and_prompt_jaccard(tiny_model):
    p = tiny_model.profile(PROMPTS)
    sub = p.select(["prompt-2", 0])
    assert sub.prompt_names == ["prompt-2", "prompt-0"]
    assert torch.equal(sub.counts, p.select([0, 2]).counts)
    m = p.prompt_jaccard()
    assert m.shape == (3, 3) and torch.allclose(m, m.T) and (m.diagonal() == 1).all()
    eff = p.effective_experts()
    assert ((eff >= 1) & (eff <= tiny_model.config.n_routed_experts)).all()


def test_dataframe(tiny_model):
    pytest.importorskip("pandas")
    p = tiny_model.profile(PROMPTS)
    df = p.to_dataframe()
    assert len(df) == p.num_moe_layers * p.num_experts
    assert df["counts"].sum() == p.counts.sum().item()
    assert set(df["model_layer"]) == set(tiny_model.config.moe_layers)


def test_merge_weighted_and_associative(tiny_model):
    a, b, c = (tiny_model.profile([p]) for p in PROMPTS)
    left = Profile.merge([Profile.merge([a, b]), c])
    right = Profile.merge([a, Profile.merge([b, c])])
    flat = Profile.merge([a, b, c])
    for x in (left, right):
        assert torch.equal(x.per_prompt_counts, flat.per_prompt_counts)
        assert torch.equal(x.per_prompt_saliency_sum, flat.per_prompt_saliency_sum)
    assert torch.equal(flat.counts, tiny_model.profile(PROMPTS).counts)
    doubled = Profile.merge([a, b], weights=[2.0, 1.0])
    assert torch.allclose(doubled.counts, 2 * a.counts + b.counts)
    assert doubled.tokens == 2 * a.tokens + b.tokens
    with pytest.raises(ValueError, match="one finite non-negative weight"):
        Profile.merge([a, b], weights=[1.0])
    with pytest.raises(ValueError, match="one finite non-negative weight"):
        Profile.merge([a, b], weights=[1.0, float("nan")])


def test_fractional_weights_keep_raw_observations(tiny_model):
    a, b = (tiny_model.profile([p]) for p in PROMPTS[:2])
    w = Profile.merge([a, b], weights=[0.01, 1.0])
    # the stored arrays stay raw observations; the weights apply to the aggregates only
    assert torch.equal(w.per_prompt_counts, torch.cat([a.per_prompt_counts, b.per_prompt_counts]))
    assert w.prompt_weights.tolist() == [0.01, 1.0]
    assert w.token_weight == pytest.approx(0.01 * a.tokens + b.tokens)
    assert w.tokens == round(0.01 * a.tokens + b.tokens)
    assert torch.allclose(w.counts, 0.01 * a.counts + b.counts)
    assert torch.allclose(w.gate_mass, 0.01 * a.gate_mass + b.gate_mass)
    expected_sal = (0.01 * a.saliency * a.counts + b.saliency * b.counts) / (0.01 * a.counts + b.counts)
    assert torch.allclose(w.saliency, torch.nan_to_num(expected_sal))
    per_layer = torch.full((w.num_moe_layers,), w.token_weight * w.top_k, dtype=torch.float64)
    assert torch.allclose(w.counts.sum(-1), per_layer)
    # nested weighted merges are associative too (weights multiply)
    c = tiny_model.profile([PROMPTS[2]])
    left = Profile.merge([Profile.merge([a, b], [2.0, 3.0]), c], [5.0, 4.0])
    right = Profile.merge([a, Profile.merge([b, c], [15.0, 4.0])], [10.0, 1.0])
    assert torch.equal(left.prompt_weights, right.prompt_weights)
    assert torch.equal(left.gate_mass, right.gate_mass) and torch.equal(left.saliency, right.saliency)
    assert w.select([1]).prompt_weights.tolist() == [1.0]


def test_prompt_jaccard_matches_pairwise_and_ignores_unused_experts(tiny_model):
    p = tiny_model.profile(PROMPTS + [[1, 200, 201, 202, 203, 204]])
    m = p.prompt_jaccard(top_n=6)
    per = p.per_prompt_gate_mass.double().sum(1)
    for i in range(p.num_prompts):
        for j in range(p.num_prompts):
            assert m[i, j].item() == pytest.approx(top_n_jaccard(per[i], per[j], 6).mean().item())
    # a layer a prompt never reached has an empty top set, not the lowest expert ids
    values = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    other = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0]])
    assert top_n_jaccard(values, other, 2).tolist() == [1.0, 0.0]


def test_coverage_of_empty_phase_and_compare_shares(tiny_model):
    p = tiny_model.profile(PROMPTS)  # prefill only
    assert (p.phase("decode").coverage() == 0).all()
    assert (p.phase("prefill").coverage() == p.coverage()).all()
    q = tiny_model.profile([PROMPTS[0]])
    cmp = p.compare(q, top_n=8)
    for m in range(p.num_moe_layers):
        top_q = [e for e, _ in q.hottest(8)[m]]
        share = p.gate_mass[m, top_q].sum() / p.gate_mass[m].sum()
        assert cmp["self_mass_in_other_top"][m] == pytest.approx(share.item())
    assert cmp["jaccard"] == top_n_jaccard(p.gate_mass, q.gate_mass, 8).tolist()
    with pytest.raises(ValueError, match="counts or gate_mass"):
        p.prompt_jaccard(by="saliency")


def test_expert_module_that_ignores_pair_norms_is_refused(tiny_model):
    """A replacement expert implementation that does not fill the norms must not yield silent saliency."""
    net = tiny_model.model
    mixer = net.moe_mixers[0]
    original = mixer.experts

    class NoNorms(ExpertBackend):
        def submit(self, work):
            if work.pair_norms is not None:
                work.pair_norms.fill_(float("nan"))  # what an unfilled buffer may hold
            return original.submit(dataclasses.replace(work, pair_norms=None))

        def collect(self, handle):
            return original.collect(handle)

    mixer.experts = NoNorms()
    try:
        with pytest.raises(ResidencyError, match="pair_norms"):
            tiny_model.profile([PROMPTS[0]])
    finally:
        mixer.experts = original
    assert not any(m.observers for m in net.moe_mixers)  # the profiler detached itself
