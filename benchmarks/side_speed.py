"""Training time of side-tuning: (A) LAST on a feature cache vs LoRA on images, (B) a sweep of LAST configs
sharing one backbone pass vs one config. Same data, same machine, one process; ratios printed, JSON written.

    # full scale (the lead's run; ViT-B/16, 1k training samples, 10 epochs):
    python benchmarks/side_speed.py --backbone timm:vit_base_patch16_224 --data fashion-mnist:1k --epochs 10
    # tiny check:
    python benchmarks/side_speed.py --backbone timm:test_vit --image-size 32 --data digits:1k --epochs 1 \
        --test-size 100

(A) target >= 20x: LoRA's training seconds (10 epochs on images) / LAST's training seconds (10 epochs on the
cache); `--image-epochs 1` times one epoch of each run on images and scales it to --epochs. The one-time
extraction is timed separately and also reported in an end-to-end ratio.
(B) target <= 2x: seconds per epoch of an 8-configuration LAST sweep / of one LAST configuration, both on images.
Training seconds exclude evaluation (results.json seconds_per_epoch). Random-init backbones are seeded so every
run (and the cache) sees the same weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from thrifty.backbones import BackboneSpec, load_backbone
from thrifty.data import PROTOCOLS, load_data
from thrifty.features import extract_features, roles_for
from thrifty.io import write_json
from thrifty.metrics import environment
from thrifty.runtime import resolve_device
from thrifty.runtime.allocator import MALLOC_MODES, tune_malloc
from thrifty.train import TrainConfig, run_training
from thrifty.train.members import parse_sweep
from thrifty.tuners import get_tuned_model, make_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:vit_base_patch16_224")
    p.add_argument("--checkpoint", help="local backbone weights (default: seeded random init)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--data", default="fashion-mnist:1k")
    p.add_argument("--test-size", type=int, default=500, help="cap the test split (it is cached too)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--image-epochs",
        type=int,
        help="epochs the runs on images (LoRA, LAST, the sweep) actually run (default --epochs); training seconds "
        "are always mean seconds per epoch x --epochs (every epoch is the same work)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sweep", action="append", default=None, help="KEY=V1,V2 (default lr x4, r x2: 8 configs)")
    p.add_argument("--fp16", action="store_true", help="float16 cache (half the disk)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, help="torch threads")
    p.add_argument("--malloc", choices=MALLOC_MODES, default="tuned", help="TrainConfig.malloc for every run (CPU)")
    p.add_argument("--keep-denormals", action="store_true", help="TrainConfig.flush_denormal=False for every run")
    p.add_argument("--output", default="runs/benchmarks/side_speed")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: lora, sweep")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    malloc = tune_malloc(args.malloc)  # before extraction too, so every part runs under the same allocator
    sweep = parse_sweep(args.sweep or ["lr=1e-3,3e-3,1e-2,3e-2", "r=8,16"])
    common = dict(
        backbone=BackboneSpec(args.backbone, args.checkpoint, args.checkpoint is None, args.image_size),
        data=args.data,
        test_size=args.test_size,
    )
    train = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        progress=False,
        malloc=args.malloc,
        flush_denormal=not args.keep_denormals,
    )
    image_train = train if args.image_epochs is None else dataclasses.replace(train, epochs=args.image_epochs)
    out: dict = {"command": "python benchmarks/side_speed.py " + " ".join(argv or sys.argv[1:]), "runs": {}}

    def run(name: str, cfg: TrainConfig, **kw) -> dict:
        torch.manual_seed(0)  # the same random-init backbone weights in every run
        t0 = time.perf_counter()
        res = run_training(train=cfg, output_dir=os.path.join(args.output, name), overwrite=True, **common, **kw)
        m = res["metrics"]
        out["runs"][name] = {
            "epochs_run": cfg.epochs,
            "train_seconds": m["seconds_per_epoch"] * args.epochs,
            "seconds_per_epoch": m["seconds_per_epoch"],
            "wall_seconds": time.perf_counter() - t0,
            "test_accuracy": m["test_accuracy"],
            "epoch_seconds": [round(h["seconds"], 2) for h in res["history"]],
            "malloc": res["env"]["malloc"],
            "denormals": res["env"]["denormals"],
        }
        print(f"{name}: {out['runs'][name]}", flush=True)
        return out["runs"][name]

    # (A) extract once, then LAST from the cache; LoRA on images
    cache_dir = os.path.join(args.output, "cache")
    torch.manual_seed(0)
    bb = load_backbone(
        args.backbone, checkpoint=args.checkpoint, pretrained=common["pretrained"], image_size=args.image_size
    )
    task = load_data(args.data, bb.preprocess, seed=0, test_size=args.test_size)
    taps = get_tuned_model(bb, make_config("last"), task.num_classes).tap_names()
    splits = sorted({PROTOCOLS[task.protocol][r] for r in roles_for(select_on_val=False)})
    t0 = time.perf_counter()
    extract_features(
        cache_dir, bb, task, taps, splits=splits, dtype="float16" if args.fp16 else None,
        batch_size=max(64, args.batch_size), device=resolve_device(args.device),
    )  # fmt: skip
    out["extract_seconds"] = time.perf_counter() - t0
    print(f"extraction ({', '.join(splits)}): {out['extract_seconds']:.1f}s", flush=True)
    del bb
    last_cache = run("last_cache", train, method="last", cache=cache_dir, peak_memory=False)
    last_images = run("last_images", image_train, method="last", peak_memory=False)
    ratios = {"last_images / last_cache": last_images["train_seconds"] / last_cache["train_seconds"]}
    if "lora" not in skip:
        lora = run("lora_images", image_train, method="lora", peak_memory=False)
        ratios["lora_images / last_cache (target >= 20)"] = lora["train_seconds"] / last_cache["train_seconds"]
        ratios["lora_images / (extract + last_cache)"] = lora["train_seconds"] / (
            last_cache["train_seconds"] + out["extract_seconds"]
        )
    # (B) many LAST configs on one backbone pass vs one config
    if "sweep" not in skip:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        sweep_dir = os.path.join(args.output, "sweep")
        summary = run_training(
            method="last", sweep=sweep, train=image_train, output_dir=sweep_dir, overwrite=True, **common
        )
        first = summary["members"][0]["dir"]
        with open(os.path.join(first, "results.json")) as fh:
            per_epoch = json.load(fh)["metrics"]["seconds_per_epoch"]
        out["runs"]["last_sweep"] = {
            "members": len(summary["members"]),
            "seconds_per_epoch": per_epoch,
            "wall_seconds": time.perf_counter() - t0,
        }
        ratios[f"sweep of {len(summary['members'])} / one config (target <= 2)"] = (
            per_epoch / last_images["seconds_per_epoch"]
        )
    out["ratios"] = ratios
    out["env"] = {**environment(resolve_device(args.device)), "malloc": malloc}
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}")
    write_json(os.path.join(args.output, "side_speed.json"), out)
    print(f"wrote {os.path.join(args.output, 'side_speed.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
