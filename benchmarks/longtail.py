"""Long-tailed recognition: every baseline and BTM on Fashion-MNIST-LT (IF 100 and 10, from-scratch CIFAR-style
ResNet, `full`) and reviews-LT (`minilm`, linear head on cached features); mean, harmonic, geometric, worst-class
and many/medium/few accuracy, training time; mean ± std over seeds. Resumable: every run is a directory under
--out; rerunning skips what is complete and resumes what has a checkpoint.

    python benchmarks/longtail.py --out runs/longtail                      # the default (reduced) protocol
    python benchmarks/longtail.py --out runs/lt-smoke --smoke              # minutes: tiny everything
    python benchmarks/longtail.py --out runs/longtail --tasks fmnist-lt100 --seeds 0

Rows: ce, cb-reweight, cb-resample, logit-adjust, mixup, crt (the ce model's head re-trained, class-balanced),
undersample (BTM's subset models, each fine-tuned from theta0 on one balanced subset; mean over the M models),
btm-merge (their uniform weight average, before stage 2), btm (after the class-balanced classifier stage: LAS,
shift BN, LWS) and btm-gml (the same merged model, stage 2 with BTM's GML option instead of LAS).
BTM's stage 1 is the mixup run of the same seed (MiSLAS stage 1 = CE + mixup), so BTM's time includes it, and
cRT's time includes the ce run. Times are wall-clock on the machine that ran it (a shared 2-core box: inflated).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from thrifty.backbones import BackboneSpec
from thrifty.data import load_data
from thrifty.io import read_json, write_json
from thrifty.longtail import BASELINES, BTMConfig, BTMRun, Stage2Config, build_backbone, retrain_classifier
from thrifty.longtail.plan import METRICS as BTM_METRICS
from thrifty.train import TrainConfig, run_training
from thrifty.train.run import use_feature_cache
from thrifty.tuners import TunedModel


METRICS = tuple(m for m in BTM_METRICS if m != "accuracy")  # the long_tail objective's metrics, as BTM reports them
SHORT = {"mean_class_accuracy": "mean", "hmean": "H", "gmean": "G", "worst_class_accuracy": "worst"}
ROWS = (
    "ce",
    "cb-reweight",
    "cb-resample",
    "logit-adjust",
    "mixup",
    "crt",
    "undersample",
    "btm-merge",
    "btm",
    "btm-gml",
)

_RESNET = dict(method="full", overrides={"bn_stats": "update"}, test_size=2000)
_SGD = dict(optimizer="sgd", weight_decay=5e-4, grad_clip=None, warmup_epochs=1.0, progress=False)
TASKS: dict[str, dict[str, Any]] = {
    # reduced protocol (stated in docs/methods.md): n_max capped at 1000 per class, ResNet-8, 20 epochs
    "fmnist-lt100": dict(
        data="fashion-mnist:lt100-max1000",
        backbone=BackboneSpec("cifar-resnet:8", image_size=28),
        train=TrainConfig(epochs=20, batch_size=128, lr=0.05, **_SGD),
        finetune=TrainConfig(epochs=80, batch_size=32, lr=0.01, **_SGD),  # chosen on val: benchmarks/btm_pilot.py
        stage2=TrainConfig(epochs=10, batch_size=128, lr=0.05 * 0.05, **_SGD),  # MiSLAS: classifier lr x 0.05
        crt=TrainConfig(epochs=10, batch_size=128, lr=0.05, **_SGD),
        **_RESNET,
    ),
    "reviews-lt": dict(
        data="reviews:lt100-count-max1000",  # 1000, 316, 100, 31, 10 reviews (5 to 1 stars)
        backbone=BackboneSpec("minilm", max_length=64),
        method="linear",
        overrides={},
        test_size=None,
        cache=True,
        train=TrainConfig(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, progress=False),
        finetune=TrainConfig(epochs=80, batch_size=16, lr=1e-3, weight_decay=1e-4, progress=False),
        stage2=TrainConfig(epochs=10, batch_size=64, lr=1e-3, weight_decay=1e-4, progress=False),
        crt=TrainConfig(epochs=10, batch_size=64, lr=3e-3, weight_decay=1e-4, progress=False),
    ),
}
TASKS["fmnist-lt10"] = {**TASKS["fmnist-lt100"], "data": "fashion-mnist:lt10-max1000"}
SMOKE = dict(
    data="digits:lt10",
    backbone=BackboneSpec("cifar-resnet:8w4", image_size=8),
    train=TrainConfig(epochs=1, batch_size=64, lr=0.05, **_SGD),
    finetune=TrainConfig(epochs=2, batch_size=16, lr=0.05, **_SGD),
    stage2=TrainConfig(epochs=1, batch_size=64, lr=0.0025, **_SGD),
    crt=TrainConfig(epochs=1, batch_size=64, lr=0.05, **_SGD),
    **{**_RESNET, "test_size": 200},
)


class Bench:
    def __init__(self, out: str, task: str, cfg: dict[str, Any], seed: int, btm: BTMConfig):
        self.out, self.task, self.cfg, self.seed, self.btm = out, task, cfg, seed, btm
        self.cache = os.path.join(out, task, "features") if cfg.get("cache") else None

    def dir(self, method: str) -> str:
        return os.path.join(self.out, self.task, method, f"seed{self.seed}")

    @property
    def spec(self) -> BackboneSpec:
        """The task's backbone; a from-scratch ResNet gets the seed's init (`cifar-resnet:8s<seed>`)."""
        spec = self.cfg["backbone"]
        return spec.replace(name=f"{spec.name}s{self.seed}") if spec.kind == "cifar-resnet" else spec

    def backbone(self):
        return build_backbone(self.spec)

    def train_cfg(self, key: str) -> TrainConfig:
        return replace(self.cfg[key], seed=self.seed)

    def baseline(self, name: str) -> None:
        out = self.dir(name)
        if _complete(out):
            return
        run_training(
            backbone=self.backbone(),
            data=self.cfg["data"],
            method=self.cfg["method"],
            overrides=self.cfg["overrides"],
            objective=BASELINES[name].objective,
            train=self.train_cfg("train"),
            output_dir=out,
            split_seed=0,  # one long-tailed draw per task (the literature fixes it); seeds vary init and order
            test_size=self.cfg["test_size"],
            resume=True,
            peak_memory=False,
            cache=self.cache,
        )

    def retrain(self, name: str, source: str, train: str, config: Stage2Config) -> None:
        """Classifier re-training of the model in `source` into this seed's `name` directory."""
        out = self.dir(name)
        if _complete(out):
            return
        bb = self.backbone()
        saved = read_json(os.path.join(source, "adapter_config.json")).get("base_model_name_or_path")
        if saved != bb.name and self.spec.kind == "cifar-resnet":
            # runs made before the init seed moved into the spec name the backbone `cifar-resnet:8`; `full` saved
            # every weight, so the name only has to match
            bb = build_backbone(self.spec.replace(name=saved))
        task = load_data(self.cfg["data"], bb.preprocess, seed=0, test_size=self.cfg["test_size"])
        model = TunedModel.from_pretrained(copy.deepcopy(bb), source, is_trainable=True, check_weights=False)
        if self.cache:
            task = use_feature_cache([model], task, self.cache, self.train_cfg(train))
        counts = np.bincount(task.split("train").labels, minlength=task.num_classes).tolist()
        retrain_classifier(model, task, self.train_cfg(train), config, counts, out, {"after": source})

    def crt(self) -> None:
        self.retrain("crt", self.dir("ce"), "crt", Stage2Config.crt())

    def btm_gml(self) -> None:
        """BTM's GML option: the merged model's stage 2 with the GML criterion instead of LAS."""
        self.retrain("btm-gml", os.path.join(self.dir("btm"), "merged"), "stage2", Stage2Config(criterion="gml"))

    def run_btm(self) -> None:
        out = self.dir("btm")
        if _complete(out):
            return
        BTMRun.create(
            out,
            backbone=self.spec,
            data=self.cfg["data"],
            method=self.cfg["method"],
            overrides=self.cfg["overrides"],
            objective=BASELINES["mixup"].objective,
            stage1=self.train_cfg("train"),
            finetune=self.train_cfg("finetune"),
            stage2=self.train_cfg("stage2"),
            config=self.btm,
            theta0=self.dir("mixup"),
            split_seed=0,
            test_size=self.cfg["test_size"],
            cache=self.cache,
            resume=True,
        ).run()

    def run_all(self, rows: list[str]) -> None:
        need = set(rows)
        if "crt" in need:
            need.add("ce")
        if need & {"undersample", "btm-merge", "btm", "btm-gml"}:
            need |= {"mixup", "btm"}
        for name in ("ce", "cb-reweight", "cb-resample", "logit-adjust", "mixup"):
            if name in need:
                self._timed(name, lambda n=name: self.baseline(n))
        if "crt" in need:
            self._timed("crt", self.crt)
        if "btm" in need:
            self._timed("btm", self.run_btm)
        if "btm-gml" in need:
            self._timed("btm-gml", self.btm_gml)

    def _timed(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        print(f"[{self.task} seed {self.seed}] {name}: {time.perf_counter() - t0:.0f} s", flush=True)

    def collect(self) -> dict[str, dict[str, Any]]:
        """Per row: test metrics and training seconds of this seed (None where not run)."""
        out: dict[str, dict[str, Any]] = {}

        def row(res: dict[str, Any], seconds: float) -> dict[str, Any]:
            m = res.get("metrics", {})
            return {
                **{k: m.get(f"test_{k}") for k in METRICS},
                "per_class": m.get("test_per_class_accuracy"),
                "train_seconds": seconds,
            }

        for name in ("ce", "cb-reweight", "cb-resample", "logit-adjust", "mixup"):
            if _complete(self.dir(name)):
                out[name] = row(_read(self.dir(name)), _seconds(self.dir(name)))
        if _complete(self.dir("crt")):
            out["crt"] = row(_read(self.dir("crt")), _seconds(self.dir("ce")) + _seconds(self.dir("crt")))
        if _complete(self.dir("btm")):
            res = _read(self.dir("btm"))
            t = res["train_seconds"]
            stages = res["stages"]
            pcs = [m["test_per_class_accuracy"] for m in stages["subsets"] if m.get("test_per_class_accuracy")]
            if pcs and all(None not in p for p in pcs):  # the mean per-class accuracy of the M subset models
                stages["undersample_mean"]["test_per_class_accuracy"] = np.mean(np.array(pcs, float), 0).tolist()
            out["undersample"] = row(
                {"metrics": stages["undersample_mean"]}, t["stage1"] + t["finetune"] / len(stages["subsets"])
            )
            out["btm-merge"] = row({"metrics": stages["merged"]}, t["stage1"] + t["finetune"])
            out["btm"] = row(res, t["total"])
            if _complete(self.dir("btm-gml")):
                out["btm-gml"] = row(
                    _read(self.dir("btm-gml")), t["stage1"] + t["finetune"] + _seconds(self.dir("btm-gml"))
                )
        return out


def _read(d: str) -> dict[str, Any]:
    p = os.path.join(d, "results.json")
    return read_json(p) if os.path.isfile(p) else {}


def _complete(d: str) -> bool:
    return _read(d).get("status") == "complete"


def _seconds(d: str) -> float:
    return float(sum(h.get("seconds", 0.0) for h in _read(d).get("history") or []))


def summarize(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± sample std (ddof 1) over the seeds that have the row."""
    out = {}
    for name in ROWS:
        runs = [r[name] for r in per_seed.values() if name in r]
        if not runs:
            continue
        stats = {}
        for k in (*METRICS, "train_seconds"):
            vals = [r[k] for r in runs if r[k] is not None]
            stats[k] = (
                None
                if not vals
                else {
                    "mean": float(np.mean(vals)),
                    "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else None,
                    "n": len(vals),
                }
            )
        pcs = [r["per_class"] for r in runs if r.get("per_class")]
        stats["per_class"] = [float(np.mean([p[i] for p in pcs])) for i in range(len(pcs[0]))] if pcs else None
        out[name] = stats
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    cols = [SHORT.get(k, k.replace("_accuracy", "")) for k in METRICS]
    lines = ["| task | method | " + " | ".join(cols) + " | train s | seeds |", "|---|---|" + "---:|" * (len(cols) + 2)]
    for task, res in results.items():
        for name, s in res["rows"].items():

            def cell(k, s=s):
                v = s.get(k)
                if v is None:
                    return "-"
                return f"{100 * v['mean']:.1f}" + (f" ± {100 * v['std']:.1f}" if v["std"] is not None else "")

            secs = s["train_seconds"]["mean"] if s.get("train_seconds") else None
            n = max((v["n"] for k, v in s.items() if k in METRICS and v), default=0)
            lines.append(
                f"| {task} | {name} | "
                + " | ".join(cell(k) for k in METRICS)
                + f" | {'-' if secs is None else f'{secs:.0f}'} | {n} |"
            )
    return "\n".join(lines)


PLOTTED = ("ce", "logit-adjust", "crt", "undersample", "btm")


def per_class_plot(task: str, rows: dict[str, Any], counts: list[int] | None, folder: str) -> str:
    """Per-class test accuracy bars of the PLOTTED rows (mean over seeds), classes head to tail."""
    from thrifty.bench.plots import plot_per_class

    series = {n: rows[n]["per_class"] for n in PLOTTED if rows.get(n, {}).get("per_class")}
    path = os.path.join(folder, f"longtail_per_class_{task}.png")
    return plot_per_class(series, counts, path, f"{task}: per-class test accuracy (mean over seeds)")


def replot(paths: list[str], folder: str) -> None:
    """Redraw the per-class plots from result JSONs (rows of later files win); training counts from the data."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for task, r in read_json(path)["results"].items():
            rows.setdefault(task, {}).update(r["rows"])
    for task, task_rows in rows.items():
        cfg = TASKS[task]
        data = load_data(cfg["data"], build_backbone(cfg["backbone"]).preprocess, seed=0, test_size=cfg["test_size"])
        labels = np.asarray(data.split("train").labels, np.int64)
        print(per_class_plot(task, task_rows, np.bincount(labels, minlength=data.num_classes).tolist(), folder))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tasks", default="fmnist-lt100,fmnist-lt10,reviews-lt")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--subsets", type=int, default=10)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--smoke", action="store_true", help="digits-LT, a 4-wide ResNet-8 at 8 px, 1 epoch, 2 subsets")
    p.add_argument("--json", default="benchmarks/results/longtail.json")
    p.add_argument("--plots", default=None, help="folder for per-class bar plots (one per task)")
    p.add_argument("--collect-only", action="store_true", help="only read finished runs and write the table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a busy box)")
    p.add_argument("--finetune-lr", type=float, default=None, help="BTM subset fine-tune lr (default: the task's)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="BTM subset fine-tune epochs (default: task's)")
    p.add_argument(
        "--replot",
        nargs="+",
        metavar="JSON",
        help="only redraw the per-class plots (into --plots) from result JSONs; a later file's rows replace an "
        "earlier one's (e.g. longtail.json, then longtail_btm_valpick.json)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.replot:
        replot(args.replot, args.plots or "docs/benchmarks")
        return 0
    tasks = {"digits-lt10": SMOKE} if args.smoke else {t: TASKS[t] for t in args.tasks.split(",")}
    if args.finetune_lr is not None or args.finetune_epochs is not None:  # e.g. the recipe benchmarks/btm_pilot.py
        tasks = {  # selects on val; use a fresh --out for the btm rows (a BTM plan must match on resume)
            t: {
                **c,
                "finetune": replace(
                    c["finetune"],
                    lr=c["finetune"].lr if args.finetune_lr is None else args.finetune_lr,
                    epochs=c["finetune"].epochs if args.finetune_epochs is None else args.finetune_epochs,
                ),
            }
            for t, c in tasks.items()
        }
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = args.rows.split(",")
    btm = BTMConfig(subsets=2 if args.smoke else args.subsets, per_class=args.per_class)
    results = {}
    for task, cfg in tasks.items():
        per_seed = {}
        for seed in seeds:
            b = Bench(args.out, task, cfg, seed, btm)
            if not args.collect_only:
                b.run_all(rows)
            per_seed[seed] = b.collect()
        results[task] = {
            "data": cfg["data"],
            "backbone": cfg["backbone"].name,
            "method": cfg["method"],
            "seeds": seeds,
            "rows": summarize(per_seed),
            "per_seed": per_seed,
        }
        if args.plots:
            first = _read(Bench(args.out, task, cfg, seeds[0], btm).dir("ce"))
            per_class_plot(task, results[task]["rows"], first.get("objective", {}).get("train_counts"), args.plots)
    md = table(results)
    print(md)
    payload = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{os.cpu_count()} logical CPU cores, torch {torch.__version__}, shared with other jobs",
        "protocol": {
            t: {k: (v.__dict__ if hasattr(v, "__dict__") else v) for k, v in c.items()} for t, c in tasks.items()
        },
        "btm": btm.__dict__ | {"stage2": btm.stage2.__dict__ if btm.stage2 else None},
        "results": results,
        "table": md,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    write_json(args.json, json.loads(json.dumps(payload, default=str)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
