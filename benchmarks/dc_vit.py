"""DC-ViT vs block dropping: accuracy against MACs and CPU latency (batch 32), dense families from 50 samples.

Models (nothing pretrained installs as a ViT, so the image teacher is trained here):
- `fmnist-vit`: timm's `test_vit` architecture (6 blocks, D=64, 2 heads, MLP 192) trained from scratch on the
  Fashion-MNIST training set at 64 px with thrifty's Trainer (full fine-tuning of a random init): a SELF-TRAINED
  teacher. It is saved as a timm state dict and loaded back through `timm:test_vit --checkpoint FILE` (the path a
  real checkpoint takes). Few-shot set: 50 random training images (+50 disjoint ones as the metric set); test: the
  10k test images.
- `minilm-reviews`: the packaged all-MiniLM-L6-v2 (post-LN BERT) with a linear head trained on `reviews:1k` (5-way
  star rating, balanced), texts cut to `--max-length` tokens. Few-shot set: 50 unlabeled training texts (+50 for
  the metric set); test: a stratified sample of the test holdout.

Per seed of the 50-sample draw: the DC-ViT family over `--keeps`, the block-dropping family (same ranking and
recovery, the nearest whole-block count), "recover nothing" (DC-ViT's structure, ranking and step without any
recovery epoch) and the uncompressed teacher. Latencies are medians of 5 runs at batch 32 on one CPU thread; on a
box shared with other jobs they are indicative only.

    PYTHONPATH=src python benchmarks/dc_vit.py --model fmnist-vit --output benchmarks/results/dc_vit_fmnist.json
    PYTHONPATH=src python benchmarks/dc_vit.py --model minilm-reviews --output benchmarks/results/dc_vit_minilm.json
    PYTHONPATH=src python benchmarks/dc_vit.py --plot docs/benchmarks/dc_vit.png benchmarks/results/dc_vit_*.json
    PYTHONPATH=src python benchmarks/dc_vit.py --model fmnist-vit --quick --output /tmp/dc_vit_quick.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from thrifty.backbones import load_backbone
from thrifty.compress.dc_vit import DCViTConfig, compress_dc_vit_family, latency_ms, load_dc_vit
from thrifty.data import load_data
from thrifty.io import load_tensors, read_json, save_tensors, write_json
from thrifty.metrics import environment
from thrifty.train import TrainConfig, Trainer, evaluate
from thrifty.tuners import get_tuned_model, make_config


KEEPS = [0.90, 0.85, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50]
VARIANTS = ("dc_vit", "block_drop", "recover_nothing")


def _freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def fmnist_teacher(args: argparse.Namespace, work: str):
    """(teacher, task, info): the self-trained test_vit, trained once and cached as a timm checkpoint."""
    path = os.path.join(work, "teacher_fmnist_test_vit.safetensors")
    data = "fashion-mnist:1k" if args.quick else "fashion-mnist"
    if not os.path.isfile(path):
        bb = load_backbone("timm:test_vit", pretrained=False, image_size=args.image_size)
        task = load_data(data, bb.preprocess, seed=0)
        torch.manual_seed(0)
        model = get_tuned_model(bb, make_config("full"), task.num_classes)
        cfg = TrainConfig(
            epochs=args.teacher_epochs, batch_size=128, lr=1e-3, weight_decay=0.05, warmup_epochs=1, progress=True
        )
        t0 = time.perf_counter()
        res = Trainer(model, task, cfg).fit()
        state = dict(bb.model.state_dict())
        state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})  # timm's own classifier slot
        save_tensors(path, state)
        meta = {"test_accuracy": res["test_accuracy"], "train_seconds": time.perf_counter() - t0}
        write_json(path + ".json", {**meta, "recipe": cfg.__dict__ | {"data": data, "image_size": args.image_size}})
    # path (a): a real checkpoint through `timm:<name> --checkpoint FILE`
    bb = load_backbone("timm:test_vit", checkpoint=path, image_size=args.image_size)
    task = load_data(data, bb.preprocess, seed=0, test_size=args.test_size)
    teacher = get_tuned_model(bb, make_config("full"), task.num_classes)
    state = load_tensors(path)
    teacher.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
    info = {"teacher": "timm:test_vit self-trained on Fashion-MNIST", "checkpoint": path, **read_json(path + ".json")}
    return _freeze(teacher), task, info


def minilm_teacher(args: argparse.Namespace, work: str):
    """(teacher, task, info): packaged MiniLM + a linear head trained on reviews:1k (Trainer, `linear`)."""
    path = os.path.join(work, f"teacher_minilm_reviews_head_L{args.max_length}.safetensors")
    bb = load_backbone("minilm", max_length=args.max_length)
    task = load_data("reviews:1k", bb.preprocess, seed=0, test_size=args.test_size)
    if not os.path.isfile(path):
        torch.manual_seed(0)
        probe = get_tuned_model(bb, make_config("linear"), task.num_classes)
        cfg = TrainConfig(epochs=args.teacher_epochs, batch_size=32, lr=1e-3, warmup_epochs=1, progress=True)
        t0 = time.perf_counter()
        res = Trainer(probe, task, cfg).fit()
        save_tensors(path, dict(probe.head.state_dict()))
        write_json(path + ".json", {"test_accuracy": res["test_accuracy"], "train_seconds": time.perf_counter() - t0})
    teacher = get_tuned_model(bb, make_config("full"), task.num_classes)
    teacher.head.load_state_dict(load_tensors(path))
    info = {
        "teacher": "minilm + linear head on reviews:1k",
        "max_length": args.max_length,
        **read_json(path + ".json"),
    }
    return _freeze(teacher), task, info


def few_shot(task, n: int, seed: int) -> list[tuple[Any, Any]]:
    """2n random training samples (the first n train, the next n are the metric set), labels attached but unused."""
    train = task.split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(1000 + seed))[: 2 * n].tolist()
    return [train.get_batch(idx)]


@torch.no_grad()
def test_accuracy(model, dataset, batch_size: int) -> float:
    """Test accuracy; image arrays are preprocessed a batch at a time (not image by image)."""
    if hasattr(dataset, "images") and hasattr(dataset, "preprocess"):
        model.eval()
        correct = 0
        for i in range(0, len(dataset), batch_size):
            x = dataset.preprocess.from_uint8(dataset.images[i : i + batch_size])
            y = torch.as_tensor(dataset.labels[i : i + batch_size])
            correct += int((model(x).argmax(-1) == y).sum())
        return correct / len(dataset)
    return evaluate(model, dataset, batch_size)["accuracy"]


def evaluate_dir(directory: str, task, batch_size: int) -> dict[str, Any]:
    """Test accuracy of a saved family member plus its record's MACs and latency. Budgets served by the same
    progressive step hold the same model: it is evaluated once (cached in the family folder per step)."""
    info = read_json(os.path.join(directory, "compression.json"))
    cache = os.path.join(os.path.dirname(directory), f"eval_step{info['family']['step']}.json")
    if os.path.isfile(cache):
        acc = read_json(cache)["accuracy"]
    else:
        model, _ = load_dc_vit(directory)
        acc = test_accuracy(model, task.split("test"), batch_size)
        write_json(cache, {"accuracy": acc, "evaluated": directory})
    return {
        "keep_requested": info["keep_macs"],
        "macs": info["macs"]["counted"],
        "kept_fraction": info["macs"]["kept_fraction"],
        "macs_thop": info["macs"]["by_convention"]["thop"]["counted"],
        "accuracy": acc,
        "latency_ms": info.get("latency_ms", {}).get("median"),
        "blocks": info["removed_attention"],
        "kept_units": info["structure"]["kept_units"],
        "num_blocks": info["structure"]["num_blocks"],
        "order": info["ranking"]["order"],
        "final_losses": [s["final_loss"] for s in info["recovery"]["steps"]],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = os.path.join(args.work, args.model + ("-quick" if args.quick else ""))
    os.makedirs(work, exist_ok=True)
    teacher, task, info = (fmnist_teacher if args.model == "fmnist-vit" else minilm_teacher)(args, work)
    info["test_samples"] = len(task.split("test"))
    base = DCViTConfig(
        samples=args.samples,
        metric_samples=args.samples,
        epochs=args.epochs,
        rank_epochs=args.rank_epochs,
        lr=args.lr,
        warmup_epochs=args.warmup,
        batch_size=64,
        augment="flip" if args.model == "fmnist-vit" and args.flip else "none",
    )
    t0 = time.perf_counter()
    teacher_acc = test_accuracy(teacher, task.split("test"), args.eval_batch)
    rows = [
        {
            "variant": "uncompressed",
            "seed": None,
            "keep_requested": 1.0,
            "kept_fraction": 1.0,
            "accuracy": teacher_acc,
            "latency_ms": latency_ms(teacher, 32),
        }
    ]
    print(f"[bench] teacher test accuracy {teacher_acc:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    for seed in args.seeds:
        batches = few_shot(task, args.samples, seed)
        for variant in args.variants:
            cfg = replace(base, seed=seed)
            if variant == "block_drop":
                cfg = replace(cfg, variant="block_drop")
            elif variant == "recover_nothing":
                cfg = replace(cfg, epochs=0, rank_epochs=0)
            out = os.path.join(work, f"seed{seed}", variant)
            t = time.perf_counter()
            compress_dc_vit_family(teacher, cfg, args.keeps, batches, out, latency_batch=32, progress=args.progress)
            seconds = time.perf_counter() - t
            for keep in sorted(args.keeps, reverse=True):
                row = evaluate_dir(os.path.join(out, f"keep_{keep:.4f}"), task, args.eval_batch)
                rows.append({"variant": variant, "seed": seed, **row})
                print(f"[bench] seed {seed} {variant:15s} keep {keep:.2f} -> MACs {row['kept_fraction']:.3f} "
                      f"acc {row['accuracy']:.4f} latency {row['latency_ms']:.1f} ms", flush=True)  # fmt: skip
            rows.append({"variant": variant, "seed": seed, "family_seconds": seconds})
            write_json(args.output, result(args, info, teacher_acc, rows, base))
    return result(args, info, teacher_acc, rows, base)


def result(args, info, teacher_acc, rows, base) -> dict[str, Any]:
    return {
        "model": args.model,
        "teacher": info,
        "teacher_test_accuracy": teacher_acc,
        "test_samples": info.get("test_samples"),
        "config": base.to_dict(),
        "keeps": args.keeps,
        "seeds": args.seeds,
        "rows": rows,
        "summary": summarize(rows),
        "environment": environment("cpu"),
        "threads": torch.get_num_threads(),
        "note": "latency: median of 5 runs at batch 32 on 1 CPU thread of a 2-core box shared with other jobs",
        "argv": vars(args),
    }


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (variant, requested keep)."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        if "accuracy" in r and r["seed"] is not None:
            groups.setdefault((r["variant"], r["keep_requested"]), []).append(r)
    out = []
    for (variant, keep), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        accs = [r["accuracy"] for r in rs]
        out.append({
            "variant": variant, "keep_requested": keep,
            "kept_fraction": statistics.mean(r["kept_fraction"] for r in rs),
            "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "latency_ms_median": statistics.median(r["latency_ms"] for r in rs), "seeds": len(rs),
            "latency_ms_interleaved": rs[0].get("latency_ms_interleaved"),
        })  # fmt: skip
    return out


def print_summary(res: dict[str, Any]) -> None:
    print(f"\n{res['model']}: teacher {res['teacher_test_accuracy']:.4f}")
    print(
        "| variant | keep asked | MACs kept | accuracy (mean ± sd) | latency ms (in run) | latency ms (interleaved) |"
    )
    print("|---|---|---|---|---|---|")
    for s in res["summary"]:
        inter = s.get("latency_ms_interleaved")
        print(f"| {s['variant']} | {s['keep_requested']:.2f} | {s['kept_fraction']:.3f} | "
              f"{100 * s['accuracy_mean']:.1f} ± {100 * s['accuracy_std']:.1f} | {s['latency_ms_median']:.0f} | "
              f"{'-' if inter is None else f'{inter:.1f}'} |")  # fmt: skip


def remeasure_latency(path: str, rounds: int) -> None:
    """Re-time every distinct architecture of a results file interleaved (one run each per round, `rounds` rounds,
    minimum kept: the least disturbed run on a shared box) and store it as `latency_ms_interleaved`. Latency depends
    on the structure only (which blocks, and their weights, do not change the work), so each (variant, n, k) is
    timed once on a copy of the teacher."""
    from thrifty.compress.dc_vit import apply_structure_

    res = read_json(path)
    args = argparse.Namespace(**res["argv"])
    torch.set_num_threads(args.threads)
    work = os.path.join(args.work, args.model + ("-quick" if args.quick else ""))
    teacher, _, _ = (fmnist_teacher if args.model == "fmnist-vit" else minilm_teacher)(args, work)
    keys = {("uncompressed", 0, None)}
    for r in res["rows"]:
        if "accuracy" in r and r["seed"] is not None:
            keys.add(("block_drop" if r["variant"] == "block_drop" else "dc_vit", r["num_blocks"], r["kept_units"]))
    nets = {}
    for key in sorted(keys, key=str):
        net = copy.deepcopy(teacher)
        if key[1]:
            apply_structure_(
                net.backbone, {b: (None if key[2] is None else list(range(key[2]))) for b in range(1, 1 + key[1])}
            )
        nets[key] = net
    x = teacher.backbone.random_inputs(32, seed=0)
    best = dict.fromkeys(nets, float("inf"))
    with torch.no_grad():
        for net in nets.values():
            net(x)  # warm-up
        for _ in range(rounds):
            for key, net in nets.items():
                t0 = time.perf_counter()
                net(x)
                best[key] = min(best[key], (time.perf_counter() - t0) * 1000.0)
    for r in res["rows"]:
        if r["variant"] == "uncompressed":
            r["latency_ms_interleaved"] = best[("uncompressed", 0, None)]
        elif "accuracy" in r:
            kind = "block_drop" if r["variant"] == "block_drop" else "dc_vit"
            r["latency_ms_interleaved"] = best[(kind, r["num_blocks"], r["kept_units"])]
    res["summary"] = summarize(res["rows"])
    res["latency_interleaved"] = {"rounds": rounds, "threads": args.threads, "batch_size": 32, "statistic": "min"}
    write_json(path, res)
    print_summary(res)


def plot(paths: list[str], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [read_json(p) for p in paths]
    fig, axes = plt.subplots(len(results), 2, figsize=(11, 4 * len(results)), squeeze=False)
    style = {"dc_vit": ("C0", "o", "DC-ViT"), "block_drop": ("C3", "s", "block dropping"),
             "recover_nothing": ("C7", "x", "DC-ViT, recover nothing")}  # fmt: skip
    for row, res in zip(axes, results, strict=True):
        teacher = next(r for r in res["rows"] if r["variant"] == "uncompressed")
        for variant, (color, marker, label) in style.items():
            pts = [s for s in res["summary"] if s["variant"] == variant]
            if not pts:
                continue
            lat_key = "latency_ms_interleaved" if pts[0].get("latency_ms_interleaved") else "latency_ms_median"
            for ax, key in ((row[0], "kept_fraction"), (row[1], lat_key)):
                xs = [p[key] for p in pts]
                line = "-" if key == "kept_fraction" else "none"  # measured latencies are not monotone in keep
                ax.errorbar(xs, [p["accuracy_mean"] for p in pts], yerr=[p["accuracy_std"] for p in pts],
                            color=color, marker=marker, label=label, capsize=3, linestyle=line)  # fmt: skip
        lat = teacher.get("latency_ms_interleaved", teacher["latency_ms"])
        for ax, x in ((row[0], 1.0), (row[1], lat)):
            ax.scatter([x], [teacher["accuracy"]], color="k", marker="*", s=120, label="uncompressed", zorder=5)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
        row[0].set_xlabel("MACs kept (counted, fraction of the teacher)")
        row[1].set_xlabel("CPU ms, batch 32, 1 thread (min over interleaved runs; shared box)")
        row[0].set_title(f"{res['model']} ({len(res['seeds'])} seeds of the {res['config']['samples']}-sample draw)")
        row[0].legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["fmnist-vit", "minilm-reviews"])
    p.add_argument("--output", help="results JSON")
    p.add_argument("--plot", help="write a plot of the given result JSONs (positional) to this PNG")
    p.add_argument("--remeasure-latency", type=int, metavar="ROUNDS", help="re-time the given result JSONs")
    p.add_argument("results", nargs="*", help="result JSONs for --plot")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--keeps", type=lambda s: [float(x) for x in s.split(",")], default=None)
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--epochs", type=int, default=300, help="recovery epochs per progressive step (reference 2000)")
    p.add_argument("--rank-epochs", type=int, default=150, help="recovery epochs per ranked candidate")
    p.add_argument("--lr", type=float, default=1e-4, help="recovery lr (reference 3e-5 over 2000 epochs)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--flip", action="store_true", help="random horizontal flips of the few-shot images")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--eval-batch", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a busy box)")
    p.add_argument("--work", default="/tmp/thrifty_dc_vit")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the plumbing, numbers mean nothing")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.remeasure_latency:
        for path in args.results:
            remeasure_latency(path, args.remeasure_latency)
        return
    if args.plot:
        plot(args.results, args.plot)
        return
    if not args.model or not args.output:
        p.error("--model and --output are required (or --plot OUT RESULTS...)")
    if args.quick:
        args.keeps = args.keeps or [0.8, 0.6]
        args.seeds, args.epochs, args.rank_epochs, args.teacher_epochs = args.seeds[:1], 2, 1, 1
        args.test_size = args.test_size or 200
        args.max_length = min(args.max_length, 16)
    args.keeps = args.keeps or (KEEPS if args.model == "fmnist-vit" else KEEPS[:-1])
    res = run(args)
    write_json(args.output, res)
    print_summary(res)


if __name__ == "__main__":
    main()
