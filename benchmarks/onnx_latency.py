"""CPU latency of exported quantized models in onnxruntime, measured interleaved in one process.

Reads the `.onnx` files that `benchmarks/ptq_compensation.py --workdir DIR` leaves in `DIR/onnx_<model>/`
(ptq.onnx, qwt.onnx, qwt_v2.onnx, ...), times them on one fixed batch in a rotating order (no model always runs
first), and prints the median and the minimum per model and their ratios to `ptq.onnx`. The minimum is the
robust statistic on a shared machine: every model does fixed work, so noise only adds time. Also counts the
graph's operators, to show that folded QwT-v2 has exactly plain PTQ's graph.

    PYTHONPATH=src python benchmarks/onnx_latency.py --dir /tmp/ptq-work/onnx_image --batch 16 --repeats 60 \
        --output benchmarks/results/onnx_latency_image.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import time

import numpy as np

from thrifty.io import write_json


def make_feed(sess, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for every graph input; symbolic dimensions get `batch` (first) or 64 (tokens)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else (batch if i == 0 else 64) for i, d in enumerate(inp.shape)]
        if "int64" in inp.type:
            feed[inp.name] = (
                np.ones(shape, np.int64) if "mask" in inp.name else rng.integers(100, 2000, shape, dtype=np.int64)
            )
        else:
            feed[inp.name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def op_counts(path: str) -> dict[str, int]:
    import onnx

    return dict(sorted(collections.Counter(n.op_type for n in onnx.load(path).graph.node).items()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="folder with ptq.onnx, qwt.onnx, qwt_v2.onnx, ...")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--output", help="JSON results file")
    args = p.parse_args(argv)
    import onnxruntime as ort

    paths = {os.path.basename(f)[: -len(".onnx")]: f for f in sorted(glob.glob(os.path.join(args.dir, "*.onnx")))}
    if "ptq" not in paths:
        raise SystemExit(f"no ptq.onnx in {args.dir}: run benchmarks/ptq_compensation.py --workdir first")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
    sessions = {k: ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"]) for k, f in paths.items()}
    feed = make_feed(sessions["ptq"], args.batch)
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feed)
    order, times = list(sessions), {k: [] for k in sessions}
    for r in range(args.repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            t = time.perf_counter()
            sessions[k].run(None, feed)
            times[k].append(time.perf_counter() - t)
    ops = {k: op_counts(f) for k, f in paths.items()}
    rows = {}
    for k in sessions:
        med, low = float(np.median(times[k])), float(np.min(times[k]))
        rows[k] = {
            "median_ms": 1000 * med,
            "min_ms": 1000 * low,
            "median_ratio_to_ptq": med / float(np.median(times["ptq"])),
            "min_ratio_to_ptq": low / float(np.min(times["ptq"])),
            "nodes": sum(ops[k].values()),
            "same_ops_as_ptq": ops[k] == ops["ptq"],
            "file_bytes": os.path.getsize(paths[k]),
        }
    print(f"onnxruntime CPU, {args.threads} thread(s), batch {args.batch}, {args.repeats} interleaved repeats")
    print("| model | median ms | min ms | median / ptq | min / ptq | nodes | same ops as ptq | file bytes |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for k, r in rows.items():
        print(
            f"| {k} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['median_ratio_to_ptq']:.3f} | "
            f"{r['min_ratio_to_ptq']:.3f} | {r['nodes']} | {r['same_ops_as_ptq']} | {r['file_bytes']:,} |"
        )
    if args.output:
        load = os.getloadavg()
        write_json(args.output, {"args": vars(args), "loadavg": load, "models": rows, "ops": ops})


if __name__ == "__main__":
    main()
