"""The PyTorch serving path on MiniLM-reviews (issue 21, item 3): accuracy, state bytes and CPU latency, one run.

Model: `minilm` fully fine-tuned on `reviews:1k` (the recipe of benchmarks/ptq_compensation.py; reused from
`--workdir`, e.g. the one benchmarks/qwt_v2_ablation.py trained). QwT-v2 with the library's PTQ defaults and
`--calib-samples` (256, the docs' benchmark; the CLI default is 512) from the training split, with
float attention (`qkv_quant=False, softmax_quant=False`: the serving path has no kernel for the attention
quantizers, so the simulation that is compared runs without them too). Rows:

- float32; the thrifty simulation (QwT-v2, W8A8 and W4A8);
- `to_torchao_` forms of QwT-v2: int8_static (thrifty's activation scales, torchao Int8Tensor), int8_dynamic
  (torchao, per-token), int8_dynamic_torch (torch.ao fbgemm; not torchao), int4_weight_only (W4A8 model's 4-bit
  codes on torch's CPU int4 kernel; the fallback, see torchao_serving.py).

Accuracy on the 1000-sample test split of the docs; state bytes by `serving_bytes`; latency: batch 1 and 16,
`--threads` threads, all rows interleaved (rotated order) over `--repeats` rounds, min and median. Timings come
from a 2-core box shared with other jobs: ratios within this run, not claims.

    PYTHONPATH=src python benchmarks/torch_serving.py --workdir /tmp/qwt2/work \
        --output benchmarks/results/torch_serving.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics as st
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from thrifty.backbones import load_backbone
from thrifty.cli.common import print_table
from thrifty.compress import PTQConfig, QwTV2Config, quantize_
from thrifty.compress.quant.torchao_serving import TorchaoServingConfig, serving_bytes, to_torchao_
from thrifty.data import load_data
from thrifty.io import write_json
from thrifty.metrics import environment
from thrifty.train import evaluate
from thrifty.tuners import load_tuned_model


FLOAT_ATTN = {"qkv_quant": False, "softmax_quant": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True)
    p.add_argument("--workdir", required=True, help="holds minilm/ (the fine-tuned model)")
    p.add_argument("--test-size", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calib-samples", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bb = load_backbone("minilm", max_length=48)
    task = load_data("reviews:1k", bb.preprocess, seed=0, test_size=args.test_size)
    model = load_tuned_model(bb, os.path.join(args.workdir, "minilm")).eval()
    for q in model.parameters():
        q.requires_grad_(False)
    calib = DataLoader(task.split("train"), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    models: dict[str, Any] = {"float32": model}
    for bits in ((8, 8), (4, 8)):
        base = PTQConfig(w_bits=bits[0], a_bits=bits[1], **FLOAT_ATTN)
        tag = f"w{bits[0]}a{bits[1]}"
        m = copy.deepcopy(model)
        quantize_(m, QwTV2Config(base_config=base, calib_samples=args.calib_samples), calib_data=calib)
        models[f"qwt_v2 {tag} (simulation)"] = m
    v2_8, v2_4 = models["qwt_v2 w8a8 (simulation)"], models["qwt_v2 w4a8 (simulation)"]
    for mode in ("int8_static", "int8_dynamic", "int8_dynamic_torch"):
        m = copy.deepcopy(v2_8)
        to_torchao_(m, TorchaoServingConfig(mode=mode))
        models[f"qwt_v2 w8a8 -> {mode}"] = m
    m = copy.deepcopy(v2_4)
    to_torchao_(m, TorchaoServingConfig(mode="int4_weight_only", group_size=128))
    models["qwt_v2 w4a8 -> int4_weight_only"] = m
    rows: dict[str, dict[str, Any]] = {}
    test = task.split("test")
    for k, m in models.items():
        rows[k] = {"accuracy": evaluate(m, test, 64)["accuracy"], "state_bytes": serving_bytes(m)}
        print(f"{k}: acc {rows[k]['accuracy']:.4f}, {rows[k]['state_bytes'] / 2**20:.1f} MiB", flush=True)
    for batch in (1, 16):
        x = test.get_batch(range(batch))[0]
        order = list(models)
        times: dict[str, list[float]] = {k: [] for k in order}
        with torch.no_grad():
            for k in order:
                models[k](x)
            for r in range(args.repeats):
                for k in order[r % len(order) :] + order[: r % len(order)]:
                    t = time.perf_counter()
                    models[k](x)
                    times[k].append(time.perf_counter() - t)
        ref = st.median(times["float32"])
        for k in order:
            rows[k][f"b{batch}_ms_min"] = 1000 * min(times[k])
            rows[k][f"b{batch}_ms_median"] = 1000 * st.median(times[k])
            rows[k][f"b{batch}_ratio_median"] = st.median(times[k]) / ref
        print(f"latency batch {batch} done", flush=True)
    results = {
        "args": vars(args),
        "env": environment(torch.device("cpu")),
        "note": "2-core box shared with other jobs: latency ratios within this run, not claims",
        "rows": rows,
    }
    write_json(args.output, results)
    table = [{"model": k, **v} for k, v in rows.items()]
    cols = [("model", "model"), ("accuracy", "test acc"), ("state_bytes", "state bytes")]
    for b in (1, 16):
        cols += [(f"b{b}_ms_median", f"b{b} ms (median)"), (f"b{b}_ms_min", f"b{b} ms (min)")]
        cols += [(f"b{b}_ratio_median", f"b{b} / float")]
    print_table(table, cols)


if __name__ == "__main__":
    main()
