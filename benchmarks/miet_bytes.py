"""Bytes per sample a feature server sends: MIET's one gathered map vs all L block outputs (the LAST setting)
vs the raw input. Shapes only (one embedding pass to count tokens; no training, no model forward).

    python benchmarks/miet_bytes.py                     # timm:vit_base_patch16_224 (random init) + minilm
    python benchmarks/miet_bytes.py --backbones timm:test_vit --image-size 32      # quick check

Target (issue 7): MIET sends L times fewer bytes than all L taps at the same dtype (12x on ViT-B/16). Wire bytes
are the safetensors body of a one-sample answer (header included). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import sys

import torch

from thrifty.backbones import load_backbone
from thrifty.backbones.remote.protocol import DTYPES, encode_features
from thrifty.cli.common import print_table
from thrifty.io import write_json
from thrifty.serve.engine import GatherEngine


def rows_for(spec: str, image_size: int | None, max_length: int | None) -> list[dict]:
    bb = load_backbone(spec, pretrained=False, image_size=image_size, max_length=max_length)
    engine = GatherEngine(bb)  # k = L: z_0 + ... + z_L
    n, d, blocks = engine.tokens, bb.num_features, len(bb.blocks)
    if bb.kind == "text":
        raw, raw_what = n * 4, f"{n} token ids (int32)"
    else:
        h, w = bb.preprocess.size
        raw, raw_what = h * w * 3, f"{h}x{w}x3 uint8 image"
    rows = []
    for dtype, torch_dtype in DTYPES.items():
        size = torch_dtype.itemsize
        miet = n * d * size
        wire = len(encode_features(torch.zeros(1, n, d, dtype=torch_dtype), {"tap": engine.tap, "dtype": dtype}))
        all_taps = blocks * n * d * size
        rows.append(
            {
                "backbone": bb.name,
                "dtype": dtype,
                "N x D": f"{n} x {d}",
                "L": blocks,
                "miet_bytes": miet,
                "miet_wire_bytes": wire,
                "all_taps_bytes": all_taps,
                "raw_bytes": raw,
                "raw": raw_what,
                "all_taps_over_miet": all_taps / miet,
                "miet_over_raw": miet / raw,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="timm:vit_base_patch16_224,minilm")
    p.add_argument("--image-size", type=int)
    p.add_argument("--max-length", type=int, default=64, help="text backbones (the offline suite uses 64)")
    p.add_argument("--json", default="runs/benchmarks/miet_bytes.json")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for spec in [s.strip() for s in args.backbones.split(",") if s.strip()]:
        try:
            rows += rows_for(spec, args.image_size, args.max_length)
        except Exception as exc:  # e.g. minilm not installed: report, go on
            print(f"skipping {spec}: {type(exc).__name__}: {exc}", file=sys.stderr)
    cols = [
        ("backbone", "backbone"),
        ("dtype", "dtype"),
        ("N x D", "N x D"),
        ("L", "L"),
        ("miet_bytes", "MIET B/sample"),
        ("miet_wire_bytes", "MIET wire B (1 sample)"),
        ("all_taps_bytes", "all L taps B/sample"),
        ("raw_bytes", "raw input B"),
        ("all_taps_over_miet", "all taps / MIET"),
        ("miet_over_raw", "MIET / raw"),
    ]
    print_table(rows, cols)
    ok = all(abs(r["all_taps_over_miet"] - r["L"]) < 1e-9 for r in rows)
    print(f"MIET sends L x fewer bytes than all L taps at the same dtype: {'PASS' if ok else 'FAIL'}")
    write_json(args.json, {"rows": rows, "pass": ok})
    return 0 if ok and rows else 1


if __name__ == "__main__":
    sys.exit(main())
