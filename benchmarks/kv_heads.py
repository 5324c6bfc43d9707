"""KV-head compression on the real SmolLM2-135M-Instruct (packaged GGUF): 3 -> 1 KV heads per layer.

Rows: the original; `mean` (GQA mean pooling of K and V, the spec's naive merge: ppl ~8,904 on GPL-3); `svd_w`
(SVD of the weights; RoPE keys with the complex per-frequency fit or the unconstrained post_rope map); `svd_a`
(SVD on calibration activations) with each RoPE-key strategy (complex, post_rope, mean); two ablations that
compress values and keys with different strategies. Per row: perplexity on two held-out texts, mean K/V
reconstruction error on the calibration tokens, KV-cache bytes per token, the greedy answer to the spec's chat check.

Protocol: perplexity = exp(mean next-token loss) on the first `--eval-tokens` tokens (default 1,024, as the spec's
19.30) of /usr/share/common-licenses/GPL-3 and of the `reviews` test pool (reviews joined with blank lines).
Calibration: `--calib-seqs` sequences of `--calib-len` tokens from the `reviews` train pool (no overlap with either
evaluation text), one pass over the original model; every row reuses its statistics. Optional healing
(`--heal-steps N`): thrifty's own path, the one `thrifty compress --method kv_heads --heal-steps N` runs
(`heal_with_trainer`: the compressed backbone as a causal LM, thrifty's Trainer with the `causal_lm` objective on the
calibration sequences, LoRA r=8 on q/k/v/o, merged back), then perplexity and the chat check again.

Resumable: each finished row is written to the JSON at once, and a rerun skips rows already there (`--rerun` to redo
them). The statistics are cached under `--cache`. Timings come from a box shared with other jobs: not claims.

    PYTHONPATH=src python benchmarks/kv_heads.py --output benchmarks/results/kv_heads_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from thrifty.backbones.hf_decoder import load_smollm2
from thrifty.cli.common import print_table
from thrifty.compress.kv_heads import (
    KVHeadsConfig,
    compress_kv_heads_,
    find_attention_sites,
    kv_heads_report,
    save_compressed,
)
from thrifty.compress.kv_heads.registration import cli_model, heal_with_trainer
from thrifty.compress.kv_heads.statistics import KVStatistics, collect_statistics
from thrifty.data.packaged import reviews
from thrifty.io import load_tensors, read_json, save_tensors, write_json
from thrifty.metrics import environment


GPL3 = "/usr/share/common-licenses/GPL-3"
CHAT = "What is the capital of France?"
ROWS: dict[str, dict[str, str] | None] = {
    "original": None,
    "mean": {"values": "mean", "keys": "mean"},
    "svd_w (complex keys)": {"values": "svd_w", "keys": "svd_w", "rope_keys": "complex"},
    "svd_w (post_rope keys)": {"values": "svd_w", "keys": "svd_w", "rope_keys": "post_rope"},
    "svd_a (complex keys)": {"values": "svd_a", "keys": "svd_a", "rope_keys": "complex"},
    "svd_a (post_rope keys)": {"values": "svd_a", "keys": "svd_a", "rope_keys": "post_rope"},
    "svd_a (mean keys)": {"values": "svd_a", "keys": "svd_a", "rope_keys": "mean"},
    "mean values + svd_a complex keys": {"values": "mean", "keys": "svd_a", "rope_keys": "complex"},
}


def token_stream(tok: Any, texts: list[str], n_tokens: int) -> torch.Tensor:
    """The first `n_tokens` ids of `texts` joined by blank lines (tokenized in chunks until enough)."""
    ids: list[int] = []
    step = 64
    for start in range(0, len(texts), step):
        ids.extend(tok("\n\n".join(texts[start : start + step]) + "\n\n", add_special_tokens=False).input_ids)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise SystemExit(f"only {len(ids)} tokens of text, {n_tokens} asked for")
    return torch.tensor(ids[:n_tokens])


def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """exp(model(ids, labels=ids).loss) on one (1, T) sequence (the spec's protocol)."""
    with torch.no_grad():
        return float(torch.exp(model(ids[None], labels=ids[None]).loss))


def chat_answer(model: torch.nn.Module, tok: Any) -> str:
    ids = tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def kv_bytes_per_token(model: torch.nn.Module, bytes_per_value: int = 2) -> int:
    """K and V cache bytes per token over all layers (bf16/fp16 cache by default)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * bytes_per_value


def statistics(model, batches, cache: Path, args) -> tuple[KVStatistics, dict[str, Any]]:
    """One calibration pass over the original model (cached: keys, values and post-RoPE keys per layer)."""
    sites = find_attention_sites(model)
    key = f"smollm2_reviews_{args.calib_seqs}x{args.calib_len}"
    path = cache / f"{key}.safetensors"
    if path.is_file():
        tensors = load_tensors(path)
        info = read_json(cache / f"{key}.json")
        stats = KVStatistics(sites, post_rope=True)
        for i in range(len(sites)):
            for name, grams in (("k", stats.keys), ("v", stats.values), ("kr", stats.post_rope_keys)):
                grams[i].sum = tensors[f"{name}.{i}"]
                grams[i].count = info["tokens"]
        print(f"calibration statistics from {path}")
        return stats, info
    t0 = time.time()
    stats, info = collect_statistics(model, sites, batches, post_rope=True, progress=True)
    info["seconds"] = round(time.time() - t0, 1)
    tensors = {}
    for i in range(len(sites)):
        for name, gram in (("k", stats.keys[i]), ("v", stats.values[i]), ("kr", stats.post_rope_keys[i])):
            tensors[f"{name}.{i}"] = gram.sum
    save_tensors(path, tensors)
    write_json(cache / f"{key}.json", info)
    print(f"calibration: {info['tokens']} tokens in {info['seconds']} s")
    return stats, info


def heal(bb: Any, batches: list[dict[str, torch.Tensor]], args) -> dict[str, Any]:
    """Heal the compressed backbone `bb` in place through thrifty's own path, as `thrifty compress --method kv_heads
    --heal-steps N` does: the backbone as a causal LM (TunedModel, `causal_lm` objective), `heal_with_trainer`
    (thrifty's Trainer: AdamW, cosine schedule, grad clip 1, weight decay 1e-4; LoRA r=8, alpha 16 on q/k/v/o),
    merged back into plain Linears."""
    cfg = KVHeadsConfig(
        kv_heads=args.kv_heads,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        heal_batch_size=args.heal_batch_size,
        heal_r=8,
    )
    t = time.time()
    recipe = heal_with_trainer(cli_model(bb, None, None), batches, cfg)
    recipe.update(loop="thrifty Trainer, causal_lm objective (heal_with_trainer)", seconds=round(time.time() - t, 1))
    bb.model.eval()
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default="benchmarks/results/kv_heads_smollm2.json")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/thrifty/kv_heads_bench"))
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--heal-steps", type=int, default=0)
    ap.add_argument("--heal-lr", type=float, default=5e-4)
    ap.add_argument("--heal-batch-size", type=int, default=4)
    ap.add_argument("--heal-len", type=int, default=128, help="tokens per healing sequence (the calibration stream)")
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names")
    ap.add_argument("--rerun", action="store_true", help="recompute rows already in the JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    results = read_json(out) if out.is_file() else {"rows": {}}
    results.update(
        benchmark="kv_heads on SmolLM2-135M-Instruct (packaged GGUF, dequantized to float32)",
        note="timings from a 2-core box shared with other jobs: not claims",
        env=environment("cpu"),
        protocol={k: v for k, v in vars(args).items() if k not in ("output", "rerun", "rows", "cache")},
    )

    t0 = time.time()
    bb = load_smollm2()
    base, tok = bb.model, bb.preprocess.tokenizer
    print(f"loaded SmolLM2 in {time.time() - t0:.0f} s")
    pools = reviews()
    train_texts, test_texts = list(pools.train[0]), list(pools.test[0])
    calib = token_stream(tok, train_texts, args.calib_seqs * args.calib_len).view(args.calib_seqs, args.calib_len)
    batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in calib.split(8)]
    # healing: the calibration tokens cut into --heal-len sequences, as many as the steps read (one epoch); a heal
    # that reads more tokens than the calibration holds continues the same train-pool stream past it
    need = max(1, args.heal_steps * args.heal_batch_size) * args.heal_len
    stream = calib.reshape(-1) if need <= calib.numel() else token_stream(tok, train_texts, need)
    heal_seqs = stream[: need - need % args.heal_len].view(-1, args.heal_len)
    heal_batches = [{"input_ids": c, "attention_mask": torch.ones_like(c)} for c in heal_seqs.split(8)]
    evals = {
        "gpl3": tok(Path(GPL3).read_text(), return_tensors="pt").input_ids[0, : args.eval_tokens],
        "reviews_test": token_stream(tok, test_texts, args.eval_tokens),
    }
    desc = f"reviews train pool (CC0 clothing reviews), {args.calib_seqs} x {args.calib_len} tokens"
    results["calibration"] = {"description": desc}
    stats = None

    for name in args.rows.split(","):
        if name not in ROWS:
            raise SystemExit(f"unknown row {name!r}; rows: {', '.join(ROWS)}")
        spec = ROWS[name]
        done = results["rows"].get(name)
        if done and not args.rerun and (args.heal_steps == 0 or spec is None or healed_by_trainer(done)):
            print(f"skip {name} (done)")
            continue
        t = time.time()
        bbc = copy.deepcopy(bb)
        model = bbc.model
        row: dict[str, Any] = {"config": spec}
        if spec is not None:
            if stats is None:
                stats = statistics(base, batches, Path(args.cache), args)
                results["calibration"].update(stats[1])
            cfg = KVHeadsConfig(kv_heads=args.kv_heads, **spec)
            compress_kv_heads_(model, cfg, statistics=stats, calib_description=desc)
            layers = kv_heads_report(model)["layers"]
            row["k_rel_err"] = sum(e["k_rel_err"] for e in layers) / len(layers)
            row["v_rel_err"] = sum(e["v_rel_err"] for e in layers) / len(layers)
            row["k_err_space"] = layers[0]["k_err_space"]
            row["k_rel_err_per_layer"] = [round(e["k_rel_err"], 5) for e in layers]
            row["v_rel_err_per_layer"] = [round(e["v_rel_err"], 5) for e in layers]
        model.eval()
        row["kv_heads"] = model.config.num_key_value_heads
        row["kv_bytes_per_token_bf16"] = kv_bytes_per_token(model)
        for key, ids in evals.items():
            row[f"ppl_{key}"] = perplexity(model, ids)
        row["chat"] = chat_answer(model, tok)
        if name == "svd_a (complex keys)" and not done:
            row["reload_max_abs_logit_diff"] = reload_check(model, tok, evals["gpl3"][:256])
        row["seconds"] = round(time.time() - t, 1)
        if done and not args.rerun:  # a row measured before: keep it, add the healing
            row = {**done, **{k: v for k, v in row.items() if k.startswith("ppl_") or k == "chat"}}
            if "healed" in done:
                row["healed_standin_loop"] = done["healed"]
        if spec is not None and args.heal_steps > 0:
            healed = heal(bbc, heal_batches, args)
            for key, ids in evals.items():
                healed[f"ppl_{key}"] = perplexity(model, ids)
            healed["chat"] = chat_answer(model, tok)
            row["healed"] = healed
        results["rows"][name] = row
        write_json(out, results)
        print(f"{name}: ppl GPL-3 {row['ppl_gpl3']:.2f}, reviews {row['ppl_reviews_test']:.2f} ({row['seconds']} s)")
        del model, bbc

    table = []
    names = [n for n in ROWS if n in results["rows"]] + [n for n in results["rows"] if n not in ROWS]
    for name in names:
        row = results["rows"][name]
        healed = {f"healed_{k}": v for k, v in row.get("healed", {}).items()}
        table.append({"row": name, **row, **healed, "chat": repr(row["chat"])})
    cols = [
        ("row", "model"),
        ("kv_heads", "KV heads"),
        ("kv_bytes_per_token_bf16", "KV bytes/token (bf16)"),
        ("ppl_gpl3", "ppl GPL-3"),
        ("ppl_reviews_test", "ppl reviews test"),
        ("k_rel_err", "K rel. err"),
        ("v_rel_err", "V rel. err"),
    ]
    if any("healed" in r for r in results["rows"].values()):
        cols += [("healed_ppl_gpl3", "healed ppl GPL-3"), ("healed_ppl_reviews_test", "healed ppl reviews")]
    print()
    print_table(table, cols)
    print()
    print_table(table, [("row", "model"), ("chat", f"greedy answer to {CHAT!r}")])


def healed_by_trainer(row: dict[str, Any]) -> bool:
    return "thrifty Trainer" in row.get("healed", {}).get("loop", "")


def reload_check(model: torch.nn.Module, tok: Any, ids: torch.Tensor) -> float:
    """Save as a Hugging Face folder, reload with plain transformers, max |logit difference|."""
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        path = save_compressed(model, Path(tmp) / "smollm2-kv1", tokenizer=tok)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            a, b = model(ids[None]).logits, loaded(ids[None]).logits
    return float((a - b).abs().max())


if __name__ == "__main__":
    main()
