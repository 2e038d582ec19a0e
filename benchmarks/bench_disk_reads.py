"""Experts a plan leaves on disk: read one after another against several at once, as the runtime reads them.

    python benchmarks/bench_disk_reads.py [--out docs/benchmarks/disk_reads] [--readers 1 2 4 8] [--repeats 3]

A checkpoint with one MoE layer of 128 Super-shaped BF16 experts (L=1024, I=2688: 11 MB each,
1.4 GB) is written under ``--dir`` (default: the system's temporary folder). A host store that
leaves every expert on disk is read by the runtime's own reader (``DiskReader.sources``: what a
copy job with misses on disk does before its copies are issued), ``--experts`` at a time (the
misses of one layer call that are on disk), with ``disk_readers`` = each ``--readers`` count in
turn. Before every read the page cache is dropped (``/proc/sys/vm/drop_caches``, needs root), so
the bytes come from the disk; where that is not allowed they come from the page cache, and the
output says so. No expert is read twice while the checkpoint lasts (a disk or a virtual machine's
host may cache what was read), the order of the reader counts turns every repetition, and the
table gives the median over the repetitions and the ratio against the first reader count. The
records read are checked against the checkpoint's tensors first.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import git_commit, run_meta, save_report
from residency.runtime.backend import LayerSlotPlan, OffloadRuntime, RuntimeOptions
from residency.runtime.ledger import DeviceLedger
from residency.runtime.store import ExpertLayout, HostExpertStore

from residency.model.checkpoint import Checkpoint
from residency.testing import write_tiny_checkpoint

EXPERTS, TOP_K, LATENT, INNER = 128, 22, 1024, 2688


def drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache; False where that is not allowed (not root, not Linux)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="write OUT.json and OUT.md")
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoint is written (its disk is measured)")
    parser.add_argument("--readers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--experts", type=int, default=8, help="experts per read (a layer call's misses on disk)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = write_tiny_checkpoint(Path(tmp) / "ckpt", seed=1, dtype=torch.bfloat16, pattern="E",
                                       n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_latent_size=LATENT,
                                       moe_intermediate_size=INNER)
        ckpt = Checkpoint(folder)
        layer = ckpt.config.moe_layers[0]
        prefix = f"backbone.layers.{layer}.mixer.experts"
        layout = ExpertLayout(INNER, LATENT, torch.bfloat16)
        store = HostExpertStore(layout, 1, EXPERTS, disk=[range(EXPERTS)])
        store.fill(ckpt, [prefix])
        runtimes = {n: OffloadRuntime(store, [LayerSlotPlan((), 0)], DeviceLedger(torch.device("cpu"), None),
                                      RuntimeOptions(disk_readers=n), None, TOP_K) for n in args.readers}
        # the records read are the checkpoint's bytes
        first = runtimes[max(args.readers)]._disk.sources(0, [0, 5])
        for e, record in zip((0, 5), first):
            want = ckpt.read_tensor(f"{prefix}.{e}.up_proj.weight").reshape(-1)
            assert torch.equal(layout.up(record[None])[0].reshape(-1), want), e
        unread = [e for e in np.random.default_rng(0).permutation(EXPERTS).tolist() if e not in (0, 5)]
        if len(unread) < args.repeats * len(args.readers) * args.experts:
            parser.error(f"{args.repeats} x {len(args.readers)} reads of {args.experts} experts need more than the "
                         f"{len(unread)} experts not read yet: fewer --repeats, --readers or --experts")
        seconds: dict[int, list[float]] = {n: [] for n in args.readers}
        cold = True
        for rep in range(args.repeats):
            turn = rep % len(args.readers)
            for n in args.readers[turn:] + args.readers[:turn]:
                experts, unread = unread[:args.experts], unread[args.experts:]
                cold = drop_page_cache() and cold
                t0 = time.perf_counter()
                runtimes[n]._disk.sources(0, experts)
                seconds[n].append(time.perf_counter() - t0)
        for rt in runtimes.values():
            rt.close()
        ckpt.close()
    nbytes = args.experts * layout.record_bytes
    base = statistics.median(seconds[args.readers[0]])
    rows = [{"readers": n, "median_s": statistics.median(s), "gbps": nbytes / statistics.median(s) / 1e9,
             "vs_first": base / statistics.median(s), "seconds": s} for n, s in seconds.items()]
    source = "disk (page cache dropped before each read)" if cold else "page cache (could not drop it)"
    lines = [f"Reading {args.experts} experts of {layout.record_bytes / 1e6:.1f} MB ({nbytes / 1e6:.0f} MB) that the "
             f"store leaves on disk, from {source}; median of {args.repeats}", "",
             f"| disk_readers | median ms | GB/s | speed against {args.readers[0]} reader(s) |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['readers']} | {1e3 * r['median_s']:.1f} | {r['gbps']:.2f} | {r['vs_first']:.2f}x |")
    best = max(rows, key=lambda r: r["gbps"])
    lines += ["", f"disk reads: {best['gbps']:.2f} GB/s with {best['readers']} readers = {best['vs_first']:.2f}x "
              f"{args.readers[0]} reader(s)"]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        meta = run_meta(commit=git_commit(), source=source, cores=os.cpu_count())
        header = (f"# Disk-tier reads\n\n`benchmarks/bench_disk_reads.py`, {meta['date']}, {meta['cpu']} "
                  f"({meta['cores']} cores), torch {meta['torch']}, commit {meta['commit']}.\n\n")
        save_report(args.out, meta, rows, header, text)


if __name__ == "__main__":
    main()
