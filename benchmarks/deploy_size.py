"""Where the bytes of deployed ONNX files go (issue 21): file size, initializer bytes by type, graph overhead
(nodes, value_info, metadata), and the kernels onnxruntime's optimized graph runs; optionally the test accuracy
from `thrifty eval --onnx ... --json` outputs and a latency check (interleaved, median / min).

    PYTHONPATH=src python benchmarks/deploy_size.py --file thrifty-ptq-w8a8=/tmp/i21size/ptq8b/model.onnx \
        --file ort-dynamic=/tmp/i21a/deploy_text2/ort-dynamic.onnx --eval thrifty-ptq-w8a8=/tmp/ptq8b.eval.json \
        --latency --output benchmarks/results/deploy_size.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper

from thrifty.io import write_json


KERNELS = ("MatMulIntegerToFloat", "MatMulNBits", "GatherBlockQuantized", "DynamicQuantizeMatMul", "MatMulInteger")


def breakdown(path: str) -> dict:
    m = onnx.load(path)
    g = m.graph
    by_type: dict[str, int] = collections.Counter()
    for t in g.initializer:
        by_type[onnx.TensorProto.DataType.Name(t.data_type)] += len(t.raw_data) or numpy_helper.to_array(t).nbytes
    return {
        "bytes": os.path.getsize(path),
        "initializer_data_bytes": dict(by_type),
        "initializers": len(g.initializer),
        "nodes": len(g.node),
        "node_bytes": sum(n.ByteSize() for n in g.node),
        "value_info_bytes": sum(v.ByteSize() for v in g.value_info),
        "metadata_bytes": sum(p.ByteSize() for p in g.metadata_props) + sum(p.ByteSize() for p in m.metadata_props),
    }


def optimized_ops(path: str) -> dict[str, int]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)
    return {k: ops[k] for k in (*KERNELS, "MatMul", "Gemm", "FusedMatMul", "Cast") if ops[k]}


def latency(paths: dict[str, str], batch: int, tokens: int, repeats: int, threads: int) -> dict[str, dict]:
    """Interleaved timing (rotating order) on one random token batch; seconds."""
    from thrifty.compress.quant.onnx_export import ort_session

    sessions = {name: ort_session(path, threads, spinning=False) for name, path in paths.items()}
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 20000, size=(batch, tokens)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for r in range(repeats + 1):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sess = sessions[name]
            f = {i.name: feed[i.name] for i in sess.get_inputs()}
            t = time.perf_counter()
            sess.run(None, f)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    return {n: {"median_s": float(np.median(v)), "min_s": float(np.min(v))} for n, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", action="append", required=True, help="name=path.onnx (repeatable)")
    ap.add_argument("--eval", action="append", default=[], help="name=eval.json from `thrifty eval --json`")
    ap.add_argument("--latency", action="store_true", help="also time the files (1 thread, batch 16, 64 tokens)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--note", default="", help="free text stored in the JSON")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    files = dict(f.split("=", 1) for f in args.file)
    evals = dict(e.split("=", 1) for e in args.eval)
    rows = {}
    for name, path in files.items():
        row = {"path": path, **breakdown(path), "optimized_kernels": optimized_ops(path)}
        if name in evals:
            with open(evals[name]) as fh:
                res = json.load(fh)
            row["test_accuracy"] = res.get("accuracy", res.get("metrics", {}).get("accuracy"))
        rows[name] = row
    if args.latency:
        for name, t in latency(files, 16, 64, args.repeats, 1).items():
            rows[name]["latency_t1_b16"] = t
    print(f"{'form':<28} {'bytes':>12} {'int data':>12} {'float32':>9} {'float16':>9} {'nodes':>6} {'acc':>6}")
    for name, r in rows.items():
        d = r["initializer_data_bytes"]
        ints = sum(v for k, v in d.items() if "INT" in k)
        acc = r.get("test_accuracy")
        print(
            f"{name:<28} {r['bytes']:>12,} {ints:>12,} {d.get('FLOAT', 0):>9,} {d.get('FLOAT16', 0):>9,} "
            f"{r['nodes']:>6} {'' if acc is None else f'{100 * acc:.1f}':>6}"
        )
    if args.output:
        write_json(args.output, {"note": args.note, "forms": rows})


if __name__ == "__main__":
    main()
