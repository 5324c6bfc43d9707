"""`thrifty demo`: the main job on the embedded default, offline, on 2 CPU cores in well under 20 minutes.

Adapts the packaged real model `minilm` (all-MiniLM-L6-v2) to the packaged real text task `reviews` (5-class
review rating) under the 1k protocol (train800val200 -> test) with every demo method and the same recipe,
then prints a table and writes it, results JSON and a bar plot to runs/demo/. Finished methods are reused
(never re-run or overwritten silently); `--fresh` moves old results aside first.
"""

from __future__ import annotations

import argparse
import os
import time

from thrifty.cli.common import print_table


# name -> method options; later issues append their methods here
DEMO_METHODS: dict[str, tuple[str, dict[str, str]]] = {
    "linear": ("linear", {}),
    "lora": ("lora", {"r": "8"}),
    "adaptformer": ("adaptformer", {"bottleneck": "8"}),
    "dtl": ("dtl", {}),
    "dtl_plus": ("dtl_plus", {}),
    "last": ("last", {}),
    "bi_lora-1bit": ("bi_lora", {"bits": "1", "dim": "32", "scale": "1.0"}),
    "bi_adaptformer-1bit": ("bi_adaptformer", {"bits": "1", "dim": "32", "scale": "1.0"}),
    "miet": ("miet", {"k": "6", "depth": "2", "r": "16"}),
}
# the offline benchmark's recipe for this task (benchmarks/suites/offline.yaml), so the demo's numbers are one seed
# of that table
RECIPE = {
    "backbone": "minilm",
    "data": "reviews:1k",
    "max_length": 64,
    "test_size": 1000,
    "epochs": 3,
    "batch_size": 32,
    "lr": 1e-3,
    "weight_decay": 1e-4,
    "warmup_epochs": 0.5,
    "seed": 0,
}
COLUMNS = [
    ("name", "method"),
    ("test_accuracy", "test acc"),
    ("trainable_params", "trainable params"),
    ("adapter_bytes", "adapter bytes"),
    ("saved_activation_bytes", "saved for backward (B)"),
    ("peak_memory_bytes", "peak mem (B)"),
    ("train_seconds", "train s"),
    ("seconds_per_epoch", "s/epoch"),
]


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo", help="adapt minilm to the reviews task with every method; table + plot", description=__doc__
    )
    p.add_argument("--output", default="runs/demo")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help="subset of: " + ", ".join(DEMO_METHODS))
    p.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    p.add_argument("--test-size", type=int, default=RECIPE["test_size"])
    p.add_argument("--max-length", type=int, default=RECIPE["max_length"])
    p.add_argument("--fresh", action="store_true", help="move earlier demo results aside and run again")
    p.add_argument("--no-progress", action="store_true")
    return p


def plot(rows: list[dict], path: str, recipe: dict | None = None, env: dict | None = None) -> str:
    """Horizontal bars, one row per method (names never overlap), one panel per quantity, values at the bars' ends;
    a cost axis is logarithmic where its values span a decade (`thrifty.bench.figures.configure_axis`)."""
    from thrifty.bench.figures import bar_panels
    from thrifty.bench.report import env_words

    recipe = recipe or RECIPE
    names = [r["name"] for r in rows]
    panels = [
        {
            "title": "test accuracy",
            "values": [100 * r["test_accuracy"] for r in rows],
            "kind": "percent",
            "ref": (100 / 5, "chance"),
        },
        {"title": "adapter file size", "values": [r.get("adapter_bytes") for r in rows], "kind": "bytes"},
        {
            "title": "bytes saved for backward (one step)",
            "values": [r.get("saved_activation_bytes") for r in rows],
            "kind": "bytes",
        },
        {"title": "training time (all epochs)", "values": [r.get("train_seconds") for r in rows], "kind": "seconds"},
    ]
    epochs = recipe["epochs"]
    title = (
        f"thrifty demo: {recipe['backbone']} (max {recipe['max_length']} tokens) on {recipe['data']}, "
        f"{epochs} epoch{'s' if epochs != 1 else ''}, batch {recipe['batch_size']}, seed {recipe['seed']}"
    )
    sub = f"test accuracy on {rows[0].get('test_samples', recipe['test_size'])} reviews (5 classes, chance 20 %)"
    if env:
        sub += f"; {env_words(env)}"
    return bar_panels(names, panels, path, title, sub)


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import BackboneSpec
    from thrifty.io import read_json, write_json, write_text
    from thrifty.train import RESULTS_NAME, TrainConfig, run_training

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in DEMO_METHODS]
    if unknown:
        raise SystemExit(f"unknown demo methods {unknown}; choose from {list(DEMO_METHODS)}")
    recipe = {**RECIPE, "epochs": args.epochs, "test_size": args.test_size, "max_length": args.max_length}
    if args.fresh and os.path.isdir(args.output):
        aside = f"{args.output.rstrip('/')}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        os.rename(args.output, aside)
        print(f"moved earlier results to {aside}")
    print("recipe (same for every method):", ", ".join(f"{k}={v}" for k, v in recipe.items()))
    rows = []
    env = None
    for name in names:
        method, options = DEMO_METHODS[name]
        out = os.path.join(args.output, name)
        res_path = os.path.join(out, RESULTS_NAME)
        results = read_json(res_path) if os.path.exists(res_path) else None
        if results and results.get("extra", {}).get("demo_recipe") != recipe:
            raise SystemExit(f"{res_path} was made with another recipe; pass --fresh to move it aside")
        if results:
            print(f"[{name}] reusing {res_path}")
        else:
            print(f"[{name}] training {method} {options} ...", flush=True)
            t0 = time.perf_counter()
            train = TrainConfig(
                epochs=recipe["epochs"],
                batch_size=recipe["batch_size"],
                lr=recipe["lr"],
                weight_decay=recipe["weight_decay"],
                warmup_epochs=recipe["warmup_epochs"],
                seed=recipe["seed"],
                progress=not args.no_progress,
            )
            results = run_training(
                backbone=BackboneSpec(recipe["backbone"], max_length=recipe["max_length"]),
                data=recipe["data"],
                method=method,
                overrides=options,
                train=train,
                output_dir=out,
                test_size=recipe["test_size"],
                resume=True,
                extra={"demo_recipe": recipe, "wall_seconds": None},
            )
            print(
                f"[{name}] done in {time.perf_counter() - t0:.0f} s: test acc "
                f"{results['metrics']['test_accuracy']:.4f}"
            )
        m = results["metrics"]
        env = env or results.get("env")
        rows.append({"name": name, **m, "train_seconds": sum(h["seconds"] for h in results["history"])})
    print()
    table = print_table(rows, COLUMNS)
    chance = 1.0 / 5
    print(
        f"\nchance = {chance:.2f} (test split is class-balanced); test accuracy on {rows[0]['test_samples']} "
        "reviews; bytes saved for backward counted on one training batch; peak memory = resident-set growth of "
        "one training step in a fresh process (CPU)"
    )
    os.makedirs(args.output, exist_ok=True)
    write_json(os.path.join(args.output, "summary.json"), {"recipe": recipe, "rows": rows})
    write_text(os.path.join(args.output, "summary.md"), f"# thrifty demo\n\nrecipe: {recipe}\n\n{table}\n")
    plot(rows, os.path.join(args.output, "demo.png"), recipe, env)
    print(f"wrote {args.output}/summary.md, summary.json, demo.png")
    return 0
