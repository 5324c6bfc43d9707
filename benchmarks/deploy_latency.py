"""Deployed forms on onnxruntime (CPU): float vs thrifty int8 / int4-weight (PTQ, QwT-v2) vs onnxruntime's own
quantizers, in one run: test accuracy, file bytes, latency (interleaved) and the kernels the engine ran.

For one fine-tuned model (`--adapter`, a `thrifty train` output) this exports the float model, quantizes it with
thrifty exactly as `thrifty quantize --onnx` does (the CLI's calibration: 512 seeded training samples, batch 32;
`softmax_quantizer=uniform`), exports the deployment graphs, and runs onnxruntime's `quantize_dynamic` (defaults)
and `quantize_static` (QDQ, uint8 activations, int8 per-channel weights, MinMax on the same calibration samples)
on the float file. Then, per form: accuracy on the test split in onnxruntime (thrifty's forms also in the PyTorch
simulation), bytes, the op-type counts of onnxruntime's optimized graph (`SessionOptions.optimized_model_filepath`),
and latency with 1 and 2 intra-op threads at batch 1 and 16, spinning off, all sessions of a setting timed in a
rotating order (median and minimum; on a shared machine the minimum is the robust statistic).

    PYTHONPATH=src python benchmarks/deploy_latency.py --case text --backbone minilm --max-length 64 \\
        --data reviews:1k --adapter runs/minilm --workdir /tmp/deploy-text \\
        --output benchmarks/results/deploy_latency.json
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import time
from typing import Any

import numpy as np
import torch
from ort_baselines import log, ort_int4, ort_quantizers, ort_static_sweep

from thrifty.io import read_json, write_json


THRIFTY_FORMS = {  # name -> (method, bits)
    "thrifty-ptq-w8a8": ("ptq", "w8a8"),
    "thrifty-qwt_v2-w8a8": ("qwt_v2", "w8a8"),
    "thrifty-ptq-w4a16": ("ptq", "w4a16"),
    "thrifty-qwt_v2-w4a16": ("qwt_v2", "w4a16"),
    "thrifty-ptq-w4a8": ("ptq", "w4a8"),
    "thrifty-qwt_v2-w4a8": ("qwt_v2", "w4a8"),
}


def optimized_op_counts(path: str, out: str) -> dict[str, int]:
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = out
    opts.log_severity_level = 3
    ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return dict(sorted(collections.Counter(n.op_type for n in onnx.load(out).graph.node).items()))


def validation_split(task, calib_n: int = 512, n: int = 500, seed: int = 0):
    """The task's val split, else training samples outside the CLI's calibration draw (same permutation)."""
    if task.has("val"):
        return task.split("val")
    train = task.split("train")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[calib_n : calib_n + n]
    return train.subset(sorted(idx.tolist()))


def time_forms(paths: dict[str, str], feed_of, threads: int, batch: int, repeats: int) -> dict[str, dict[str, float]]:
    from thrifty.compress.quant.onnx_export import ort_session

    sessions = {name: ort_session(path, threads, spinning=False) for name, path in paths.items()}
    feeds = {k: feed_of(s, batch) for k, s in sessions.items()}
    for k, s in sessions.items():
        for _ in range(3):
            s.run(None, feeds[k])
    order, times = list(sessions), {k: [] for k in sessions}
    for r in range(repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t = time.perf_counter()
            sessions[k].run(None, feeds[k])
            times[k].append(time.perf_counter() - t)
    base_med, base_min = float(np.median(times["float"])), float(np.min(times["float"]))
    return {
        k: {
            "median_ms": 1000 * float(np.median(v)),
            "min_ms": 1000 * float(np.min(v)),
            "median_ratio": float(np.median(v)) / base_med,
            "min_ratio": float(np.min(v)) / base_min,
        }
        for k, v in times.items()
    }


def markdown(result: dict[str, Any]) -> str:
    """The docs table of one case: accuracy, bytes, min / median latency ratios to float, float kernels left."""
    settings = list(result["latency"])
    head = "| form | onnxruntime acc | PyTorch acc | MB | " + " | ".join(
        s.replace("threads", "t").replace("_batch", " b") + " min / med" for s in settings
    )
    lines = [head + " | float MatMul / Conv left | integer kernels |", "|---" * (len(settings) + 6) + "|"]
    for name, row in result["forms"].items():
        if "onnx_accuracy" not in row:
            continue
        lat = [result["latency"][s].get(name) for s in settings]
        cells = [f"{v['min_ratio']:.2f} / {v['median_ratio']:.2f}" if v else "-" for v in lat]
        ops = row["optimized_ops"]
        ints = {k: v for k, v in ops.items() if k in INTEGER_OPS}
        torch_acc = f"{100 * row['pytorch_accuracy']:.1f}" if "pytorch_accuracy" in row else "-"
        lines.append(
            f"| {name} | {100 * row['onnx_accuracy']:.1f} | {torch_acc} | {row['bytes'] / 1e6:.1f} | "
            + " | ".join(cells)
            + f" | {row['float_matmuls']} / {row['float_convs']} | "
            + ", ".join(f"{k} {v}" for k, v in ints.items())
            + " |"
        )
    return "\n".join(lines)


INTEGER_OPS = (
    "MatMulIntegerToFloat",
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "QGemm",
    "ConvInteger",
    "QLinearConv",
    "MatMulNBits",
    "QAttention",
    "DynamicQuantizeLSTM",
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", required=True, help="key of this case in the JSON (text, image)")
    p.add_argument("--backbone", required=True)
    p.add_argument("--max-length", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--data", required=True)
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--adapter", help="the `thrifty train` output directory (none: untrained head, smoke runs)")
    p.add_argument("--forms", default=",".join(THRIFTY_FORMS), help="thrifty forms to build")
    p.add_argument("--log2-ablation", action="store_true", help="also PTQ W8A8 with the log2 softmax quantizer")
    p.add_argument("--sim-eval", default="thrifty-ptq-w8a8", help="forms also evaluated in the PyTorch simulation")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument(
        "--conv-output-quant",
        action="store_true",
        help="thrifty's 8-bit-activation forms with PTQConfig(conv_output_quant=True) (QLinearConv / QLinearAdd)",
    )
    p.add_argument(
        "--ort-int4", action="store_true", help="also onnxruntime's weight-only int4 quantizer (MatMulNBits)"
    )
    p.add_argument(
        "--ort-sweep", action="store_true", help="also ORT quantize_static's best setting of ORT_SWEEP (chosen on val)"
    )
    p.add_argument("--note", default="", help="a note stored with the case (e.g. the machine's load)")
    p.add_argument("--build-only", action="store_true", help="stop after building the thrifty forms (parallel runs)")
    p.add_argument("--workdir", required=True)
    p.add_argument("--output", required=True, help="JSON (cases are merged into an existing file)")
    args = p.parse_args(argv)

    from thrifty.backbones import load_backbone
    from thrifty.cli.compress import calibration_loader, default_evaluate, default_model
    from thrifty.compress import compress_, make_compressor_config
    from thrifty.compress.calibration import batch_inputs
    from thrifty.compress.quant.onnx_export import evaluate_onnx, export_onnx, finalize_onnx_, ort_feed
    from thrifty.data import load_data
    from thrifty.metrics import environment

    os.makedirs(args.workdir, exist_ok=True)
    torch.set_num_threads(2)
    kwargs = {k: v for k, v in (("max_length", args.max_length), ("image_size", args.image_size)) if v}
    bb = load_backbone(args.backbone, **kwargs)
    task = load_data(args.data, bb.preprocess, seed=0, test_size=args.test_size)
    model = default_model(bb, task, args.adapter).eval()
    calib = list(calibration_loader(task, 512, 32, 0))  # the CLI's calibration draw
    example = batch_inputs(calib[0])
    test = task.split("test")
    state_path = os.path.join(args.workdir, "forms.json")  # resumable: finished forms are kept
    rows: dict[str, dict[str, Any]] = read_json(state_path) if os.path.exists(state_path) else {}
    paths = {"float": os.path.join(args.workdir, "float.onnx")}
    if "float" not in rows:
        # folded weights, the exporter's names, float32 storage: what onnxruntime's quantizers expect
        export_onnx(model, paths["float"], example, optimize=True, compact=False)
        rows["float"] = {"pytorch_accuracy": default_evaluate(model, task)["accuracy"]}
        write_json(state_path, rows)
    log(f"float: {rows['float']}")
    forms = {k: THRIFTY_FORMS[k] for k in args.forms.split(",") if k}
    if args.log2_ablation:
        forms["thrifty-ptq-w8a8-log2"] = ("ptq", "w8a8")
    for name, (method, bits) in forms.items():
        if os.path.exists(state_path):  # another process may have built forms in the same workdir
            rows.update({k: v for k, v in read_json(state_path).items() if k not in rows})
        if name in rows:
            paths[name] = os.path.join(args.workdir, f"{name}.onnx")
            continue
        t0 = time.perf_counter()
        m = copy.deepcopy(model)
        softmax = "log2" if name.endswith("-log2") else "uniform"
        options = {"bits": bits, "softmax_quantizer": softmax}
        if args.conv_output_quant and bits.endswith("a8"):
            options["conv_output_quant"] = True
        compress_(m, make_compressor_config(method, options), calib)
        rows[name] = {"quantize_s": time.perf_counter() - t0}
        if name in args.sim_eval.split(","):  # the PyTorch simulation's accuracy (onnxruntime's is measured below)
            rows[name]["pytorch_accuracy"] = default_evaluate(m, task)["accuracy"]
        paths[name] = export_onnx(m, os.path.join(args.workdir, f"{name}.onnx"), example)
        if os.path.exists(state_path):
            rows.update({k: v for k, v in read_json(state_path).items() if k not in rows})
        write_json(state_path, rows)
        log(f"{name}: {rows[name]}")
    if args.build_only:
        return
    names = [i.name for i in __import__("onnxruntime").InferenceSession(paths["float"]).get_inputs()]
    paths.update(ort_quantizers(paths["float"], args.workdir, calib, names))
    if args.ort_int4:
        paths.update(ort_int4(paths["float"], args.workdir))
    sweep: dict[str, Any] = {}
    if args.ort_sweep:
        pre = os.path.join(args.workdir, "float-pre.onnx")
        best, paths["ort-static-best"] = ort_static_sweep(
            pre if os.path.exists(pre) else paths["float"], args.workdir, calib, names, validation_split(task), sweep
        )
        sweep = {"chosen_on": "validation", "best": best, "settings": sweep}
    for name, path in paths.items():  # every file without the torch exporter's per-node metadata (fair bytes);
        if not name.startswith("thrifty-"):  # thrifty's own files are already compact; the others stay as made
            finalize_onnx_(path, int4=False, compact=False)
    for name, path in paths.items():
        row = rows.setdefault(name, {})
        row["onnx_accuracy"] = evaluate_onnx(path, test, 64, threads=2)["accuracy"]
        row["bytes"] = os.path.getsize(path)
        row["optimized_ops"] = optimized_op_counts(path, os.path.join(args.workdir, f"{name}.optimized.onnx"))
        ops = row["optimized_ops"]
        row["float_matmuls"] = sum(ops.get(k, 0) for k in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"))
        row["float_convs"] = sum(ops.get(k, 0) for k in ("Conv", "FusedConv"))
        log(f"{name}: onnx acc {row['onnx_accuracy']:.4f}, {row['bytes']:,} bytes, ops {ops}")
    test_batches = {}

    def feed_of(sess, batch):
        if batch not in test_batches:
            test_batches[batch] = batch_inputs(next(iter(torch.utils.data.DataLoader(test, batch_size=batch))))
        return ort_feed(test_batches[batch], [i.name for i in sess.get_inputs()])

    latency = {}
    timed = {k: v for k, v in paths.items() if not k.endswith("-log2")}
    for threads in (1, 2):
        for batch in (1, 16):
            key = f"threads{threads}_batch{batch}"
            latency[key] = time_forms(timed, feed_of, threads, batch, args.repeats)
            log(f"{key}: " + ", ".join(f"{k} {v['min_ratio']:.3f}" for k, v in latency[key].items()))
    result = {
        "case": args.case,
        "backbone": args.backbone,
        "backbone_kwargs": kwargs,
        "data": task.name,
        "test_samples": len(test),
        "adapter": args.adapter,
        "calibration": "CLI: 512 seeded training samples (seed 0), batch 32",
        "forms": rows,
        "latency": latency,
        "latency_protocol": f"{args.repeats} rounds, rotating order, allow_spinning 0, inter_op 1; shared machine",
        "env": environment(),
    }
    if args.conv_output_quant:
        result["thrifty_conv_form"] = "conv_output_quant=True: QDQ convs with quantized outputs (QLinearConv)"
    if sweep:
        result["ort_static_sweep"] = sweep
    if args.note:
        result["note"] = args.note
    out = read_json(args.output) if os.path.exists(args.output) else {}
    out[args.case] = result
    write_json(args.output, out)
    log(f"wrote {args.output} [{args.case}]")
    print(markdown(result))


if __name__ == "__main__":
    main()
