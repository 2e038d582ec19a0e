"""Router top-k: Triton kernel (interpreted) against the torch reference, and the reference against HF."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from residency.kernels import route, route_reference


def separated_logits(tokens: int, experts: int, bias: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Random logits whose biased scores have no near-ties around the top k.

    The kernel's sigmoid may differ from torch's by an ulp, which could swap two experts that
    close; such rows are drawn again.
    """
    logits = torch.randn(tokens, experts) * 2
    for _ in range(100):
        choice = torch.sigmoid(logits) + (0 if bias is None else bias)
        top = choice.sort(dim=-1, descending=True).values[:, : min(top_k + 1, experts)]
        close = (top[:, :-1] - top[:, 1:] < 1e-5).any(dim=-1)
        if not close.any():
            return logits
        logits[close] = torch.randn(int(close.sum()), experts) * 2
    raise AssertionError("could not draw separated logits")


CASES = [
    # tokens, experts, top_k
    (1, 512, 22),
    (17, 512, 22),
    (5, 33, 1),
    (70, 40, 4),
    (3, 8, 8),
    (2, 100, 64),
]


@pytest.mark.parametrize("tokens,experts,top_k", CASES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in CASES])
@pytest.mark.parametrize("bias_kind", ["none", "mixed", "negative"])
def test_route_kernel_matches_reference(tokens, experts, top_k, bias_kind, device):
    bias = {
        "none": None,
        "mixed": torch.randn(experts) * 0.3,
        # every biased score negative: the ordering must not rely on scores being positive
        "negative": -3.0 - torch.rand(experts),
    }[bias_kind]
    logits = separated_logits(tokens, experts, bias, top_k)
    ref_ids, ref_weights = route_reference(logits, bias, top_k, 5.0)
    bias = None if bias is None else bias.to(device)
    ids, weights = route(logits.to(device), bias, top_k, 5.0, backend="triton")
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (tokens, top_k)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.sum(-1).cpu(), torch.full((tokens,), 5.0), rtol=1e-5, atol=0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_without_renormalize_and_scaling(renormalize, device):
    bias = torch.randn(64) * 0.1
    logits = separated_logits(9, 64, bias, 6)
    ids, weights = route(logits.to(device), bias.to(device), 6, 2.5, renormalize=renormalize, backend="triton")
    ref_ids, ref_weights = route_reference(logits, bias, 6, 2.5, renormalize=renormalize)
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)
    if not renormalize:
        torch.testing.assert_close(weights.cpu(), 2.5 * torch.sigmoid(logits).gather(1, ref_ids))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ties_go_to_the_lower_expert_index(backend, device):
    logits = torch.zeros(3, 40, device=device)
    logits[1, [5, 9, 30]] = 1.0  # three equal leaders, then 37 equal others
    ids, weights = route(logits, torch.zeros(40, device=device), 5, 1.0, backend=backend)
    assert ids[0].tolist() == [0, 1, 2, 3, 4]
    assert ids[1].tolist() == [5, 9, 30, 0, 1]
    torch.testing.assert_close(weights[0].cpu(), torch.full((5,), 0.2))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_minus_infinite_bias_still_gives_distinct_experts(backend, device):
    bias = torch.zeros(8)
    bias[:5] = float("-inf")
    logits = separated_logits(4, 8, bias, 3)
    ids, weights = route(logits.to(device), bias.to(device), 6, 1.0, backend=backend)
    for row in ids.tolist():
        assert sorted(row[:3]) == [5, 6, 7] and row[3:] == [0, 1, 2]
    assert torch.isfinite(weights).all()


def test_reference_matches_transformers_router():
    pytest.importorskip("transformers")
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter

    experts, hidden, top_k = 512, 64, 22
    config = SimpleNamespace(
        num_experts_per_tok=top_k,
        num_local_experts=experts,
        n_routed_experts=experts,
        hidden_size=hidden,
        routed_scaling_factor=5.0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=True,
    )
    router = NemotronHTopkRouter(config)
    with torch.no_grad():
        router.weight.normal_()
        router.e_score_correction_bias.normal_(std=0.5).sub_(1.0)
        logits, hf_weights, hf_ids = router(torch.randn(13, hidden))
    ids, weights = route_reference(logits, router.e_score_correction_bias, top_k, 5.0)
    # transformers leaves the top-k unsorted: compare per expert id
    hf_order, order = hf_ids.argsort(-1), ids.argsort(-1)
    assert torch.equal(hf_ids.gather(1, hf_order), ids.gather(1, order))
    torch.testing.assert_close(hf_weights.gather(1, hf_order), weights.gather(1, order), rtol=1e-6, atol=1e-7)


