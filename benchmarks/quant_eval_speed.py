"""Speed of the simulated quantized forward (`thrifty eval --quantized`) against the float model, in one process.

Loads a folder written by `thrifty quantize` and the float model it came from (an adapter folder, or the backbone
with a seeded untrained head), then times one fixed test batch through three models in a rotating order:
`float`, `quant` (the eager fast path) and `quant_reference` (the same quantized model through the reference ops
the exporter sees: custom ops, no cached dequantization, no shared q/k/v input). It reports the minimum and
median of wall time and of process CPU time (user + sys, which includes OpenMP spinning) per batch, their ratios
to `float`, and whether the fast path's logits equal the reference's bit for bit. The minimum is the robust
statistic on a shared machine: every model does fixed work, so noise only adds time.

    PYTHONPATH=src python benchmarks/quant_eval_speed.py --quantized runs/q --adapter runs/full-reviews \
        --backbone minilm --max-length 64 --data reviews:1k --threads 2 --repeats 6 \
        --output benchmarks/results/quant_eval_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import torch


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@contextlib.contextmanager
def reference_ops():
    """The quantized model through the reference ops (what `quantizers.eager` = False selects everywhere)."""
    from thrifty.compress.quant import layers, quantizers

    saved = quantizers.eager, layers.eager
    quantizers.eager = layers.eager = lambda x: False
    try:
        yield
    finally:
        quantizers.eager, layers.eager = saved


def main() -> None:
    from torch.utils.data import DataLoader

    from thrifty.backbones import BackboneSpec, load_backbone
    from thrifty.cli.compress import default_model
    from thrifty.compress import load_quantized
    from thrifty.data import load_data
    from thrifty.io import write_json
    from thrifty.metrics import environment

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quantized", required=True)
    p.add_argument("--adapter", help="the float model's adapter folder (default: the backbone, untrained head)")
    p.add_argument("--backbone", required=True)
    p.add_argument("--max-length", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--output")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    qmodel, info = load_quantized(args.quantized)
    task = load_data(args.data, qmodel.backbone.preprocess, seed=0, test_size=args.batch_size)
    spec = BackboneSpec(args.backbone, image_size=args.image_size, max_length=args.max_length)
    fmodel = default_model(load_backbone(spec), task, args.adapter).eval()
    x, _ = next(iter(DataLoader(task.split("test"), batch_size=args.batch_size)))
    runs = {
        "float": (fmodel, contextlib.nullcontext),
        "quant": (qmodel, contextlib.nullcontext),
        "quant_reference": (qmodel, reference_ops),
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    logits = {}
    names = list(runs)
    with torch.no_grad():
        for name, (model, ctx) in runs.items():  # warm-up, and the logits to compare
            with ctx():
                logits[name] = model(x)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotating order
                model, ctx = runs[name]
                with ctx():
                    t, c = time.perf_counter(), cpu_seconds()
                    model(x)
                    wall[name].append(time.perf_counter() - t)
                    cpu[name].append(cpu_seconds() - c)
    identical = torch.equal(logits["quant"], logits["quant_reference"])
    rows = []
    for name in names:
        row = {
            "model": name,
            "wall_min_s": min(wall[name]),
            "wall_median_s": statistics.median(wall[name]),
            "cpu_min_s": min(cpu[name]),
            "cpu_median_s": statistics.median(cpu[name]),
        }
        row["wall_min_vs_float"] = row["wall_min_s"] / min(wall["float"])
        row["cpu_min_vs_float"] = row["cpu_min_s"] / min(cpu["float"])
        rows.append(row)
    print(f"batch {args.batch_size}, {args.threads} threads, {args.repeats} repeats; shared machine: compare minima")
    print("| model | wall min s | wall median s | CPU min s | CPU median s | wall min / float | CPU min / float |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['wall_min_s']:.3f} | {r['wall_median_s']:.3f} | {r['cpu_min_s']:.3f} | "
            f"{r['cpu_median_s']:.3f} | {r['wall_min_vs_float']:.2f} | {r['cpu_min_vs_float']:.2f} |"
        )
    print(f"fast path logits == reference ops' logits, bit for bit: {identical}")
    if args.output:
        out = {
            "quantized": args.quantized,
            "method": info["quant_config"]["method"],
            "batch_size": args.batch_size,
            "threads": args.threads,
            "repeats": args.repeats,
            "rows": rows,
            "bit_identical": identical,
            "env": environment(torch.device("cpu")),
        }
        write_json(args.output, out)


if __name__ == "__main__":
    main()
