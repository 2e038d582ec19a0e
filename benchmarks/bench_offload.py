"""Offloaded decode speed and expert fetch bandwidth, against baselines run in the same process.

    python benchmarks/bench_offload.py [--device cuda] [--out docs/benchmarks/offload] [--tokens 64]

1. Fetch bandwidth (CUDA only): per-expert host-to-device copies of Super-sized BF16 expert
   records from the pinned host store into slots, as the runtime issues them, against one large
   pinned copy of the same total bytes. Target: >= 90 % of the large copy.
2. Decode tokens/s of the tiny model and a mid-size model (more, larger experts) at several
   budgets (share of the experts that fit), against: every expert resident; naive synchronous
   on-demand copying (no cache, no prefetch: each routed expert copied into staging and waited
   for); every miss on the CPU (no slots). Each offloaded run's prompt logits are compared with the
   resident run's and its greedy tokens too: the models are bf16, where a different summation
   order (the offloaded parts are summed apart) may flip a rounding and, later, a near-tied token,
   so a difference is recorded in the row (``tokens_equal``, ``first_difference``), not fatal.
   Exactness itself is the tests' job (fp32 on CPU; ``pytest -m gpu`` on CUDA).

Every result is printed as soon as it is measured, and ``OUT.json`` / ``OUT.md`` are rewritten
after each (``"complete": false`` until the last), so a run cut short keeps what it measured.
``--device cpu`` runs the same program on the CPU device (copies on the copy thread): useful to
check the program, not a GPU figure, and labelled as such in the output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from _machine import cpu_model, git_commit

from residency import OffloadedNemotron
from residency.offload import fixed_bytes
from residency.testing import relative_error, write_tiny_checkpoint

MODELS = {
    "tiny (32 experts, top-4)": dict(moe_intermediate_size=128, moe_latent_size=64),
    "mid (128 experts, top-8, hidden 512)": dict(n_routed_experts=128, num_experts_per_tok=8, hidden_size=512,
                                                 moe_latent_size=256, moe_intermediate_size=768,
                                                 moe_shared_expert_intermediate_size=512, intermediate_size=1024,
                                                 mamba_num_heads=16, mamba_head_dim=32, num_attention_heads=8,
                                                 head_dim=64),
}
SHARES = (0.1, 0.25, 0.5)
CONTEXT = 1024


def fetch_bandwidth(device: torch.device, experts: int = 64) -> dict:
    """GB/s of per-expert copies (one record each, the runtime's copy engine) vs one large pinned copy."""
    from residency.runtime.copies import DEMAND, CudaCopyEngine
    from residency.runtime.store import ExpertLayout, HostExpertStore

    layout = ExpertLayout(2688, 1024, torch.bfloat16)  # a Super expert: 11 MB
    store = HostExpertStore(layout, 1, experts, pin=True)
    slots = torch.empty(experts, layout.record_numel, dtype=layout.dtype, device=device)
    engine = CudaCopyEngine(device)
    total = experts * layout.record_bytes

    def per_expert() -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        rows = np.arange(experts, dtype=np.int64)  # one record per copy, as the runtime issues a layer's misses
        engine.copy_records(slots, store.buffers[0], rows, rows, DEMAND).wait()
        return time.perf_counter() - t0

    def one_copy() -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.cuda.stream(engine.streams[DEMAND]):
            slots.view(-1).copy_(store.buffers[0].view(-1), non_blocking=True)
        engine.streams[DEMAND].synchronize()
        return time.perf_counter() - t0

    for _ in range(2):
        per_expert(), one_copy()
    a = statistics.median(per_expert() for _ in range(5))
    b = statistics.median(one_copy() for _ in range(5))
    pinned = store.pinned
    store.unpin()
    return {"pinned": pinned, "bytes": total, "per_expert_gbps": total / a / 1e9,
            "one_copy_gbps": total / b / 1e9, "ratio": b / a}


def decode_rate(model: OffloadedNemotron, ids: torch.Tensor, tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decode tokens/s of ``tokens`` new tokens after a warm-up; expert counters cover the timed run only."""
    model.generate(ids, max_new_tokens=4, temperature=0, stop_at_eos=False)  # warm-up
    model.reset_stats()
    out = model.generate(ids, max_new_tokens=tokens, temperature=0, stop_at_eos=False)
    return model.stats()["decode_tokens_per_s"], out


def first_difference(got: torch.Tensor, want: torch.Tensor, prompt: int) -> int | None:
    """Index of the first generated token where ``got`` and ``want`` differ, None when they are equal."""
    if torch.equal(got, want):
        return None
    n = min(got.shape[-1], want.shape[-1])
    differs = (got[..., :n] != want[..., :n]).reshape(-1, n).any(0).nonzero()
    return int(differs[0]) - prompt if len(differs) else n - prompt


def bench_model(name: str, overrides: dict, device: str, tokens: int, folder: Path):
    """Yield the resident row, then one row per offloaded run, each as soon as it is measured."""
    ckpt = write_tiny_checkpoint(folder / name.split()[0], seed=1, dtype=torch.bfloat16, **overrides)
    resident = OffloadedNemotron.from_pretrained(ckpt, device=device)
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    logits = resident(ids).float().cpu()
    rate, expected = decode_rate(resident, ids, tokens)
    expected = expected.cpu()
    yield {"model": name, "run": "resident", "share": 1.0, "tokens_per_s": rate, "vs_resident": 1.0}
    c = resident.config
    fixed = fixed_bytes(c, torch.bfloat16, context=CONTEXT)
    total = c.num_moe_layers * c.n_routed_experts
    runs = [(f"offloaded {int(100 * s)} %", s, {}) for s in SHARES]
    runs += [("naive synchronous on-demand", 0.0, dict(prefetch=False, cpu_experts=False, policy="static")),
             ("all misses on CPU", 0.0, dict(prefetch=False, cpu_experts=True))]
    for label, share, kwargs in runs:
        budget = fixed.total + int(share * total) * fixed.layout.record_bytes
        model = OffloadedNemotron.from_pretrained(ckpt, device=device, vram_budget=f"{budget}B", context=CONTEXT,
                                                  quiet=True, **kwargs)
        try:
            logits_error = relative_error(model(ids).float().cpu(), logits)
            r, out = decode_rate(model, ids, tokens)
            experts = model.stats()["experts"]["by_phase"]["decode"]
            looked = experts["hits"] + experts["misses"]
            differs = first_difference(out.cpu(), expected, ids.shape[-1])
            yield {"model": name, "run": label, "share": share, "tokens_per_s": r, "vs_resident": r / rate,
                   "hit_rate": experts["hits"] / looked if looked else None,
                   "h2d_mb_per_token": experts["h2d_bytes"] / 1e6 / max(tokens - 1, 1),
                   "cpu_experts": experts["cpu_computed"], "prompt_logits_rel_err": logits_error,
                   "tokens_equal": differs is None, "first_difference": differs}
        finally:
            model.runtime.close()


TABLE_HEAD = ["| model | run | tokens/s | vs resident | decode hit rate | MB to device per token | prompt logits "
              "vs resident | greedy tokens |", "|---|---|---|---|---|---|---|---|"]


def table_row(r: dict) -> str:
    hit = "" if r.get("hit_rate") is None else f"{100 * r['hit_rate']:.1f} %"
    mb = "" if "h2d_mb_per_token" not in r else f"{r['h2d_mb_per_token']:.2f}"
    err = "" if "prompt_logits_rel_err" not in r else f"{r['prompt_logits_rel_err']:.1e}"
    same = "" if "tokens_equal" not in r else (
        "equal" if r["tokens_equal"] else f"differ from token {r['first_difference']}")
    return (f"| {r['model']} | {r['run']} | {r['tokens_per_s']:.1f} | {r['vs_resident']:.2f} | {hit} | {mb} | "
            f"{err} | {same} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    result: dict = {"meta": {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device_kind": device.type,
                             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
                             "torch": torch.__version__, "python": platform.python_version(),
                             "commit": git_commit()}, "complete": False, "rows": []}
    head = [f"Offloaded decode on {result['meta']['device']} ({device.type})"
            + ("" if device.type == "cuda" else ": the cpu device, a check of the program, not a GPU figure"), ""]
    fetch_lines: list[str] = []

    def save() -> None:  # after every result: a run cut short keeps what it measured
        if args.out is None:
            return
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        m = result["meta"]
        text = "\n".join(head + fetch_lines + TABLE_HEAD + [table_row(r) for r in result["rows"]])
        status = "" if result["complete"] else "\n\n(incomplete: the run stopped before its last result)"
        args.out.with_suffix(".md").write_text(
            f"# Offloaded decode\n\n`benchmarks/bench_offload.py --device {device.type}`, {m['date']}, {m['device']}, "
            f"torch {m['torch']}, commit {m['commit']}.\n\n{text}{status}\n")

    print("\n".join(head), flush=True)
    if device.type == "cuda":
        fetch = fetch_bandwidth(device)
        result["fetch"] = fetch
        fetch_lines = [f"per-expert fetch {fetch['per_expert_gbps']:.1f} GB/s = {100 * fetch['ratio']:.0f} % of one "
                       f"large pinned copy ({fetch['one_copy_gbps']:.1f} GB/s), {fetch['bytes'] / 1e9:.2f} GB", ""]
        print("\n".join(fetch_lines), flush=True)
        save()
    print("\n".join(TABLE_HEAD), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in MODELS.items():
            for row in bench_model(name, overrides, args.device, args.tokens, Path(tmp)):
                result["rows"].append(row)
                print(table_row(row), flush=True)
                save()
    result["complete"] = True
    save()


if __name__ == "__main__":
    main()
