"""PTQ with compensation on real models: FP vs PTQ vs PTQ+QwT vs PTQ+QwT-v2 at W4A4, W4A8, W6A6, W8A8.

Models: `minilm` fine-tuned on `reviews:1k` (full fine-tuning through thrifty.train.run_training, or LoRA merged
with merge_and_unload) and `efficientnet-lite0` fully fine-tuned on `fashion-mnist:1k` (thrifty's Trainer in
process, BatchNorm statistics frozen as in `full`'s default). Calibration uses the training split only. Reports
test accuracy, extra parameters, PyTorch (fake-quant simulation) latency, and at
W8A8 the ONNX (onnxruntime, CPU) accuracy against PyTorch and the CPU latency ratios folded QwT-v2 / PTQ and
QwT / PTQ, measured interleaved in one run. Writes JSON and prints Markdown tables.

Full run (estimated 18-22 min on 2 otherwise idle CPU cores; see docs/methods.md):
    PYTHONPATH=src python benchmarks/ptq_compensation.py --output benchmarks/results/ptq_compensation.json
Tiny check:
    PYTHONPATH=src python benchmarks/ptq_compensation.py --quick --output /tmp/ptq_quick.json
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from thrifty.backbones import BackboneSpec, load_backbone
from thrifty.cli.common import print_table
from thrifty.compress import PTQConfig, QwTConfig, QwTV2Config, quantize_, run_calibration
from thrifty.compress.quant.config import parse_bits
from thrifty.compress.quant.onnx_export import (
    evaluate_onnx,
    export_onnx,
    median_latency,
    ort_feed,
    ort_logits,
    ort_session,
)
from thrifty.compress.quant.pipeline import stop_recording
from thrifty.compress.quant.ptq import convert_ptq_, pack_
from thrifty.compress.quant.qwt import compensate_qwt_
from thrifty.compress.quant.qwt_v2 import compensate_qwt_v2_
from thrifty.compress.quant.serialize import size_report
from thrifty.data import load_data
from thrifty.io import write_json
from thrifty.metrics import environment
from thrifty.train import TrainConfig, Trainer, evaluate, run_training
from thrifty.tuners import get_tuned_model, load_tuned_model, make_config


BITS = ["w4a4", "w4a8", "w6a6", "w8a8"]
METHODS = ["ptq", "qwt", "qwt_v2"]  # + "qwt_v2-layer" with --cwac-layer-ablation (QwTV2Config target="layer")


def finetune(name: str, args: argparse.Namespace, work: str) -> tuple[Any, Any, dict[str, Any]]:
    """Returns (model, task, info) for 'text' (minilm / reviews:1k) or 'image' (efficientnet-lite0 / fashion-mnist)."""
    train = TrainConfig(epochs=args.epochs, batch_size=32, seed=0, progress=False)
    if name == "text":
        train.lr = 1e-4 if args.text_ft == "full" else 1e-3
        overrides = {"r": 8, "lora_alpha": 16} if args.text_ft == "lora" else {}
        kw = {"max_length": args.max_length}
        out = os.path.join(work, "minilm")
        res = run_training(
            backbone=BackboneSpec("minilm", **kw),
            data="reviews:1k",
            method=args.text_ft,
            overrides=overrides,
            train=train,
            output_dir=out,
            test_size=args.text_test,
            peak_memory=False,
            overwrite=True,
        )
        bb = load_backbone("minilm", **kw)
        task = load_data("reviews:1k", bb.preprocess, seed=0, test_size=args.text_test)
        model = load_tuned_model(bb, out)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        info = {"backbone": "minilm", "data": task.name, "finetune": args.text_ft, **kw}
        info["train_test_accuracy"] = res["metrics"]["test_accuracy"]
    else:
        kw = {"image_size": args.image_size}
        train.lr = 5e-4
        bb = load_backbone("efficientnet-lite0", **kw)
        task = load_data("fashion-mnist:1k", bb.preprocess, seed=0, test_size=args.image_test)
        torch.manual_seed(0)
        model = get_tuned_model(bb, make_config("full"), task.num_classes)
        res = Trainer(model, task, train).fit()
        info = {"backbone": "efficientnet-lite0", "data": task.name, "finetune": "full", **kw}
        info["train_test_accuracy"] = res["test_accuracy"]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, task, info


def latency_batch(task, n: int) -> Any:
    x, _ = next(iter(DataLoader(task.split("test"), batch_size=n, shuffle=False)))
    return x


def run_model(name: str, args: argparse.Namespace, work: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, task, info = finetune(name, args, work)
    info["finetune_seconds"] = time.perf_counter() - t0
    test = task.split("test")
    lat_x = latency_batch(task, args.latency_batch)
    rows = [{"method": "fp", "bits": "-", **_eval(model, test, lat_x, args)}]
    calib = DataLoader(task.split("train"), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    # One calibration pass serves every width (prepare is bit-free), and one base-PTQ convert per width serves the
    # three methods: QwT / QwT-v2 continue from a copy of it (what their own convert step does internally).
    prepared = copy.deepcopy(model)
    # embedding tables float, as when the published numbers were measured (PTQConfig now defaults to int8 tables)
    base = PTQConfig(observer_samples=args.observer_samples, embedding_bits=None)
    quantize_(prepared, QwTConfig(base_config=base, calib_samples=args.calib_samples))
    run_calibration(prepared, calib, args.calib_samples)
    batches = stop_recording(prepared)
    onnx_models: dict[str, Any] = {}
    for bits in args.bits:
        w, a = parse_bits(bits)
        ptq_cfg = base.replace(w_bits=w, a_bits=a, step="convert")
        t = time.perf_counter()
        converted = copy.deepcopy(prepared)
        convert_ptq_(converted, ptq_cfg, pack=False)
        ptq_seconds = time.perf_counter() - t
        plain_numel = None
        for method in METHODS + (["qwt_v2-layer"] if args.cwac_layer_ablation else []):
            m = copy.deepcopy(converted)
            t = time.perf_counter()
            if method == "ptq":
                pack_(m)
            elif method == "qwt":
                compensate_qwt_(m, QwTConfig(base_config=ptq_cfg, calib_samples=args.calib_samples), batches)
            else:
                target = "layer" if method.endswith("-layer") else "model"
                v2 = QwTV2Config(base_config=ptq_cfg, calib_samples=args.calib_samples, target=target)
                compensate_qwt_v2_(m, v2, batches)
            seconds = ptq_seconds + time.perf_counter() - t
            size = size_report(m)
            plain_numel = size["state_dict_numel"] if method == "ptq" else plain_numel
            row = {"method": method, "bits": bits, "convert_seconds": seconds, **_eval(m, test, lat_x, args)}
            row.update(extra_params=size["compensation_params"], storage_bytes=size["storage_bytes"])
            row["same_params_as_ptq"] = "yes" if size["state_dict_numel"] == plain_numel else "no"
            log = m.thrifty_quant["spec"].get("compensation_log", [])
            if method == "qwt":
                row["r2"] = [round(e["r2"], 4) for e in log]
            elif method.startswith("qwt_v2"):
                row["mean_error_reduction"] = sum(e["error_reduction"] for e in log) / max(1, len(log))
            rows.append(row)
            print(f"[{name}] {bits} {method}: acc {row['accuracy']:.4f} ({seconds:.1f}s convert)", flush=True)
            if bits == args.onnx_bits and not args.no_onnx:
                onnx_models[method] = m
            del m
        del converted
    out = {"info": info, "rows": rows}
    if onnx_models:
        out["onnx"] = _onnx(onnx_models, task, lat_x, args, os.path.join(work, f"onnx_{name}"))
    out["seconds"] = time.perf_counter() - t0
    return out


def _eval(model, test, lat_x, args) -> dict[str, Any]:
    res = evaluate(model, test, 64)
    with torch.no_grad():
        lat = median_latency(lambda: model(lat_x), repeats=args.torch_repeats, warmup=1)
    return {"accuracy": res["accuracy"], "pytorch_latency_ms": 1000 * lat}


def _onnx(models: dict[str, Any], task, lat_x, args, directory: str) -> dict[str, Any]:
    """Export each W8A8 model, compare with PyTorch, then time the sessions interleaved in one loop."""
    res: dict[str, Any] = {}
    sessions = {}
    for method, m in models.items():
        path = export_onnx(m, os.path.join(directory, f"{method}.onnx"), lat_x)
        sess = ort_session(path, threads=args.threads)
        with torch.no_grad():
            ref = m(lat_x)
        out = ort_logits(sess, lat_x)
        torch_acc = evaluate(m, task.split("test"), 64)["accuracy"]
        onnx_acc = evaluate_onnx(path, task.split("test"), 64, threads=args.threads)["accuracy"]
        res[method] = {
            "onnx_accuracy": onnx_acc,
            "pytorch_accuracy": torch_acc,
            "max_abs_logit_diff": float((out - ref).abs().max()),
            "file_bytes": os.path.getsize(path),
        }
        sessions[method] = sess
    feed = ort_feed(lat_x)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(2):
        for s in sessions.values():
            s.run(None, feed)
    order = list(sessions)
    for r in range(args.repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:  # rotate: no session always runs first
            t = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t)
    for k in sessions:
        res[k]["ort_latency_ms"] = 1000 * float(torch.tensor(times[k]).median())
    if "ptq" in res:
        for k in ("qwt", "qwt_v2"):
            if k in res:
                res[f"latency_ratio_{k}_over_ptq"] = res[k]["ort_latency_ms"] / res["ptq"]["ort_latency_ms"]
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="JSON results file")
    p.add_argument("--models", nargs="+", default=["text", "image"], choices=["text", "image"])
    p.add_argument("--bits", nargs="+", default=BITS)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--text-ft", default="full", choices=["full", "lora"], help="minilm: full FT or merged LoRA")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--text-test", type=int, default=300)
    p.add_argument("--image-test", type=int, default=500)
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--observer-samples", type=int, default=2**16, help="values kept per activation quantizer")
    p.add_argument("--latency-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=10, help="onnxruntime latency repeats (interleaved)")
    p.add_argument("--torch-repeats", type=int, default=3, help="PyTorch simulation latency repeats")
    p.add_argument("--onnx-bits", default="w8a8")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cwac-layer-ablation", action="store_true", help="also QwT-v2 fitted to the same-input layer")
    p.add_argument("--quick", action="store_true", help="tiny scale: 1 epoch, small tests, 2 bit widths")
    p.add_argument("--workdir", help="fine-tuning / ONNX files (default: a temporary directory)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.text_test, args.image_test = 1, 40, 60
        args.max_length, args.image_size, args.calib_samples = 32, 32, 32
        args.bits, args.repeats, args.torch_repeats, args.latency_batch = ["w4a8", "w8a8"], 3, 1, 8
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        results = {"args": vars(args), "env": environment(torch.device("cpu")), "models": {}}
        for name in args.models:
            results["models"][name] = run_model(name, args, work)
            write_json(args.output, results)
    results["seconds"] = time.perf_counter() - t0
    write_json(args.output, results)
    _print(results)


def _print(results: dict[str, Any]) -> None:
    for res in results["models"].values():
        info = res["info"]
        print(f"\n## {info['backbone']} on {info['data']} ({info['finetune']} fine-tuning)\n")
        cols = [("bits", "bits"), ("method", "method"), ("accuracy", "test acc"), ("extra_params", "extra params")]
        cols += [("same_params_as_ptq", "= PTQ params"), ("pytorch_latency_ms", "PyTorch sim ms")]
        print_table(res["rows"], [*cols, ("convert_seconds", "convert s")])
        if "onnx" in res:
            o = res["onnx"]
            table = [{"method": k, **v} for k, v in o.items() if isinstance(v, dict)]
            print()
            print_table(
                table,
                [
                    ("method", "W8A8"),
                    ("pytorch_accuracy", "PyTorch acc"),
                    ("onnx_accuracy", "ONNX acc"),
                    ("max_abs_logit_diff", "max |logit diff|"),
                    ("ort_latency_ms", "ORT ms"),
                    ("file_bytes", "file bytes"),
                ],
            )
            for k in ("qwt_v2", "qwt"):
                if f"latency_ratio_{k}_over_ptq" in o:
                    print(f"CPU latency ratio {k} / ptq: {o[f'latency_ratio_{k}_over_ptq']:.3f}")
    print(f"\ntotal {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
