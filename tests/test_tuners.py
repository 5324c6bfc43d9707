import copy
import os

import pytest
import torch

from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.errors import CheckpointError, ConfigError, NoMatchingModuleError
from thrifty.tuners import get_tuned_model, load_tuned_model, make_config
from thrifty.tuners.lora import LoraConfig, LoraLinear
from thrifty.tuners.targeting import find_targets


METHODS = [("linear", {}), ("full", {}), ("lora", {"r": "4"}), ("adaptformer", {"bottleneck": "4"})]


def _perturb(model):
    """Give zero-initialised adapter weights non-zero values so round trips are meaningful."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def vit_b():
    return load_backbone("timm:vit_base_patch16_224", pretrained=False)


def test_exact_parameter_counts_on_vit_b(vit_b):
    lora = get_tuned_model(copy.deepcopy(vit_b), make_config("lora", {"r": "8"}), 100)
    assert lora.num_trainable(include_head=False) == 294_912  # 12 * (8*768 + 2304*8)
    assert lora.num_trainable() == 294_912 + 768 * 100 + 100
    af = get_tuned_model(copy.deepcopy(vit_b), make_config("adaptformer", {"bottleneck": "8"}), 100)
    assert af.num_trainable(include_head=False) == 156_768  # 12 * (768*8+8 + 8*768+768)
    assert get_tuned_model(copy.deepcopy(vit_b), make_config("linear"), 100).num_trainable(False) == 0


def test_lora_matches_peft(tiny_vit_factory):
    import peft  # a dev dependency, not an optional asset

    ours = get_tuned_model(tiny_vit_factory(0), LoraConfig(r=4, lora_alpha=8), 10)
    _perturb(ours)
    ref_model = copy.deepcopy(tiny_vit_factory(0).model)
    ref = peft.get_peft_model(ref_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]))
    sd = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
        for k, v in ours.adapter_state_dict().items()
        if k.startswith("base_model.model.")
    }
    missing = ref.load_state_dict(sd, strict=False)
    assert not missing.unexpected_keys
    assert ref.get_nb_trainable_parameters()[0] == ours.num_trainable(include_head=False)
    x = ours.backbone.random_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ours.features(x), ref(x), rtol=1e-5, atol=1e-6)


def test_targeting_rules(tiny_vit):
    m = tiny_vit.model
    assert len(find_targets(m, ["qkv"])) == 6
    assert find_targets(m, r"blocks\.[01]\.mlp\.fc\d") == [
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "blocks.1.mlp.fc1",
        "blocks.1.mlp.fc2",
    ]
    assert find_targets(m, ["qkv"], layers_to_transform=[0, 5]) == ["blocks.0.attn.qkv", "blocks.5.attn.qkv"]
    assert "blocks.0.attn.qkv" not in find_targets(m, "all-linear", exclude_modules=["qkv"])
    with pytest.raises(NoMatchingModuleError, match="not found"):
        find_targets(m, ["query"])


def test_config_validation_and_overrides():
    cfg = make_config("lora", {"r": "16", "alpha": "32", "target_modules": "qkv,proj"})
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules) == (16, 32.0, ["qkv", "proj"])
    with pytest.raises(ConfigError, match="positive integer"):
        make_config("lora", {"r": "0"})
    with pytest.raises(ConfigError, match="has no option `rank`"):
        make_config("lora", {"rank": "4"})
    with pytest.raises(ConfigError, match="unknown method"):
        make_config("prompt_tuning")


@pytest.mark.parametrize(("method", "options"), METHODS)
def test_save_load_roundtrip_identical(tmp_path, tiny_vit_factory, method, options):
    model = get_tuned_model(tiny_vit_factory(0), make_config(method, options), 7)
    _perturb(model)
    model.save_pretrained(str(tmp_path))
    extra = ["thrifty_config.json"] if method == "lora" else []  # lora: PEFT's config + thrifty's keys beside it
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", *extra]
    loaded = load_tuned_model(tiny_vit_factory(0), str(tmp_path))
    x = model.backbone.random_inputs(2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    wanted = set(model.adapter_state_dict())  # only trainable weights are stored
    if method == "lora":  # the head is PEFT's modules_to_save, under timm's own head name
        wanted = {k.replace("head.", "base_model.model.head.") if k.startswith("head.") else k for k in wanted}
    assert keys == wanted
    if method == "lora":
        assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in keys


def test_adapter_for_another_backbone_or_truncated_is_refused(tmp_path, tiny_vit_factory):
    model = get_tuned_model(tiny_vit_factory(0), make_config("lora", {"r": "2"}), 3)
    model.save_pretrained(str(tmp_path))
    other = load_backbone("timm:vit_tiny_patch16_224", pretrained=False)
    with pytest.raises(CheckpointError, match="trained on backbone"):
        load_tuned_model(other, str(tmp_path))
    with pytest.raises(CheckpointError, match="other weights"):
        load_tuned_model(tiny_vit_factory(1), str(tmp_path))
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="truncated"):
        load_tuned_model(tiny_vit_factory(0), str(tmp_path))


def test_injected_adapters_start_as_identity(tiny_vit_factory):
    base = tiny_vit_factory(0)
    x = base.random_inputs(2)
    with torch.no_grad():
        ref = base.forward_features(x)
        for method, options in METHODS[2:]:
            model = get_tuned_model(tiny_vit_factory(0), make_config(method, options), 5)
            torch.testing.assert_close(model.features(x), ref)


def test_merge_and_unload_equals_unmerged(tiny_vit_factory):
    model = get_tuned_model(tiny_vit_factory(0), LoraConfig(r=4, lora_alpha=16), 5)
    _perturb(model)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    x = model.backbone.random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model.eval()(x), rtol=1e-5, atol=1e-5)


def test_lora_and_adaptformer_on_bert(tiny_bert_dir):
    for method in ("lora", "adaptformer"):
        bb = load_backbone(f"hf:{tiny_bert_dir}", max_length=8)
        model = get_tuned_model(bb, make_config(method), 3)
        x = bb.preprocess(["good w1", "bad the w3 w4"])
        with torch.no_grad():
            ref = load_backbone(f"hf:{tiny_bert_dir}", max_length=8).forward_features(x)
            torch.testing.assert_close(model.features(x), ref)
        loss = model(x).logsumexp(-1).sum()
        loss.backward()
        trained = [n for n, p in model.trainable_named_parameters() if p.grad is not None]
        assert any("lora_A" in n or "adaptformer" in n for n in trained)
    assert len(model.adaptformer) == 2


def test_only_adapter_parameters_change_in_training(tiny_vit_factory):
    model = get_tuned_model(tiny_vit_factory(0), make_config("adaptformer", {"bottleneck": "4"}), 5)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = model.backbone.random_inputs(4)
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert model.adaptformer[0].up.weight.abs().sum() > 0


def test_conv_lora_matches_peft():
    import peft  # a dev dependency, not an optional asset

    from thrifty.tuners.lora import LoraConv2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1))
    ref = peft.get_peft_model(copy.deepcopy(net), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))
    ours = [LoraConv2d(copy.deepcopy(net[i]), 2, 4) for i in (0, 2)]
    with torch.no_grad():
        for layer, i in zip(ours, (0, 2)):
            layer.lora_B.weight.normal_()
            peft_layer = ref.base_model.model[i]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B.weight)
        x = torch.randn(2, 3, 9, 9)
        ours_out = ours[1](torch.relu(ours[0](x)))
        torch.testing.assert_close(ours_out, ref(x), rtol=1e-5, atol=1e-5)
        merged = ours[1].merged()(torch.relu(ours[0].merged()(x)))
        torch.testing.assert_close(merged, ours_out, rtol=1e-5, atol=1e-5)


def test_lora_and_adaptformer_on_efficientnet():
    require_asset("efficientnet-lite0")
    x = load_backbone("efficientnet-lite0", image_size=64).random_inputs(2)
    with torch.no_grad():
        ref = load_backbone("efficientnet-lite0", image_size=64).forward_features(x)
    for method in ("lora", "adaptformer"):
        model = get_tuned_model(load_backbone("efficientnet-lite0", image_size=64), make_config(method), 4)
        with torch.no_grad():
            torch.testing.assert_close(model.features(x), ref)  # zero-initialised up/B: starts as the backbone
        model(x).sum().backward()
        assert all(p.grad is not None for _, p in model.trainable_named_parameters())
    assert len(model.adaptformer) == 9  # the residual MBConv blocks


def test_full_fine_tuning_saves_batchnorm_statistics(tmp_path):
    require_asset("efficientnet-lite0")
    model = get_tuned_model(
        load_backbone("efficientnet-lite0", image_size=32), make_config("full", {"bn_stats": "update"}), 3
    )
    x = model.backbone.random_inputs(4)
    model.train()
    with torch.no_grad():
        model(x)  # a training-mode forward moves the BatchNorm running statistics
    model.save_pretrained(str(tmp_path))
    loaded = load_tuned_model(load_backbone("efficientnet-lite0", image_size=32), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_full_fine_tuning_freezes_batchnorm_statistics_by_default():
    require_asset("efficientnet-lite0")
    model = get_tuned_model(load_backbone("efficientnet-lite0", image_size=32), make_config("full"), 3)
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    x = model.backbone.random_inputs(4)
    model.train()
    assert bns and not any(m.training for m in bns)
    model(x).sum().backward()  # BatchNorm affine weights still train
    assert all(m.weight.grad is not None for m in bns)
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))
    with pytest.raises(ConfigError, match="bn_stats"):
        make_config("full", {"bn_stats": "sometimes"})
