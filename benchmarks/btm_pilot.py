"""BTM fine-tune recipe pilot, selected on a validation split, never on test (issue 20's benchmark hygiene).

Reproduces the pilot that chose the subset fine-tune recipe of benchmarks/longtail.py (lr 0.02 SGD, 80 epochs),
but every number it reads comes from a balanced val split of training images the long-tailed draw left unused
(`fashion-mnist:lt100-max1000-val<N>`, thrifty.data.longtail): the task's test split is removed before anything
trains, and the val split takes the evaluation role, so the run directories' `test_*` metrics are VAL metrics
(this script renames them `val_*` in its JSON and table).

    PYTHONPATH=src python benchmarks/btm_pilot.py --out runs/btm_pilot --stage2  # resumable; ~40 min, busy 2 cores
    PYTHONPATH=src python benchmarks/btm_pilot.py --out runs/btm_pilot --stage2 --seeds 0,1,2 \
        --candidates lr0.01-e80,lr0.02-e80                                   # the seed check of the front-runners

Stage 1 (seed 0) = benchmarks/longtail.py's `mixup` run of fmnist-lt100, short: 12 epochs, a width-8 ResNet-8
(`cifar-resnet:8w8s0`) at 28 px. Then per candidate recipe: BTM's M = 10 balanced subsets of K = 10 per class, one
fine-tune each from theta0 (batch 32, mixup 0.2, SGD momentum 0.9, wd 5e-4, cosine, 1 warm-up epoch; only lr and
epochs change), uniform merge (thrifty.longtail.BTMRun, resumable per subset). Scored on val: the merged model's
mean / H / G / worst-class accuracy and the mean of the 10 single-subset models (BTM's `undersample`); with
`--stage2` also the merged model after BTM's stage 2 (LAS, shift BN, LWS; the benchmark's recipe), for information.
Selection rule (fixed before the run): on seed 0, the highest merged-model val H, ties (within 0.5 point) broken
by val G. `--seeds 0,1,2 --candidates A,B` reruns the front-runners on other training seeds (init, batches,
subsets; the same LT draw and val split) as a check of that pick. Writes benchmarks/results/btm_pilot.json after
every candidate and prints markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from typing import Any

import torch
from longtail import TASKS  # benchmarks/longtail.py: the benchmark's task and recipes

from thrifty.data import TaskData, load_data
from thrifty.errors import DataError
from thrifty.io import read_json, write_json
from thrifty.longtail import BASELINES, BTMConfig, BTMRun, Stage2Config, build_backbone
from thrifty.train import run_training


BENCH = TASKS["fmnist-lt100"]
CANDIDATES = {  # name: (lr, epochs); the first four are the original pilot's, lr0.02-e80 the committed recipe
    "lr0.05-e15": (0.05, 15),
    "lr0.05-e40": (0.05, 40),
    "lr0.01-e15": (0.01, 15),
    "lr0.02-e80": (0.02, 80),
    "lr0.05-e80": (0.05, 80),
    "lr0.02-e15": (0.02, 15),
    "lr0.02-e40": (0.02, 40),
    "lr0.01-e40": (0.01, 40),
    "lr0.01-e80": (0.01, 80),
    "lr0.005-e15": (0.005, 15),
    "lr0.005-e40": (0.005, 40),
    "lr0.005-e80": (0.005, 80),
    "lr0.02-e160": (0.02, 160),  # added after the 12 above: the best ones were the longest
    "lr0.01-e160": (0.01, 160),
    "lr0.005-e160": (0.005, 160),
}
SHOW = ("mean_class_accuracy", "hmean", "gmean", "worst_class_accuracy")


def val_as_evaluation(task: TaskData) -> TaskData:
    """The task with its test split removed and its val split in the evaluation (test) role."""
    if not task.has("val"):
        raise DataError(f"{task.name} has no val split; use a :lt<IF>-max<N>-val<K> data spec")
    meta = {**task.meta, "evaluation_split": "val (the test split was removed before training)"}
    splits = {"train": task.split("train"), "test": task.split("val")}
    return TaskData(f"{task.name} [val as evaluation]", splits, task.num_classes, "full", meta, task.objective)


class ValOnlyBTM(BTMRun):
    """A BTMRun whose task is `val_as_evaluation(load_data(plan data))`: every stage evaluates on val only."""

    def context(self):
        if self._ctx is None:
            bb = build_backbone(self.plan["backbone"])
            task = load_data(self.plan["data"], bb.preprocess, seed=self.plan["split_seed"])
            self._raw_task = val_as_evaluation(task)
            self._ctx = (bb, self._raw_task)
        return self._ctx


def _val(metrics: dict[str, Any]) -> dict[str, Any]:
    """`test_*` keys of a pilot run directory (evaluated on val) renamed `val_*`."""
    return {"val_" + k[5:]: v for k, v in metrics.items() if k.startswith("test_")}


def run_dir(args, seed: int) -> str:
    """Seed 0's runs lie in --out, the confirmation seeds' in --out/seed<s>."""
    return args.out if seed == 0 else os.path.join(args.out, f"seed{seed}")


def stage1(args, spec, data: str, seed: int) -> dict[str, Any]:
    out = os.path.join(run_dir(args, seed), "stage1")
    res = os.path.join(out, "results.json")
    if not (os.path.isfile(res) and read_json(res).get("status") == "complete"):
        bb = build_backbone(spec)
        task = val_as_evaluation(load_data(data, bb.preprocess, seed=0))  # split seed 0: one LT draw, one val
        run_training(
            backbone=bb,
            data=task,
            method=BENCH["method"],
            overrides=BENCH["overrides"],
            objective=BASELINES["mixup"].objective,
            train=replace(BENCH["train"], epochs=args.stage1_epochs, seed=seed),
            output_dir=out,
            resume=True,
            peak_memory=False,
            extra={"btm_pilot": "stage1"},
        )
    r = read_json(res)
    return {"metrics": _val(r["metrics"]), "train_seconds": sum(h["seconds"] for h in r["history"])}


def candidate(args, spec, data: str, seed: int, name: str, lr: float, epochs: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    run = ValOnlyBTM.create(
        os.path.join(run_dir(args, seed), name),
        backbone=spec,
        data=data,
        method=BENCH["method"],
        overrides=BENCH["overrides"],
        objective=BASELINES["mixup"].objective,
        stage1=replace(BENCH["train"], epochs=args.stage1_epochs, seed=seed),
        finetune=replace(BENCH["finetune"], lr=lr, epochs=epochs, seed=seed),
        stage2=replace(BENCH["stage2"], seed=seed),
        config=BTMConfig(args.subsets, args.per_class, stage2=Stage2Config() if args.stage2 else None),
        theta0=os.path.join(run_dir(args, seed), "stage1"),
        split_seed=0,
        resume=True,
    )
    res = run.run()
    st = res["stages"]
    return {
        "lr": lr,
        "epochs": epochs,
        "merged": _val(st["merged"]),
        "subsets_mean": _val(st["undersample_mean"]),
        "subsets": [_val(s) for s in st["subsets"]],
        "stage2": _val(st["stage2"]) if args.stage2 else None,
        "finetune_seconds": res["train_seconds"]["finetune"],
        "session_seconds": time.perf_counter() - t0,
    }


def select(cands: dict[str, dict[str, Any]], tol: float = 0.005) -> str:
    """Highest merged val H; candidates within `tol` of it are ranked by merged val G."""
    best_h = max(c["merged"]["val_hmean"] for c in cands.values())
    near = {n: c for n, c in cands.items() if c["merged"]["val_hmean"] >= best_h - tol}
    return max(near, key=lambda n: near[n]["merged"]["val_gmean"])


def table(result: dict[str, Any], selected: str | None = None) -> str:
    """One seed's table: theta0, then every candidate (merged model, subset models, after stage 2)."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    head = "| recipe | lr | epochs | merged mean | merged H | merged G | merged worst | subsets mean | subsets H |"
    head += " merged - subsets H | +stage 2 mean | +stage 2 H | +stage 2 G | fine-tune s |"
    lines = [head, "|---|---:|---:|" + "---:|" * 11]
    s1 = result["stage1"]["metrics"]
    lines.append(
        f"| theta0 (stage 1) | | | {pct(s1['val_mean_class_accuracy'])} | {pct(s1['val_hmean'])} | "
        f"{pct(s1['val_gmean'])} | {pct(s1['val_worst_class_accuracy'])} | | | | | | | |"
    )
    for name, c in result["candidates"].items():
        m, u, s2 = c["merged"], c["subsets_mean"], c.get("stage2") or {}
        star = " (selected)" if name == selected else ""
        lines.append(
            f"| {name}{star} | {c['lr']:g} | {c['epochs']} | "
            + " | ".join(pct(m[f"val_{k}"]) for k in SHOW)
            + f" | {pct(u['val_mean_class_accuracy'])} | {pct(u['val_hmean'])} | "
            f"{100 * (m['val_hmean'] - u['val_hmean']):+.1f} | "
            + " | ".join(pct(s2.get(f"val_{k}")) for k in ("mean_class_accuracy", "hmean", "gmean"))
            + f" | {c['finetune_seconds']:.0f} |"
        )
    return "\n".join(lines)