def test_reference_matches_plain_topk_without_ties():
    logits, bias = torch.randn(50, 512), torch.randn(512)
    ids, weights = route_reference(logits, bias, 22, 5.0)
    scores = torch.sigmoid(logits)
    top_ids = torch.topk(scores + bias, 22, dim=-1).indices
    top_weights = scores.gather(1, top_ids)
    assert torch.equal(ids, top_ids)
    torch.testing.assert_close(weights, 5.0 * top_weights / (top_weights.sum(-1, keepdim=True) + 1e-20))


def test_auto_backend_uses_the_interpreter_and_torch_is_explicit(monkeypatch, device):
    if device != "cpu":
        pytest.skip("checks the CPU interpreter dispatch")
    logits = torch.randn(2, 16)
    calls = []
    import residency.kernels.routing as routing

    monkeypatch.setattr(routing, "route_reference", lambda *a, **k: calls.append(1) or ("ref", None))
    route(logits, None, 2, 1.0)
    assert calls == []
    assert route(logits, None, 2, 1.0, backend="torch")[0] == "ref"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert route(logits, None, 2, 1.0)[0] == "ref"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        route(logits, None, 2, 1.0, backend="triton")


def test_bad_arguments_raise_clear_errors():
    logits = torch.randn(2, 16)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, None, 17, 1.0)
    with pytest.raises(ValueError, match="bias"):
        route(logits, torch.zeros(15), 2, 1.0)
    with pytest.raises(ValueError, match="top_k <= 64"):
        route(torch.randn(1, 100), None, 65, 1.0, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        route(logits, None, 2, 1.0, backend="cuda")
    ids, weights = route(torch.randn(1, 100), None, 65, 1.0, backend="torch")
    assert ids.shape == (1, 65)


def test_zero_tokens(device):
    ids, weights = route(torch.randn(0, 512, device=device), torch.zeros(512, device=device), 22, 5.0, backend="triton")
    assert ids.shape == weights.shape == (0, 22)


@pytest.mark.gpu
def test_route_on_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    bias = torch.randn(512) * 0.3 - 1.0
    logits = separated_logits(2048, 512, bias, 22)
    ids, weights = route(logits.cuda(), bias.cuda(), 22, 5.0)
    ref_ids, ref_weights = route_reference(logits, bias, 22, 5.0)
    # the GPU sigmoid may differ from torch's by an ulp or two: allow a rare swap of near-equal experts
    assert (ids.cpu() == ref_ids).float().mean() > 0.999
    same = (ids.cpu() == ref_ids).all(-1)
    torch.testing.assert_close(weights.cpu()[same], ref_weights[same], rtol=1e-5, atol=1e-6)


GROUP_CASES = [
    # tokens, experts, top_k, n_group, topk_group
    (7, 64, 4, 8, 2),
    (3, 32, 1, 4, 1),
    (9, 40, 6, 5, 3),
    (2, 512, 22, 8, 4),
]


@pytest.mark.parametrize("tokens,experts,top_k,n_group,topk_group", GROUP_CASES,
                         ids=["T{}-E{}-k{}-G{}-g{}".format(*c) for c in GROUP_CASES])
def test_group_limited_route_kernel_matches_reference(tokens, experts, top_k, n_group, topk_group, device):
    bias = torch.randn(experts) * 0.3
    logits = separated_logits(tokens, experts, bias, experts - 1)
    ref_ids, ref_weights = route_reference(logits, bias, top_k, 2.5, n_group=n_group, topk_group=topk_group)
    ids, weights = route(logits.to(device), bias.to(device), top_k, 2.5, n_group=n_group, topk_group=topk_group,
                         backend="triton")
    assert torch.equal(ids.cpu(), ref_ids)
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-5, atol=1e-6)
    # every chosen expert lies in one of the topk_group best groups (sum of the two best biased scores)
    choice = torch.sigmoid(logits) + bias
    group_scores = choice.view(tokens, n_group, -1).topk(2, dim=-1).values.sum(-1)
    best = group_scores.topk(topk_group, dim=-1).indices
    size = experts // n_group
    for t in range(tokens):
        assert set((ref_ids[t] // size).tolist()) <= set(best[t].tolist())


def test_group_limited_routing_refuses_impossible_groupings():
    logits = torch.randn(2, 12)
    with pytest.raises(ValueError, match="n_group"):
        route_reference(logits, None, 2, 1.0, n_group=5, topk_group=1)  # 12 does not split into 5
    with pytest.raises(ValueError, match="topk_group"):
        route_reference(logits, None, 4, 1.0, n_group=4, topk_group=1)  # one group of 3 cannot give 4
