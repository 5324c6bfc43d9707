"""Per-step decomposition behind benchmarks/side_speed.py, in a minute instead of hours: on random inputs of the
backbone's shape, time one LoRA training step, one frozen backbone forward (the taps, no_grad), one LAST step from
the taps, and the steps of K LAST members on the same taps. Projects the two side_speed ratios per step:

    cache ratio = LoRA step / LAST step from taps              (side_speed target >= 20; ignores the cache read)
    sweep ratio = (forward + K LAST steps) / (forward + 1 step)  (side_speed target <= 2 for K = 8)

    python benchmarks/side_step_times.py                                   # ViT-B/16, batch 8, K = 8
    python benchmarks/side_step_times.py --set taps=2,5,8,11 --set r=32     # a cheaper LAST
Times are the median of --reps interleaved repetitions (robust to a noisy machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from thrifty.backbones import load_backbone
from thrifty.cli.common import parse_sets
from thrifty.io import write_json
from thrifty.metrics import environment, training_step
from thrifty.runtime import resolve_device, to_device
from thrifty.train.optim import build_optimizer
from thrifty.tuners import get_tuned_model, make_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:vit_base_patch16_224")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--set", action="append", default=[], help="LAST options, e.g. r=8 or taps=5,11")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default="runs/benchmarks/side_step_times.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    bb = load_backbone(args.backbone, pretrained=False, image_size=args.image_size)
    x = to_device(bb.random_inputs(args.batch_size), device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    last = [get_tuned_model(bb, make_config("last", parse_sets(args.set)), 100) for _ in range(args.members)]
    for m in last:
        m.to(device).train()
    opts = [build_optimizer(m, 1e-3, 1e-4) for m in last]
    taps = last[0].extract(x)
    lora = get_tuned_model(
        load_backbone(args.backbone, pretrained=False, image_size=args.image_size), make_config("lora"), 100
    )
    lora.to(device).train()
    lora_opt = build_optimizer(lora, 1e-3, 1e-4)

    def clock(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def side(k: int) -> None:
        for m, o in zip(last[:k], opts[:k]):
            training_step(m.read_taps_(True), taps, y, o)

    parts = {
        "lora_step": lambda: training_step(lora, x, y, lora_opt),
        "backbone_forward": lambda: last[0].extract(x),
        "last_step_from_taps": lambda: side(1),
        f"{args.members}_last_steps_from_taps": lambda: side(args.members),
    }
    for fn in parts.values():  # warm-up: allocator, optimizer state
        fn()
    times = {k: [] for k in parts}
    for _ in range(args.reps):
        for k, fn in parts.items():
            times[k].append(clock(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    fwd, one, many = med["backbone_forward"], med["last_step_from_taps"], med[f"{args.members}_last_steps_from_taps"]
    ratios = {
        "cache ratio: lora_step / last_step_from_taps (target >= 20)": med["lora_step"] / one,
        f"sweep ratio: (forward + {args.members} steps) / (forward + 1 step) (target <= 2)": (fwd + many)
        / (fwd + one),
        "last on images / lora (profile target <= 0.6)": (fwd + one) / med["lora_step"],
    }
    for k, v in med.items():
        print(f"{k:32s} {v:8.3f} s   (reps: {', '.join(f'{t:.3f}' for t in times[k])})")
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    write_json(
        args.json,
        {
            "command": "python benchmarks/side_step_times.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "backbone": args.backbone,
            "batch_size": args.batch_size,
            "last_params": last[0].num_trainable(include_head=False),
            "seconds": med,
            "reps": times,
            "ratios": ratios,
            "env": environment(device),
        },
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
