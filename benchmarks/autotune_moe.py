"""Measure MoE kernel tile sizes on the local GPU and write a tuning table for it.

    python benchmarks/autotune_moe.py                      # Super shapes, bf16, into src/kernels/configs/
    python benchmarks/autotune_moe.py --quick --out-dir /tmp/tables

For each token count the decode path (up to ``--decode-max`` tokens) and the prefill path are
tuned by coordinate search: the up-projection tile (with BLOCK_M for prefill) first, with the
down tile at its default, then the down tile. Each candidate is the median of ``--repeats``
CUDA-event timings of a whole ``moe_gather_gemm`` call queued behind a spin kernel
(``bench_kernels.cuda_time_queued``: the GPU's time, without the host's launch work, which is the
same for every tile and would hide their differences at small token counts); candidates that fail to compile or run
out of shared memory are skipped. ``decode_max_tokens`` is the largest tuned token count up to
which the decode path was faster at every tuned count. The table (``"measured": true``, with
device, versions and date) is written atomically under the name ``tuning.table_name`` gives,
where ``moe_gather_gemm`` finds it.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from bench_kernels import cuda_time_queued, relative_error
from residency.kernels import moe_gather_gemm, moe_gather_gemm_reference, route
from residency.kernels.moe.tuning import (
    CONFIG_DIR,
    DEFAULT_TABLE,
    GemmTile,
    MoeConfig,
    TuningTable,
    load_table,
    table_name,
    table_to_json,
)

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
WARPS_STAGES = ((4, 3), (4, 4), (8, 3), (8, 4))


def decode_tiles(quick: bool) -> list[GemmTile]:
    grid = itertools.product((16, 32), (256,), (4,), (3,)) if quick else itertools.product(
        (8, 16, 32), (128, 256, 512), (2, 4, 8), (2, 3, 4)
    )
    return [GemmTile(n, k, 1, w, s) for n, k, w, s in grid]


def prefill_tiles(quick: bool) -> list[GemmTile]:
    nk = ((64, 64), (128, 64)) if quick else ((64, 64), (128, 64), (128, 128), (256, 64), (64, 128))
    groups = (8,) if quick else (1, 8)
    ws = WARPS_STAGES[:1] if quick else WARPS_STAGES
    return [GemmTile(n, k, g, w, s) for (n, k), g, (w, s) in itertools.product(nk, groups, ws)]


def best_config(time_of, candidates: list[MoeConfig]) -> tuple[MoeConfig, float]:
    """The fastest candidate and its time; candidates that do not compile or run are skipped."""
    best, best_ms = None, float("inf")
    for config in candidates:
        try:
            ms = time_of(config)
        except Exception as err:  # a tile too large for this GPU is just not a candidate
            print(f"  skip {config}: {type(err).__name__}: {str(err).splitlines()[0][:120]}", file=sys.stderr)
            continue
        if ms < best_ms:
            best, best_ms = config, ms
    if best is None:
        raise SystemExit("no candidate configuration ran; see the errors above")
    return best, best_ms


def tune(problem: tuple, path: str, args: argparse.Namespace, default: MoeConfig) -> tuple[MoeConfig, float]:
    """Coordinate search for one path and token count."""

    def time_of(config: MoeConfig) -> float:
        call = lambda: moe_gather_gemm(*problem, path=path, config=config)  # noqa: E731
        return cuda_time_queued([call], args.warmup, args.repeats)["ms"]

    if path == "decode":
        tiles, block_ms = decode_tiles(args.quick), (default.BLOCK_M,)
    else:
        tiles, block_ms = prefill_tiles(args.quick), ((16, 64) if args.quick else (16, 32, 64, 128))
    first = [MoeConfig(up, default.down, m) for m in block_ms for up in tiles]
    best, _ = best_config(time_of, first)
    return best_config(time_of, [MoeConfig(best.up, down, best.BLOCK_M) for down in tiles])


def write_atomically(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp, indent=2)
        tmp.write("\n")
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(CONFIG_DIR), help="folder for the table (default: the package's)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--latent", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2688)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=22)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--decode-max", type=int, default=32, help="largest token count tried on the decode path")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="a few candidates only (a smoke run)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("autotune_moe.py needs a CUDA GPU and found none; no table was written.", file=sys.stderr)
        return 2

    import triton

    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_up, shape_down = (args.experts, args.inter, args.latent), (args.experts, args.latent, args.inter)
    up = (torch.randn(shape_up, device="cuda", generator=gen) / args.latent**0.5).to(dtype)
    down = (torch.randn(shape_down, device="cuda", generator=gen) / args.inter**0.5).to(dtype)
    slot_of_expert = torch.randperm(args.experts, device="cuda", generator=gen).to(torch.int32)
    defaults = load_table(DEFAULT_TABLE)

    decode, prefill, times = {}, {}, {}
    for tokens in (int(t) for t in args.tokens.split(",")):
        logits = torch.randn(tokens, args.experts, device="cuda", generator=gen)
        ids, weights = route(logits, None, args.top_k, 1.0)
        x = torch.randn(tokens, args.latent, device="cuda", generator=gen).to(dtype)
        problem = (x, up, down, slot_of_expert, ids, weights)
        reference = moe_gather_gemm_reference(*problem)
        paths = ("decode", "prefill") if tokens <= args.decode_max else ("prefill",)
        for path in paths:
            config, ms = tune(problem, path, args, defaults.config(path, tokens))
            error = relative_error(moe_gather_gemm(*problem, path=path, config=config), reference)
            if error > 2e-2:
                raise SystemExit(f"{path} at {tokens} tokens with {config} is wrong (relative error {error:.3g})")
            (decode if path == "decode" else prefill)[tokens] = config
            times[(path, tokens)] = ms
            print(f"{tokens:5d} tokens {path:8s} {ms:8.3f} ms  {config}", flush=True)

    decode_max = 0
    for tokens in sorted(decode):
        if times[("decode", tokens)] >= times[("prefill", tokens)]:
            break
        decode_max = tokens
    if not decode:
        decode = defaults.decode
    table = TuningTable("", True, decode, prefill, decode_max)
    device = torch.cuda.get_device_name()
    note = (
        f"Measured by benchmarks/autotune_moe.py{' --quick' if args.quick else ''}: median of {args.repeats} "
        f"CUDA-event timings per candidate, coordinate search (up tile, then down tile)."
    )
    meta = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "shape": {"latent": args.latent, "inter": args.inter, "experts": args.experts, "top_k": args.top_k},
        "times_ms": {f"{path}:{tokens}": round(ms, 4) for (path, tokens), ms in sorted(times.items())},
    }
    out = Path(args.out_dir) / table_name(device, args.latent, args.inter, dtype)
    write_atomically(out, table_to_json(table, note, **meta))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
