"""AFM on CTR models: original vs AFM / svd_w / scratch at 3x and 5x smaller, on MovieLens-100K and Adult.

For each dataset, model (DeepFM, DCN, AutoInt: `ctr:MODEL`, embeddings 16, MLP 400-400-400) and seed:
1. train the original from scratch with `run_training` (recipe below, chosen on a time-ordered validation split
   cut from the training split: the last 1/8; never on test);
2. compress copies to `size_ratio` 3 and 5 (parameters of the whole model; allocation by a common energy
   threshold; targets: MLP layers 2-3 + every field table, projections merged into MLP layer 1), with the whole
   training split as the proxy set (the paper's setting):
     afm, afm+ft, afm_act, afm_act+ft     AFM, exact pair or ReLU between the factors, with / without fine-tune
     svd_w, svd_w+ft                      SVD of the weights (tables: SVD of the table), same sizes
     scratch                              the compressed architecture (AFM's ranks) re-initialised and trained
                                          with the original's recipe (epochs, lr 1e-3)
   fine-tune (+ft): 1 epoch of the training split, batches of 256, AdamW lr 1e-4 cosine (paper: NOT FOUND);
3. test AUC and log loss, parameters, bytes of model.safetensors;
4. (seed 0 only) CPU latency of every model of the group, batch 1 and batch 4096, PyTorch eager and onnxruntime,
   one thread, interleaved in one process (rotating order; median and min over rounds).

Resumable: every finished cell is written to the JSON at once and skipped on the next run; trained models live in
--workdir. On the shared 2-core box latencies measured while other jobs run are not a claim (the JSON records the
load average).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/afm_ctr.py --workdir /tmp/afm-ctr \\
        --output benchmarks/results/afm_ctr.json [--datasets movielens-100k adult] [--models deepfm dcn autoint]
        [--seeds 0 1 2] [--ratios 3 5] [--variants ...] [--no-latency]
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings

import numpy as np
import torch

from thrifty.backbones import load_backbone
from thrifty.compress import compress_
from thrifty.compress.afm import AFMConfig, export_onnx, save_afm
from thrifty.data import load_data
from thrifty.data.base import batch_loader
from thrifty.io import read_json, save_tensors, write_json
from thrifty.train import TrainConfig, evaluate
from thrifty.train.run import run_training
from thrifty.tuners import load_tuned_model


RECIPE = {"batch_size": 256, "lr": 1e-3, "weight_decay": 1e-4, "warmup_epochs": 0.2}
EPOCHS = {"movielens-100k": 2, "adult": 4}  # chosen on the validation split (docs/benchmarks-afm.md)
FT = {"finetune_epochs": 1, "finetune_lr": 1e-4}
VARIANTS = {
    "afm": {},
    "afm+ft": {"finetune": "labels", **FT},
    "afm_act": {"act": True},
    "afm_act+ft": {"act": True, "finetune": "labels", **FT},
    "svd_w": {"init": "svd_w"},
    "svd_w+ft": {"init": "svd_w", "finetune": "labels", **FT},
    "scratch": {"init": "scratch", "finetune": "labels", "finetune_lr": 1e-3},  # epochs: the original's
}
LR_AUC = {"movielens-100k": 0.694, "adult": 0.880}  # one-hot logistic regression (offline-assets.md §5)


def setup(data: str, model: str, seed: int):
    bb = load_backbone(f"ctr:{model}")
    task = load_data(data, bb.preprocess)
    bb.fit_to_task_(task, seed=seed)
    return bb, task


def train_original(data: str, model: str, seed: int, workdir: str) -> str:
    out = os.path.join(workdir, data, model, f"seed{seed}", "original")
    if not os.path.isfile(os.path.join(out, "results.json")):
        cfg = TrainConfig(epochs=EPOCHS[data], seed=seed, progress=False, **RECIPE)
        run_training(
            backbone=f"ctr:{model}",
            data=data,
            method="full",
            train=cfg,
            output_dir=out,
            peak_memory=False,
            overwrite=True,
        )
    return out


def proxy_batches(task, seed: int, batch_size: int = 256) -> list:
    train = task.split("train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    from torch.utils.data import BatchSampler

    return list(batch_loader(train, BatchSampler(order, batch_size, drop_last=False)))


def file_bytes(model, directory: str, compressed: bool) -> int:
    if compressed:
        save_afm(model, directory)
    else:
        os.makedirs(directory, exist_ok=True)
        save_tensors(
            os.path.join(directory, "model.safetensors"),
            {k: v.detach().contiguous() for k, v in model.state_dict().items()},
        )
    return os.path.getsize(os.path.join(directory, "model.safetensors"))


def measure(model, task) -> dict:
    res = evaluate(model, task.split("test"), 4096)
    return {"auc": res["auc"], "logloss": res["logloss"], "params": sum(p.numel() for p in model.parameters())}


def run_group(args, data: str, model: str, seed: int, results: dict, path: str) -> dict:
    """Train (or reuse) the original of one (data, model, seed) and every compressed variant; returns the models
    (for latency) keyed by cell name."""
    key = f"{data}/{model}/seed{seed}"
    t0 = time.perf_counter()
    run_dir = train_original(data, model, seed, args.workdir)
    bb, task = setup(data, model, seed)
    original = load_tuned_model(bb, run_dir).eval()
    models = {"original": original}
    cells = results["cells"]
    if f"{key}/original" not in cells:
        cells[f"{key}/original"] = {
            **measure(original, task),
            "bytes": file_bytes(original, os.path.join(run_dir, "saved"), False),
            "train_seconds": read_json(os.path.join(run_dir, "results.json"))["metrics"].get("train_seconds"),
        }
        write_json(path, results)
    batches = None
    for ratio in args.ratios:
        for name in args.variants:
            cell = f"{key}/{name}@{ratio:g}x"
            out = os.path.join(args.workdir, data, model, f"seed{seed}", f"{name}@{ratio:g}x")
            need_model = args.latency and seed == args.seeds[0] and f"{data}/{model}" not in results["latency"]
            if cell in cells and not need_model:
                continue
            if cell in cells and os.path.isfile(os.path.join(out, "compress_config.json")):
                from thrifty.compress import load_compressed

                models[f"{name}@{ratio:g}x"] = load_compressed(out)[0]
                continue
            batches = batches or proxy_batches(task, seed)
            extra = dict(VARIANTS[name])
            if name == "scratch":
                extra["finetune_epochs"] = EPOCHS[data]
            m = copy.deepcopy(original)
            t1 = time.perf_counter()
            compress_(m, AFMConfig(size_ratio=ratio, **extra), batches)
            seconds = time.perf_counter() - t1
            summary = m.thrifty_compress["summary"]
            cells[cell] = {
                **measure(m, task),
                "bytes": file_bytes(m, out, True),
                "size_ratio": summary["size_ratio"],
                "ranks": {k.rsplit(".", 1)[-1]: v["rank"] for k, v in summary["layers"].items()},
                "compress_seconds": seconds,
            }
            write_json(path, results)
            models[f"{name}@{ratio:g}x"] = m
            print(
                f"{cell}: auc {cells[cell]['auc']:.4f} (original {cells[f'{key}/original']['auc']:.4f}), "
                f"x{summary['size_ratio']:.2f}, {seconds:.0f} s",
                flush=True,
            )
    print(f"{key}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return models


def latency(models: dict, task, workdir: str, rounds: int, b1_calls: int) -> dict:
    """Interleaved CPU latency (one thread) of every model: PyTorch eager and onnxruntime, batch 1 and 4096."""
    import onnxruntime as ort

    test = task.split("test")
    x1, _ = test.get_batch([0])
    xb, _ = test.get_batch(list(range(min(4096, len(test)))))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    sessions = {}
    for name, m in models.items():
        path = os.path.join(workdir, f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(m, path, x1)
        sessions[name] = (ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"]), os.path.getsize(path))
    feeds = {b: {k: v.numpy() for k, v in x.items()} for b, x in ((1, x1), (4096, xb))}
    calls = {
        ("torch", 1): lambda m, s: [m(x1) for _ in range(b1_calls)],
        ("torch", 4096): lambda m, s: m(xb),
        ("onnx", 1): lambda m, s: [s.run(None, feeds[1]) for _ in range(b1_calls)],
        ("onnx", 4096): lambda m, s: s.run(None, feeds[4096]),
    }
    per = {(1): b1_calls, (4096): 1}
    times = {(n, e, b): [] for n in models for (e, b) in calls}
    names = list(models)
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            for n in names:
                fn(models[n], sessions[n][0])
        for r in range(rounds):
            for n in names[r % len(names) :] + names[: r % len(names)]:
                for (e, b), fn in calls.items():
                    t = time.perf_counter()
                    fn(models[n], sessions[n][0])
                    times[(n, e, b)].append((time.perf_counter() - t) / per[b])
    out = {}
    for (n, e, b), ts in times.items():
        out.setdefault(n, {"onnx_bytes": sessions[n][1]})[f"{e}_b{b}_ms"] = {
            "median": 1e3 * float(np.median(ts)),
            "min": 1e3 * float(np.min(ts)),
        }
    return out


def tables(results: dict) -> str:
    """Markdown: per dataset and model, every variant's mean ± std over seeds, and seed-0 latencies."""
    cells, lat = results["cells"], results.get("latency", {})
    groups: dict = {}
    for key, c in cells.items():
        data, model, _, variant = key.split("/")
        groups.setdefault((data, model), {}).setdefault(variant, []).append(c)
    lines = []
    for (data, model), variants in groups.items():
        lines += [
            f"\n**{data} / {model}** (logistic regression AUC {LR_AUC[data]:.3f})\n",
            "| variant | seeds | AUC | log loss | params | x smaller | bytes | torch b1 ms | torch b4096 ms "
            "| onnx b1 ms | onnx b4096 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        base = np.mean([c["params"] for c in variants["original"]])

        def order(v: str) -> tuple:
            name, _, ratio = v.partition("@")
            return (float(ratio.rstrip("x") or 0), list(VARIANTS).index(name) if name in VARIANTS else -1)

        for v in sorted(variants, key=order):
            cs = variants[v]
            auc, ll = np.array([c["auc"] for c in cs]), np.array([c["logloss"] for c in cs])
            L = lat.get(f"{data}/{model}", {}).get(v, {})

            def ms(k, L=L):
                return f"{L[k]['min']:.3f}" if k in L else "–"

            lines.append(
                f"| {v} | {len(cs)} | {auc.mean():.4f} ± {auc.std():.4f} | {ll.mean():.4f} ± {ll.std():.4f} | "
                f"{int(np.mean([c['params'] for c in cs])):,d} | {base / np.mean([c['params'] for c in cs]):.2f} | "
                f"{int(np.mean([c['bytes'] for c in cs])):,d} | {ms('torch_b1_ms')} | {ms('torch_b4096_ms')} | "
                f"{ms('onnx_b1_ms')} | {ms('onnx_b4096_ms')} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", default="benchmarks/results/afm_ctr.json")
    p.add_argument("--datasets", nargs="+", default=["movielens-100k", "adult"])
    p.add_argument("--models", nargs="+", default=["deepfm", "dcn", "autoint"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--ratios", nargs="+", type=float, default=[3.0, 5.0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--no-latency", dest="latency", action="store_false")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--b1-calls", type=int, default=50)
    p.add_argument("--tables-only", action="store_true", help="print the tables of --output and stop")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = read_json(args.output) if os.path.isfile(args.output) else {"cells": {}, "latency": {}}
    if args.tables_only:
        print(tables(results))
        return
    results["meta"] = {"recipe": RECIPE, "epochs": EPOCHS, "finetune": FT, "threads": 1, "lr_auc": LR_AUC}
    for data in args.datasets:
        for model in args.models:
            for seed in args.seeds:
                models = run_group(args, data, model, seed, results, args.output)
                if args.latency and seed == args.seeds[0] and f"{data}/{model}" not in results["latency"]:
                    _, task = setup(data, model, seed)
                    onnx_dir = os.path.join(args.workdir, data, model, "onnx")
                    lat = latency(models, task, onnx_dir, args.rounds, args.b1_calls)
                    results["latency"][f"{data}/{model}"] = {**lat, "loadavg": list(os.getloadavg())}
                    write_json(args.output, results)
    print(tables(results))


if __name__ == "__main__":
    main()
