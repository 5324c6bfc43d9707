"""KV-head compression on a real MHA model: all-MiniLM-L6-v2 (BERT, 12 heads x 6 layers, no RoPE), 12 -> 6 / 4 / 3
KV heads, `mean` vs `svd_w` vs `svd_a`.

Metric: mean cosine between the original and the compressed sentence embeddings (attention-mask-weighted mean of the
last layer, L2-normalised: the model's own pooling) on `--eval` reviews of the `reviews` test pool; calibration on
`--calib` reviews of the train pool (no overlap). BERT has no `num_key_value_heads`, so the shared heads are written
into every head slot (see thrifty.compress.kv_heads.fold): the numbers are those of a K-head model, the memory is not.
Accuracy after fine-tuning and healing needs thrifty's trainer and is not measured here.

    PYTHONPATH=src python benchmarks/kv_heads_minilm.py --output benchmarks/results/kv_heads_minilm.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from thrifty.backbones import load_backbone
from thrifty.cli.common import print_table
from thrifty.compress.kv_heads import KVHeadsConfig, compress_kv_heads_, find_attention_sites, kv_heads_report
from thrifty.compress.kv_heads.statistics import collect_statistics
from thrifty.data.packaged import reviews
from thrifty.io import read_json, write_json
from thrifty.metrics import environment


STRATEGIES = ("mean", "svd_w", "svd_a")


def embed(bb, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([torch.nn.functional.normalize(bb.forward_features(x), dim=-1) for x in batches])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/results/kv_heads_minilm.json")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--eval", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    results = read_json(out) if out.is_file() else {"rows": {}}
    results.update(
        benchmark="kv_heads on all-MiniLM-L6-v2 (12-head MHA), sentence-embedding cosine to the original",
        note="timings from a 2-core box shared with other jobs: not claims",
        env=environment("cpu"),
        protocol=vars(args),
    )
    bb = load_backbone("minilm", max_length=args.max_length)
    pools = reviews()
    calib = [bb.preprocess(list(pools.train[0][i : i + 32])) for i in range(0, args.calib, 32)]
    evals = [bb.preprocess(list(pools.test[0][i : i + 32])) for i in range(0, args.eval, 32)]
    ref = embed(bb, evals)
    stats = collect_statistics(bb, find_attention_sites(bb), calib)
    desc = f"reviews train pool, first {args.calib} reviews, {args.max_length} tokens"
    for k in (6, 4, 3):
        for strategy in STRATEGIES:
            name = f"{k} heads, {strategy}"
            if name in results["rows"]:
                continue
            t = time.time()
            model = copy.deepcopy(bb)
            cfg = KVHeadsConfig(kv_heads=k, values=strategy, keys=strategy)
            compress_kv_heads_(model, cfg, statistics=stats, calib_description=desc)
            cos = (embed(model, evals) * ref).sum(-1)
            layers = kv_heads_report(model)["layers"]
            results["rows"][name] = {
                "kv_heads": k,
                "strategy": strategy,
                "mean_cosine": float(cos.mean()),
                "min_cosine": float(cos.min()),
                "k_rel_err": sum(e["k_rel_err"] for e in layers) / len(layers),
                "v_rel_err": sum(e["v_rel_err"] for e in layers) / len(layers),
                "seconds": round(time.time() - t, 1),
            }
            write_json(out, results)
            print(f"{name}: cosine {results['rows'][name]['mean_cosine']:.4f}")
    rows = [{"row": n, **r} for n, r in results["rows"].items()]
    print_table(
        rows,
        [
            ("row", "model"),
            ("mean_cosine", "mean cos"),
            ("min_cosine", "min cos"),
            ("k_rel_err", "K rel. err"),
            ("v_rel_err", "V rel. err"),
        ],
    )


if __name__ == "__main__":
    main()
