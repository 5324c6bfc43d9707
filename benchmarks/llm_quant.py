"""SmolLM2-135M at int8 and int4 weights, with and without KV-head compression (issue 21, item 4).

Rows: {float32, int8 (torchao Int8Tensor, per-token dynamic int8 activations), int8t (torch's own dynamic int8
Linear, fbgemm; not torchao), int4g32 / int4g64 (W4A16, torch's CPU int4 kernel, the labelled fallback of
thrifty.compress.quant.torchao_serving)} x {3 KV heads (original), 1 KV head
(`svd_a`, complex RoPE keys, no healing: the best un-healed row of benchmarks/kv_heads.py)}. Weights are quantized
round-to-nearest (`quantize_float_linears_`: int8 per output channel, int4 asymmetric min/max per group of 32 or 64
inputs) in every decoder Linear (q, k, v, o, gate, up, down); the tied embedding / LM head stays float32 (quantizing
the head would untie it and add bytes). Note: the packaged checkpoint is a Q4_1 GGUF dequantized to float32: Q4_1
stores blocks of 32 inputs as min + scale * q with q in 0..15, the same parametrisation as int4g32, so int4g32
re-finds the stored 4-bit weights of the uncompressed model (about lossless by construction); int4g64 is the honest
4-bit rounding of them.

Per row: perplexity on the first `--eval-tokens` tokens of GPL-3 and of the reviews test pool (benchmarks/kv_heads.py's
protocol: the original model gives 19.30 / 58.18), the model's state bytes, the KV-cache bytes per token, and decode
speed: greedy decoding of `--decode-steps` tokens with the KV cache after a `--prompt-tokens` prompt, batch 1,
`--threads` threads, rows interleaved (rotated order) over `--repeats` rounds; min and median seconds per token and
tokens/s from the median. KV statistics come from benchmarks/kv_heads.py's cache (computed there when missing).
Timings come from a 2-core box shared with other jobs: relative numbers within one run, not claims.

    PYTHONPATH=src python benchmarks/llm_quant.py --output benchmarks/results/llm_quant.json
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics as st
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from kv_heads import GPL3, kv_bytes_per_token, perplexity, token_stream
from kv_heads import statistics as kv_statistics
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

from thrifty.backbones.hf_decoder import load_smollm2
from thrifty.cli.common import print_table
from thrifty.compress.kv_heads import KVHeadsConfig, compress_kv_heads_
from thrifty.compress.quant.torchao_serving import (
    Int4Linear,
    ServingLinear,
    TorchaoServingConfig,
    quantize_float_linears_,
    serving_bytes,
)
from thrifty.data.packaged import reviews
from thrifty.io import read_json, write_json
from thrifty.metrics import environment


KV = {"kv3": None, "kv1_svd_a": {"values": "svd_a", "keys": "svd_a", "rope_keys": "complex"}}
WEIGHTS = ["float32", "int8", "int8t", "int4g32", "int4g64"]  # int4g<N>: groups of N inputs


def build(base, weights: str, kv: str, stats, args) -> tuple[torch.nn.Module, dict[str, Any]]:
    model = copy.deepcopy(base).eval()
    info: dict[str, Any] = {}
    if KV[kv] is not None:
        compress_kv_heads_(model, KVHeadsConfig(kv_heads=1, **KV[kv]), statistics=stats)
    if weights != "float32":
        mode = {"int8": "int8_dynamic", "int8t": "int8_dynamic_torch"}.get(weights, "int4_weight_only")
        group = int(weights[len("int4g") :]) if weights.startswith("int4g") else 128
        cfg = TorchaoServingConfig(mode=mode, group_size=group)
        inner = lambda m, name: ".layers." in f".{name}"  # noqa: E731  decoder blocks only (not the tied head)
        info.update(quantize_float_linears_(model, cfg, filter_fn=inner))
        info["int4_linears"] = sum(isinstance(m, Int4Linear) for m in model.modules())
        info["int8_linears"] = sum(isinstance(m, ServingLinear) for m in model.modules())
        info["int8_torch_linears"] = sum(
            type(m).__name__ == "Linear" and hasattr(m, "_packed_params") for m in model.modules()
        )
    info["state_bytes"] = serving_bytes(model)
    kinds = (torch.nn.Linear, ServingLinear, Int4Linear, DynamicLinear)
    info["decoder_linear_bytes"] = sum(
        serving_bytes(m) for n, m in model.named_modules() if isinstance(m, kinds) and ".layers." in f".{n}"
    )
    info["kv_heads"] = model.config.num_key_value_heads
    info["kv_bytes_per_token_fp32"] = kv_bytes_per_token(model, 4)
    return model, info


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Seconds per generated token: greedy decoding of `steps` tokens after a prefill, KV cache on (prefill not
    timed)."""
    out = model(prompt[None], use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/results/llm_quant.json")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/thrifty/kv_heads_bench"))
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=",".join(f"{w}/{k}" for k in KV for w in WEIGHTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    results = read_json(out) if out.is_file() else {"rows": {}}
    results.update(
        benchmark="SmolLM2-135M-Instruct (packaged GGUF, float32) at int8 / int4 weights, 3 or 1 KV heads",
        note="timings from a 2-core box shared with other jobs (load average about 10 during the run): not claims",
        env=environment("cpu"),
        torchao=_torchao_version(),
        protocol={k: v for k, v in vars(args).items() if k not in ("output", "cache", "rows")},
    )
    bb = load_smollm2()
    base, tok = bb.model.eval(), bb.preprocess.tokenizer
    pools = reviews()
    train_texts, test_texts = list(pools.train[0]), list(pools.test[0])
    evals = {
        "gpl3": tok(Path(GPL3).read_text(), return_tensors="pt").input_ids[0, : args.eval_tokens],
        "reviews_test": token_stream(tok, test_texts, args.eval_tokens),
    }
    prompt = token_stream(tok, test_texts[500:], args.prompt_tokens)
    stats_args = SimpleNamespace(calib_seqs=64, calib_len=256)
    calib = token_stream(tok, train_texts, 64 * 256).view(64, 256)
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(8)]
    stats = None
    models: dict[str, torch.nn.Module] = {}
    for name in args.rows.split(","):
        weights, kv = name.split("/")
        if KV[kv] is not None and stats is None:
            stats = kv_statistics(base, batches, Path(args.cache), stats_args)  # (statistics, info)
        t = time.time()
        model, info = build(base, weights, kv, stats, args)
        row = results["rows"].get(name, {})
        row.update(info, weights=weights, kv=kv)
        if "ppl_gpl3" not in row:
            for key, ids in evals.items():
                row[f"ppl_{key}"] = perplexity(model, ids)
        row["build_and_eval_seconds"] = round(time.time() - t, 1)
        results["rows"][name] = row
        write_json(out, results)
        print(
            f"{name}: ppl GPL-3 {row['ppl_gpl3']:.2f}, reviews {row['ppl_reviews_test']:.2f}, "
            f"{row['state_bytes'] / 2**20:.1f} MiB",
            flush=True,
        )
        models[name] = model
    order = list(models)
    times: dict[str, list[float]] = {k: [] for k in order}
    for k in order:  # warm-up
        decode_seconds(models[k], prompt, 2)
    for r in range(args.repeats):
        for k in order[r % len(order) :] + order[: r % len(order)]:
            times[k].append(decode_seconds(models[k], prompt, args.decode_steps))
        print(f"decode round {r + 1}/{args.repeats}", flush=True)
    ref = st.median(times[order[0]])
    for k in order:
        row = results["rows"][k]
        row["decode_s_per_token_min"], row["decode_s_per_token_median"] = min(times[k]), st.median(times[k])
        row["decode_tokens_per_s_median"] = 1 / st.median(times[k])
        row["decode_tokens_per_s_best"] = 1 / min(times[k])
        row[f"decode_median_ratio_to_{order[0]}"] = st.median(times[k]) / ref
        row["decode_times"] = times[k]
    write_json(out, results)
    table = [{"row": k, **results["rows"][k]} for k in order]
    print()
    print_table(
        table,
        [
            ("row", "weights / KV"),
            ("ppl_gpl3", "ppl GPL-3"),
            ("ppl_reviews_test", "ppl reviews"),
            ("state_bytes", "state bytes"),
            ("decoder_linear_bytes", "decoder linear bytes"),
            ("kv_bytes_per_token_fp32", "KV bytes/token"),
            ("decode_tokens_per_s_median", "tok/s (median)"),
            ("decode_tokens_per_s_best", "tok/s (best)"),
            (f"decode_median_ratio_to_{order[0]}", "s/token vs first row"),
        ],
    )


def _torchao_version() -> str:
    try:
        import torchao

        return torchao.__version__
    except ImportError:
        return "not installed"


if __name__ == "__main__":
    main()
