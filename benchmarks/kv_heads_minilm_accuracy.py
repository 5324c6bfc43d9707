"""KV-head compression of a fine-tuned MHA classifier: all-MiniLM-L6-v2 (12 heads, no RoPE) LoRA-fine-tuned on
`reviews:1k`, then compressed to 6 / 4 / 3 KV heads with `mean` or `svd_a`, each without and with healing on the
classification loss; test accuracy of every model. Everything runs through thrifty's own CLI (`thrifty train`, then
`thrifty compress --method kv_heads --adapter ...`), in process.

Recipe (defaults): fine-tune `thrifty train --backbone minilm --max-length 64 --data reviews:1k --method lora --set
r=8 --epochs 3` (lr 1e-3, batch 32); compress with `--calib-samples 512` training reviews (never test); heal with
`--heal-steps 32 --set heal_batch_size=16` (one epoch over the 512 calibration reviews, LoRA r=8 on query and output,
lr 5e-4, merged back); accuracy on `--test-size 1000` class-balanced test reviews (5 classes, chance 20 %; one review
= 0.1 point, binomial standard error about 1.6 points). The embedding cosines (no fine-tuning) are
benchmarks/kv_heads_minilm.py's. BERT has no `num_key_value_heads`: the K shared heads fill every head slot, so these
are the accuracies of a K-head model, not its memory.

Resumable: each setting's CLI output folder is kept under --workdir and skipped when its results.json exists.
The box is a 2-core CPU shared with other jobs: seconds are not claims.

    PYTHONPATH=src python benchmarks/kv_heads_minilm_accuracy.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from thrifty.cli.common import print_table
from thrifty.cli.main import main as thrifty
from thrifty.io import read_json, write_json
from thrifty.metrics import environment


def run(argv: list[str]) -> None:
    print("thrifty " + " ".join(argv), flush=True)
    if thrifty(argv) != 0:
        raise SystemExit(f"thrifty {' '.join(argv)} failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/results/kv_heads_minilm_accuracy.json")
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/thrifty/kv_heads_minilm_acc"))
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--test-size", type=int, default=1000)
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--heal-steps", type=int, default=32)
    ap.add_argument("--heal-batch-size", type=int, default=16)
    ap.add_argument("--heads", default="6,4,3")
    ap.add_argument("--strategies", default="mean,svd_a")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    out = Path(args.output)
    results: dict[str, Any] = read_json(out) if out.is_file() else {"rows": {}}
    results.update(
        benchmark="kv_heads on a LoRA-fine-tuned all-MiniLM-L6-v2 classifier (reviews:1k), test accuracy",
        note="2-core box shared with other jobs: seconds are not claims",
        env=environment("cpu"),
        protocol={k: v for k, v in vars(args).items() if k not in ("output", "workdir")},
    )
    common = ["--data", "reviews:1k", "--test-size", str(args.test_size), "--seed", "0"]
    ft = work / "finetuned"
    if not (ft / "results.json").is_file():
        t = time.time()
        argv = ["train", "--backbone", "minilm", "--max-length", str(args.max_length), *common, "--method", "lora"]
        run([*argv, "--set", "r=8", "--epochs", str(args.epochs), "--no-progress", "--output", str(ft)])
        results["finetune_seconds"] = round(time.time() - t, 1)
    trained = read_json(ft / "results.json")
    results["finetune"] = {
        "command": f"thrifty train --backbone minilm --max-length {args.max_length} --data reviews:1k --method lora "
        f"--set r=8 --epochs {args.epochs} --test-size {args.test_size} --seed 0",
        "test": {k[5:]: v for k, v in trained.get("metrics", {}).items() if k.startswith("test_")},
        "history": trained.get("history"),
    }
    grid = [
        (k, strategy, steps)
        for steps in (0, args.heal_steps)  # every unhealed model first, then the healed ones
        for k in [int(x) for x in args.heads.split(",")]
        for strategy in args.strategies.split(",")
    ]
    for k, strategy, steps in grid:
        name = f"{k} heads, {strategy}" + (f", healed {steps} steps" if steps else "")
        folder = work / f"k{k}_{strategy}_heal{steps}"
        if not (folder / "results.json").is_file():
            argv = ["compress", "--method", "kv_heads", "--adapter", str(ft), *common, "--eval"]
            argv += ["--kv-heads", str(k), "--set", f"values={strategy}", "--set", f"keys={strategy}"]
            argv += ["--calib-samples", str(args.calib_samples), "--heal-steps", str(steps)]
            argv += ["--set", f"heal_batch_size={args.heal_batch_size}", "--no-progress"]
            run([*argv, "--output", str(folder)])
        res = read_json(folder / "results.json")
        results["fine_tuned_test_accuracy"] = res["float_test"]["accuracy"]
        results["rows"][name] = {
            "kv_heads": k,
            "strategy": strategy,
            "heal": res.get("heal"),
            "accuracy": res["compressed_test"]["accuracy"],
            "loss": res["compressed_test"]["loss"],
            "float_accuracy": res["float_test"]["accuracy"],
            "layer_rel_errors": res.get("layer_rel_errors"),
            "seconds": res.get("seconds"),
        }
        write_json(out, results)
        print(f"{name}: accuracy {results['rows'][name]['accuracy']:.4f}", flush=True)
    cosines = Path(__file__).parent / "results" / "kv_heads_minilm.json"
    cos = read_json(cosines)["rows"] if cosines.is_file() else {}
    rows = []
    for name, r in results["rows"].items():
        c = cos.get(f"{r['kv_heads']} heads, {r['strategy']}", {}).get("mean_cosine")
        rows.append({"row": name, "acc": 100 * r["accuracy"], "cos": c if not r["heal"] else None})
    print(f"fine-tuned (12 heads): {100 * results['fine_tuned_test_accuracy']:.1f} %")
    print_table(rows, [("row", "model"), ("acc", "test accuracy %"), ("cos", "embedding cosine (no fine-tune)")])


if __name__ == "__main__":
    main()
