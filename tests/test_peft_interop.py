"""LoRA directories move both ways between thrifty and stock peft (thrifty.tuners.peft_format), on a non-default
config: several targets, only some layers, r/alpha off their defaults, trained (non-zero) B matrices."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file


peft = pytest.importorskip("peft")
timm = pytest.importorskip("timm")

from thrifty.backbones import load_backbone  # noqa: E402
from thrifty.errors import CheckpointError  # noqa: E402
from thrifty.tuners import TunedModel, get_tuned_model, load_tuned_model  # noqa: E402
from thrifty.tuners.lora import LoraConfig, LoraModel  # noqa: E402
from thrifty.tuners.peft_format import HEAD_WEIGHTS_NAME, THRIFTY_CONFIG_NAME, peft_selects  # noqa: E402


C = 5
VIT_RULES = {"target_modules": ["qkv", "fc1", "proj"], "layers_to_transform": [1, 3], "layers_pattern": "blocks"}
VIT_TARGETS = [f"blocks.{i}.{m}" for i in (1, 3) for m in ("attn.qkv", "attn.proj", "mlp.fc1")]
BERT_RULES = {
    "target_modules": ["query", "value", "intermediate.dense"],
    "layers_to_transform": [1],
    "layers_pattern": "layer",
}


def _vit():
    return load_backbone("timm:test_vit", pretrained=False, image_size=32)


def _timm_upstream():
    """The upstream model a peft user builds: same name and weights as `_vit()`, a Linear head for C classes."""
    model = timm.create_model("test_vit", pretrained=False, num_classes=C, img_size=32)
    result = model.load_state_dict(_vit().model.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    return model.eval()


def _bert_upstream(path):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, add_pooling_layer=False).eval()


def _train(params, seed=7):
    """Stand-in for training: every trainable tensor (LoRA A and B, head) moves away from its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _thrifty_lora(backbone, rules, r=4, alpha=12):
    model = get_tuned_model(backbone, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.1, **rules), C)
    _train([p for _, p in model.trainable_named_parameters()])
    b = [p for n, p in model.trainable_named_parameters() if "lora_B" in n]
    assert b and all(p.abs().sum() > 0 for p in b)
    return model.eval()


def _peft_load(upstream, directory):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(upstream, directory)
    # peft warns (UserWarning) on config keys its LoraConfig lacks and on missing or unexpected weights
    assert not [str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning))]
    return model.eval()


def _lora_names(peft_model):
    return sorted(n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))


def _bert_hidden(backbone, x):
    return backbone.forward_taps(x, [-1])[0]  # BERT is post-LN: the last block's output is the last hidden state


def _mean_pool(h, mask):
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


# --- thrifty -> peft -------------------------------------------------------------------------------------------------
def test_thrifty_timm_lora_loads_in_stock_peft_with_equal_logits(tmp_path):
    ours = _thrifty_lora(_vit(), VIT_RULES)
    assert sorted(ours.targeted_module_names) == sorted(VIT_TARGETS)
    ours.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", THRIFTY_CONFIG_NAME]
    ref = _peft_load(_timm_upstream(), str(tmp_path))
    assert _lora_names(ref) == sorted(VIT_TARGETS)
    x = ours.backbone.random_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=0, atol=1e-6)
    loaded = load_tuned_model(_vit(), str(tmp_path))  # and thrifty reads its own file back
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
    assert loaded.config.layers_to_transform == [1, 3] and loaded.config.lora_alpha == 12.0


