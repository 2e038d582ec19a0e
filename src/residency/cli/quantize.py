"""``residency quantize``: a quantized checkpoint (ModelOpt NVFP4 / FP8, compressed-tensors W4A16) from a float one.

    residency quantize IN OUT --format nvfp4|fp8|w4a16 [--dense FORMAT|same] [--group-size N] [--asymmetric]

Routed experts are quantized to ``--format``; ``--dense`` also quantizes the dense Linears (Mamba
projections, attention, latent projections, shared experts; never ``lm_head``, embeddings, router,
convolutions or norms). NVFP4 experts with ``--dense fp8`` give a ModelOpt ``MIXED_PRECISION``
checkpoint like the official NVFP4 release. Round to nearest with the producers' scale rules
(:mod:`residency.model.quant.pack`); no activation calibration (weight-only).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

FORMATS = ("nvfp4", "fp8", "w4a16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an NVFP4 / FP8 (ModelOpt) or W4A16 (compressed-tensors) checkpoint from a BF16 one",
        description="residency quantize IN OUT --format nvfp4|fp8|w4a16 [--dense FORMAT|same] "
        "[--group-size N] [--asymmetric]",
    )
    p.add_argument("source", type=Path, help="float (BF16/FP16/FP32) Nemotron-H checkpoint folder")
    p.add_argument("out", type=Path, help="new folder to write (must not exist, or be empty)")
    p.add_argument("--format", required=True, choices=FORMATS, help="format of the routed experts")
    p.add_argument("--dense", default="none", choices=("none", "same", *FORMATS),
                   help="also quantize the dense Linears (default: none, experts only)")
    p.add_argument("--group-size", type=int, default=128,
                   help="w4a16: inputs per scale (default 128; 0 = one scale per output row)")
    p.add_argument("--asymmetric", action="store_true", help="w4a16: asymmetric (zero points)")
    p.add_argument("--shard-size", default="4GiB", help="largest output shard (default 4GiB)")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=run_quantize)


def _spec(fmt: str, group_size: int, asymmetric: bool):
    from ..kernels.moe.quant_formats import QuantSpec

    if fmt == "w4a16":
        if group_size < 0:
            raise InputError(f"--group-size {group_size} is negative; give a positive group size, or 0 for per row")
        return QuantSpec("w4a16", group_size=group_size or None, symmetric=not asymmetric)
    if asymmetric or group_size != 128:
        raise InputError(f"--group-size and --asymmetric apply to w4a16 only; {fmt} has fixed scales "
                         "(NVFP4: one per 16 inputs; FP8: one per tensor)")
    return QuantSpec(fmt)


def run_quantize(args: argparse.Namespace) -> int:
    from ..model.quant.convert import quantize_checkpoint
    from ..sizes import parse_size

    dense_fmt = args.format if args.dense == "same" else args.dense
    if args.format != "w4a16" and dense_fmt == "w4a16" or args.format == "w4a16" and dense_fmt not in (
            "none", "w4a16"):
        raise InputError(f"--format {args.format} with --dense {args.dense}: W4A16 (compressed-tensors) and "
                         "NVFP4/FP8 (ModelOpt) cannot share one checkpoint; quantize both alike")
    experts = _spec(args.format, args.group_size, args.asymmetric)
    dense = None if dense_fmt == "none" else (experts if dense_fmt == args.format else _spec(dense_fmt, 128, False))
    shard = parse_size(args.shard_size, what="--shard-size")
    if shard < 1 << 20:
        raise InputError(f"--shard-size {args.shard_size} is below 1 MiB; give e.g. 4GiB")
    report = quantize_checkpoint(args.source, args.out, experts=experts, dense=dense, shard_bytes=shard,
                                 progress=args.progress)
    print(report.describe())
    return 0