def confirm(seeds: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Candidates run on more than one seed: mean ± std over those seeds of the merged and stage-2 val metrics."""
    import numpy as np

    out = {}
    for name in CANDIDATES:
        runs = [r["candidates"][name] for r in seeds.values() if name in r["candidates"]]
        if len(runs) < 2:
            continue
        row = {"seeds": len(runs)}
        for part in ("merged", "subsets_mean", "stage2"):
            for k in ("mean_class_accuracy", "hmean", "gmean", "worst_class_accuracy"):
                vals = [r[part][f"val_{k}"] for r in runs if r.get(part) and r[part].get(f"val_{k}") is not None]
                if vals:
                    row[f"{part}_{k}"] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1))}
        out[name] = row
    cols = [("merged", k) for k in SHOW] + [("subsets_mean", "hmean")] + [("stage2", k) for k in SHOW[:3]]
    head = "| recipe | seeds | merged mean | merged H | merged G | merged worst | subsets H |"
    lines = [head + " +stage 2 mean | +stage 2 H | +stage 2 G |", "|---|---:|" + "---:|" * len(cols)]
    for name, row in out.items():
        cells = []
        for part, k in cols:
            v = row.get(f"{part}_{k}")
            cells.append("-" if v is None else f"{100 * v['mean']:.1f} ± {100 * v['std']:.1f}")
        lines.append(f"| {name} | {row['seeds']} | " + " | ".join(cells) + " |")
    return out, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/btm_pilot")
    p.add_argument("--json", default="benchmarks/results/btm_pilot.json")
    p.add_argument("--candidates", default=",".join(CANDIDATES), help=f"comma list of {', '.join(CANDIDATES)}")
    p.add_argument("--seeds", default="0", help="training seeds (0 selects; others confirm, in --out/seed<s>)")
    p.add_argument("--val", type=int, default=100, help="val images per class (from unused training images)")
    p.add_argument("--stage1-epochs", type=int, default=12)
    p.add_argument("--width", type=int, default=8, help="ResNet-8 base width (the benchmark uses 16)")
    p.add_argument("--subsets", type=int, default=10)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--stage2", action="store_true", help="also run BTM's stage 2 on each merged model (val only)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = f"{BENCH['data']}-val{args.val}"
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        p.error(f"unknown candidates {unknown}; known: {list(CANDIDATES)}")
    previous = read_json(args.json) if os.path.isfile(args.json) else {}
    keep = previous.get("data") == data and previous.get("width") == args.width
    result: dict[str, Any] = {
        "what": "BTM subset fine-tune recipe pilot, scored on a balanced val split of unused training images only",
        "data": data,
        "width": args.width,
        "backbone": f"cifar-resnet:8w{args.width}s<seed>",
        "evaluation_split": "val (test removed before training)",
        "selection_rule": "seed 0: highest merged-model val H; within 0.5 point, highest merged val G",
        "machine": f"{os.cpu_count()} logical CPU cores, {args.threads} torch thread(s), shared with other jobs",
        "argv": sys.argv[1:] if argv is None else argv,
        "seeds": previous.get("seeds", {}) if keep else {},
    }
    for seed in [int(x) for x in args.seeds.split(",")]:
        spec = BENCH["backbone"].replace(name=f"cifar-resnet:8w{args.width}s{seed}")
        per = result["seeds"].setdefault(str(seed), {"candidates": {}})
        t0 = time.perf_counter()
        per["stage1"] = stage1(args, spec, data, seed)
        h = 100 * per["stage1"]["metrics"]["val_hmean"]
        print(f"seed {seed} stage 1: val H {h:.1f} ({time.perf_counter() - t0:.0f} s)", flush=True)
        for name in names:
            t0 = time.perf_counter()
            per["candidates"][name] = c = candidate(args, spec, data, seed, name, *CANDIDATES[name])
            print(
                f"seed {seed} {name}: merged val H {100 * c['merged']['val_hmean']:.1f}, subsets mean val H "
                f"{100 * c['subsets_mean']['val_hmean']:.1f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if "0" in result["seeds"]:
                result["selected"] = select(result["seeds"]["0"]["candidates"])
            for s_, r in result["seeds"].items():
                r["table"] = table(r, result.get("selected") if s_ == "0" else None)
            result["confirm"], result["confirm_table"] = confirm(result["seeds"])
            write_json(args.json, result)
    for s_, r in result["seeds"].items():
        print(f"\nseed {s_} (val):\n{r['table']}")
    if result["confirm"]:
        print(f"\nover seeds (val, mean ± std):\n{result['confirm_table']}")
    print(f"selected on val (seed 0): {result.get('selected')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