def test_thrifty_files_match_what_peft_itself_saves(tmp_path):
    ours = _thrifty_lora(_vit(), VIT_RULES)
    ours.save_pretrained(str(tmp_path / "thrifty"))
    cfg = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.1, modules_to_save=["head"], **VIT_RULES)
    ref = peft.get_peft_model(_timm_upstream(), cfg)
    ref.save_pretrained(str(tmp_path / "peft"))
    a = load_file(str(tmp_path / "thrifty" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and "base_model.model.head.weight" in a
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    ours_cfg = json.loads((tmp_path / "thrifty" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours_cfg.keys() <= peft_cfg.keys()
    for key, value in ours_cfg.items():
        if key == "target_modules":
            assert sorted(value) == sorted(peft_cfg[key])
        else:
            assert value == peft_cfg[key], key
    side = json.loads((tmp_path / "thrifty" / THRIFTY_CONFIG_NAME).read_text())
    assert side["backbone"] == "timm:test_vit" and side["num_classes"] == C and side["method"] == "lora"


def test_rules_peft_reads_differently_are_written_as_module_names(tmp_path):
    bb = _vit()
    # thrifty applies layers_to_transform to a regex, peft refuses that; "all-linear" differs in peft too
    for i, rules in enumerate(
        [
            {"target_modules": r".*\.(qkv|fc2)", "layers_to_transform": [0, 2]},
            {"target_modules": "all-linear", "exclude_modules": ["fc2"], "layers_to_transform": [5]},
        ]
    ):
        ours = _thrifty_lora(_vit(), rules, r=2, alpha=3)
        ours.save_pretrained(str(tmp_path / str(i)))
        saved = json.loads((tmp_path / str(i) / "adapter_config.json").read_text())
        assert sorted(saved["target_modules"]) == sorted(ours.targeted_module_names)
        assert saved["layers_to_transform"] is None
        ref = _peft_load(_timm_upstream(), str(tmp_path / str(i)))
        assert _lora_names(ref) == sorted(ours.targeted_module_names)
        x = bb.random_inputs(2)
        with torch.no_grad():
            torch.testing.assert_close(ref(x), ours(x), rtol=0, atol=1e-6)


def test_thrifty_bert_lora_loads_in_stock_peft_with_equal_hidden_states(tmp_path, tiny_bert_dir):
    ours = _thrifty_lora(load_backbone(f"hf:{tiny_bert_dir}", max_length=16), BERT_RULES, r=2, alpha=5)
    assert sorted(ours.targeted_module_names) == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
        "encoder.layer.1.intermediate.dense",
    ]
    ours.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["adapter_config.json", "adapter_model.safetensors", HEAD_WEIGHTS_NAME, THRIFTY_CONFIG_NAME]
    )
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] is None
    ref = _peft_load(_bert_upstream(tiny_bert_dir), str(tmp_path))
    assert _lora_names(ref) == sorted(ours.targeted_module_names)
    x = ours.backbone.preprocess(["w1 w2 w3 good", "bad w9 the w4 w5 w6 w7", "the"])
    with torch.no_grad():
        hidden = ref(**x).last_hidden_state
        torch.testing.assert_close(hidden, _bert_hidden(ours.backbone, x), rtol=0, atol=1e-6)
        head = torch.nn.Linear(hidden.shape[-1], C)
        saved_head = load_file(str(tmp_path / HEAD_WEIGHTS_NAME))
        assert sorted(saved_head) == ["head.bias", "head.weight"]
        head.load_state_dict({k.removeprefix("head."): v for k, v in saved_head.items()})
        torch.testing.assert_close(head(_mean_pool(hidden, x["attention_mask"])), ours(x), rtol=0, atol=1e-6)
    loaded = load_tuned_model(load_backbone(f"hf:{tiny_bert_dir}", max_length=16), str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)
    cfg = peft.LoraConfig(r=2, lora_alpha=5, lora_dropout=0.1, **BERT_RULES)
    peft.get_peft_model(_bert_upstream(tiny_bert_dir), cfg).save_pretrained(str(tmp_path / "peft"))  # peft's own
    own = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert own.keys() == load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    own_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key, value in json.loads((tmp_path / "adapter_config.json").read_text()).items():
        if key == "target_modules":
            value, own_cfg[key] = sorted(value), sorted(own_cfg[key])
        assert value == own_cfg[key], key


# --- peft -> thrifty -------------------------------------------------------------------------------------------------
def _stock_peft_vit(directory, **options):
    bb = _vit()
    cfg = peft.LoraConfig(r=6, lora_alpha=9, modules_to_save=["head"], **{**VIT_RULES, **options})
    ref = peft.get_peft_model(_timm_upstream(), cfg)
    _train([p for _, p in ref.named_parameters() if p.requires_grad])
    ref.save_pretrained(str(directory))
    return bb, ref.eval()


def test_stock_peft_timm_lora_loads_in_thrifty_with_equal_logits(tmp_path):
    bb, ref = _stock_peft_vit(tmp_path / "peft")
    assert not os.path.exists(tmp_path / "peft" / THRIFTY_CONFIG_NAME)
    ours = load_tuned_model(bb, str(tmp_path / "peft"))
    assert isinstance(ours, LoraModel) and ours.num_classes == C
    assert sorted(ours.targeted_module_names) == sorted(VIT_TARGETS)
    assert (ours.config.r, ours.config.lora_alpha, ours.config.layers_to_transform) == (6, 9.0, [1, 3])
    x = bb.random_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    trainable = TunedModel.from_pretrained(_vit(), str(tmp_path / "peft"), is_trainable=True)
    assert trainable.num_trainable() == sum(p.numel() for p in ref.parameters() if p.requires_grad)
    # and back: thrifty re-saves it (trainable weights) in peft's layout, which peft loads to the same logits
    trainable.save_pretrained(str(tmp_path / "again"))
    again = _peft_load(_timm_upstream(), str(tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), ref(x), rtol=0, atol=1e-6)


def test_stock_peft_pickle_weights_load_too(tmp_path):
    bb = _vit()
    ref = peft.get_peft_model(_timm_upstream(), peft.LoraConfig(r=2, modules_to_save=["head"], **VIT_RULES))
    _train([p for _, p in ref.named_parameters() if p.requires_grad])
    ref.save_pretrained(str(tmp_path), safe_serialization=False)
    assert "adapter_model.bin" in os.listdir(tmp_path)
    x = bb.random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(load_tuned_model(bb, str(tmp_path))(x), ref.eval()(x), rtol=0, atol=1e-6)


def test_stock_peft_bert_lora_loads_in_thrifty_with_a_head_file(tmp_path, tiny_bert_dir):
    ref = peft.get_peft_model(_bert_upstream(tiny_bert_dir), peft.LoraConfig(r=3, lora_alpha=7, **BERT_RULES))
    _train([p for _, p in ref.named_parameters() if p.requires_grad])
    ref.save_pretrained(str(tmp_path))
    bb = load_backbone(f"hf:{tiny_bert_dir}", max_length=16)
    with pytest.raises(CheckpointError, match="holds no classification head"):
        load_tuned_model(bb, str(tmp_path))
    head = torch.nn.Linear(32, C)
    save_file({f"head.{k}": v for k, v in head.state_dict().items()}, str(tmp_path / HEAD_WEIGHTS_NAME))
    ours = load_tuned_model(bb, str(tmp_path))
    x = bb.preprocess(["w1 w2 w3 good", "bad w9 the w4 w5 w6 w7", "the"])
    with torch.no_grad():
        hidden = ref.eval()(**x).last_hidden_state
        torch.testing.assert_close(_bert_hidden(ours.backbone, x), hidden, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours(x), head(_mean_pool(hidden, x["attention_mask"])), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"use_rslora": True}, "use_rslora"),
        ({"rank_pattern": {"qkv": 2}}, "per-module ranks"),
        ({"init_lora_weights": "olora"}, "rewrites the base weights"),
    ],
)
def test_peft_options_thrifty_does_not_implement_are_refused(tmp_path, options, message):
    bb, _ = _stock_peft_vit(tmp_path, **options)
    with pytest.raises(CheckpointError, match=message):
        load_tuned_model(bb, str(tmp_path))


