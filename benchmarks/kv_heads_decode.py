"""Decode speed on CPU: SmolLM2-135M-Instruct (3 KV heads) vs the same model compressed to 1 KV head (`svd_a`, complex
RoPE keys), greedy decoding with the KV cache, at 1k and 2k tokens of context, batch 1 and 8, in one run.

Protocol (per model and context length): one prefill of the first `ctx - 1` GPL-3 tokens at batch 1 fills a
transformers `DynamicCache`; every measurement starts from a fresh copy of that cache repeated to the batch size
(decoding does not depend on the cache's contents, and this avoids prefilling batch 8), feeds token `ctx` and decodes
`--new-tokens` tokens greedily (argmax of the last logits, fed back; the model's own forward with the cache,
`cache=` or `past_key_values=` before transformers 5.2x, use_cache=True, as `generate` does). Tokens/s = batch x
new tokens / wall time of the decode loop. Repetitions are interleaved: in every repetition each (context, batch)
setting runs both models back to back, alternating which goes first; the table gives the median and the
minimum-time (best) rate over repetitions.

KV-cache bytes per token are counted on the prefilled cache (float32 here) and given for bf16/fp16 as well.
The box is a 2-core CPU shared with other jobs: the load average before and after is recorded, and the numbers are
not claims, only the ratio measured in one interleaved run is meaningful.

    PYTHONPATH=src python benchmarks/kv_heads_decode.py --output benchmarks/results/kv_heads_decode.json
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import statistics as stats_lib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers of benchmarks/kv_heads.py

from kv_heads import GPL3, statistics

from thrifty.backbones.hf_decoder import load_smollm2
from thrifty.cli.common import print_table
from thrifty.compress.kv_heads import KVHeadsConfig, compress_kv_heads_
from thrifty.data.packaged import reviews
from thrifty.io import write_json
from thrifty.metrics import environment


def load_line() -> dict[str, Any]:
    """`uptime` and the 1/5/15-minute load averages (the box is shared)."""
    out = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"uptime": out, "loadavg": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%H:%M:%S")}


def cache_kwargs(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """The KV cache argument of the model's forward: `cache` (transformers >= 5.2x), `past_key_values` before."""
    return {"cache": cache} if "cache" in inspect.signature(model.forward).parameters else {"past_key_values": cache}


@torch.no_grad()
def prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """Run `ids` (T,) at batch 1 with the cache; returns the per-layer (keys, values) and the seconds it took."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t = time.perf_counter()
    model(input_ids=ids[None], use_cache=True, **cache_kwargs(model, cache))
    seconds = time.perf_counter() - t
    return [(layer.keys, layer.values) for layer in cache.layers], seconds


@torch.no_grad()
def decode(
    model: torch.nn.Module, kv: list[tuple[torch.Tensor, torch.Tensor]], last: int, batch: int, new_tokens: int
) -> tuple[float, list[int]]:
    """Greedy decoding of `new_tokens` tokens at `batch` from a copy of the prefilled cache; (seconds, row 0's ids)."""
    from transformers import DynamicCache

    cache = DynamicCache([(k.repeat(batch, 1, 1, 1), v.repeat(batch, 1, 1, 1)) for k, v in kv])
    tok = torch.full((batch, 1), last, dtype=torch.long)
    out = []
    t = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(input_ids=tok, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]
        tok = logits.argmax(-1, keepdim=True)
        out.append(int(tok[0, 0]))
    return time.perf_counter() - t, out


def cache_bytes_per_token(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Bytes of the prefilled (batch 1) cache per cached token, all layers, keys and values."""
    tokens = kv[0][0].shape[2]
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv) // tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/results/kv_heads_decode.json")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/thrifty/kv_heads_bench"))
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--contexts", default="1024,2048")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[str, Any] = {
        "benchmark": "greedy decode tokens/s (KV cache), SmolLM2-135M-Instruct 3 KV heads vs 1 (svd_a, complex)",
        "note": "2-core CPU shared with other jobs (see load); float32 weights and cache; not claims",
        "env": environment("cpu"),
        "protocol": vars(args),
        "load_before": load_line(),
    }
    print(f"load before: {results['load_before']['uptime']}")

    bb = load_smollm2()
    base, tok = bb.model.eval(), bb.preprocess.tokenizer
    calib = None
    cache_dir = Path(args.cache)
    if not (cache_dir / f"smollm2_reviews_{args.calib_seqs}x{args.calib_len}.safetensors").is_file():
        from kv_heads import token_stream

        stream = token_stream(tok, list(reviews().train[0]), args.calib_seqs * args.calib_len)
        calib = [
            {"input_ids": c, "attention_mask": torch.ones_like(c)} for c in stream.view(-1, args.calib_len).split(8)
        ]
    st = statistics(base, calib, cache_dir, args)
    compressed = copy.deepcopy(base)
    compress_kv_heads_(
        compressed, KVHeadsConfig(kv_heads=1, values="svd_a", keys="svd_a", rope_keys="complex"), statistics=st
    )
    compressed.eval()
    models = {"original (3 KV heads)": base, "svd_a complex (1 KV head)": compressed}

    ids = tok(Path(GPL3).read_text(), return_tensors="pt").input_ids[0]
    if len(ids) < max(contexts):
        raise SystemExit(f"GPL-3 has {len(ids)} tokens, fewer than the context {max(contexts)}")
    prefilled: dict[tuple[str, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    results["prefill"] = {}
    results["kv_cache"] = {}
    for ctx in contexts:
        for name, model in models.items():
            kv, seconds = prefill(model, ids[: ctx - 1])
            prefilled[name, ctx] = kv
            results["prefill"][f"{name} @ {ctx}"] = {"seconds_batch1": round(seconds, 2)}
            per_token = cache_bytes_per_token(kv)
            results["kv_cache"][name] = {
                "bytes_per_token_float32": per_token,
                "bytes_per_token_bf16": per_token // 2,
                "kv_heads": model.config.num_key_value_heads,
            }
            print(f"prefill {name} @ {ctx}: {seconds:.1f} s, cache {per_token} B/token (float32)", flush=True)

    settings = [(ctx, b) for ctx in contexts for b in batches]
    names = list(models)
    times: dict[tuple[str, int, int], list[float]] = {(n, c, b): [] for n in names for c, b in settings}
    texts: dict[tuple[str, int], str] = {}
    for name in names:  # warm-up: one short decode per model and setting
        for ctx, b in settings:
            decode(models[name], prefilled[name, ctx], int(ids[ctx - 1]), b, 2)
    for rep in range(args.reps):
        order = names if rep % 2 == 0 else names[::-1]
        for ctx, b in settings:
            for name in order:
                seconds, out = decode(models[name], prefilled[name, ctx], int(ids[ctx - 1]), b, args.new_tokens)
                times[name, ctx, b].append(seconds)
                texts[name, ctx] = tok.decode(out)
                rate = b * args.new_tokens / seconds
                print(f"rep {rep + 1}/{args.reps} ctx {ctx} batch {b} {name}: {rate:.1f} tok/s", flush=True)
    results["load_after"] = load_line()
    print(f"load after: {results['load_after']['uptime']}")

    rows = []
    for ctx, b in settings:
        per_model = {}
        for name in names:
            ts = times[name, ctx, b]
            n = b * args.new_tokens
            per_model[name] = {
                "tokens_per_s_median": n / stats_lib.median(ts),
                "tokens_per_s_best": n / min(ts),
                "ms_per_step_median": 1000 * stats_lib.median(ts) / args.new_tokens,
                "seconds": [round(t, 4) for t in ts],
            }
        o, c = (per_model[n] for n in names)
        speedup = {
            "median": c["tokens_per_s_median"] / o["tokens_per_s_median"],
            "best": c["tokens_per_s_best"] / o["tokens_per_s_best"],
            "per_rep": [a / z for a, z in zip(times[names[0], ctx, b], times[names[1], ctx, b])],
        }
        key = f"ctx {ctx}, batch {b}"
        results.setdefault("settings", {})[key] = {"context": ctx, "batch": b, "models": per_model, "speedup": speedup}
        for name in names:
            m = per_model[name]
            rows.append(
                {
                    "setting": key,
                    "model": name,
                    "median": m["tokens_per_s_median"],
                    "best": m["tokens_per_s_best"],
                    "ms": m["ms_per_step_median"],
                    "speedup": speedup["median"] if name == names[1] else 1.0,
                }
            )
    results["greedy_continuations"] = {f"{n} @ {c}": t for (n, c), t in texts.items()}
    write_json(Path(args.output), results)
    print()
    print_table(
        rows,
        [
            ("setting", "setting"),
            ("model", "model"),
            ("median", "tok/s (median)"),
            ("best", "tok/s (best)"),
            ("ms", "ms/step (median)"),
            ("speedup", "speed-up (median)"),
        ],
    )
    print_table(
        [{"model": n, **v} for n, v in results["kv_cache"].items()],
        [
            ("model", "model"),
            ("kv_heads", "KV heads"),
            ("bytes_per_token_float32", "B/token fp32"),
            ("bytes_per_token_bf16", "B/token bf16"),
        ],
    )


if __name__ == "__main__":
    main()