def test_other_peft_methods_and_foreign_heads_are_refused(tmp_path):
    bb = _vit()
    ia3 = peft.get_peft_model(_timm_upstream(), peft.IA3Config(target_modules=["qkv"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(CheckpointError, match="PEFT IA3 adapter"):
        load_tuned_model(bb, str(tmp_path / "ia3"))
    norm = peft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["fc_norm"])
    peft.get_peft_model(_timm_upstream(), norm).save_pretrained(str(tmp_path / "norm"))
    with pytest.raises(CheckpointError, match="not the classification head"):
        load_tuned_model(bb, str(tmp_path / "norm"))


def test_files_of_the_previous_thrifty_layout_still_load(tmp_path, monkeypatch):
    ours = _thrifty_lora(_vit(), VIT_RULES)
    monkeypatch.setattr(LoraModel, "peft_native", False)  # the writer before PEFT-native LoRA files
    ours.save_pretrained(str(tmp_path))
    monkeypatch.undo()
    legacy = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "peft_type" not in legacy and "head.weight" in load_file(str(tmp_path / "adapter_model.safetensors"))
    loaded = load_tuned_model(_vit(), str(tmp_path))
    x = ours.backbone.random_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ours(x), rtol=0, atol=0)


def test_cli_lora_run_directory_loads_in_stock_peft(tmp_path):
    from conftest import TINY_TRAIN
    from thrifty.cli.main import main

    out = str(tmp_path / "run")
    argv = [*TINY_TRAIN, "--method", "lora", "--set", "r=2", "--set", "target_modules=qkv,fc2", "--set", "alpha=6"]
    assert main([*argv, "--set", "layers_to_transform=0,4", "--epochs", "1", "--no-peak-memory", "--output", out]) == 0
    ours = load_tuned_model(_vit(), out)
    assert sorted(ours.targeted_module_names) == [f"blocks.{i}.{m}" for i in (0, 4) for m in ("attn.qkv", "mlp.fc2")]
    classes = ours.num_classes
    upstream = timm.create_model("test_vit", pretrained=False, num_classes=classes, img_size=32)
    upstream.load_state_dict(_vit().model.state_dict(), strict=False)
    ref = _peft_load(upstream.eval(), out)
    x = ours.backbone.random_inputs(3)
    with torch.no_grad():
        torch.testing.assert_close(ref(x), ours(x), rtol=0, atol=1e-6)
    assert any(p.abs().sum() > 0 for n, p in ours.named_parameters() if "lora_B" in n)  # it trained


def test_peft_selects_is_peft_own_matching():
    from peft.tuners.tuners_utils import check_target_module_exists

    names = [n for n, _ in _timm_upstream().named_modules() if n]
    cases = [
        dict(VIT_RULES),
        {"target_modules": ["qkv", "blocks.2.mlp.fc2"], "layers_to_transform": [0], "layers_pattern": "blocks"},
        {"target_modules": ["fc1", "fc2"], "exclude_modules": ["blocks.0.mlp.fc1"]},
        {"target_modules": r"blocks\.[12]\..*", "exclude_modules": r".*norm.*"},
        {"target_modules": ["proj", "head"], "modules_to_save": ["head"]},
    ]
    for rules in cases:
        cfg = peft.LoraConfig(**rules)
        expected = [n for n in names if check_target_module_exists(cfg, n)]  # an excluded module is falsy
        assert expected and peft_selects(names, **rules) == expected, rules
