"""The compressor registry and `thrifty compress`: registration rules, dispatch, option coercion, and the CLI giving
the same model as `thrifty quantize`; a new compressor's flags and CLI hooks work without editing the CLI."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from _compress_dummy import ScaleHeadConfig, register_dummy
from test_compress_contract import tiny_classifier, tiny_images
from thrifty.cli.main import main
from thrifty.compress import (
    PTQConfig,
    QwTConfig,
    available_compressors,
    compress_,
    get_compressor,
    load_compressed,
    load_quantized,
    make_compressor_config,
    make_quant_config,
    quantize_,
    register_compressor,
    unregister_compressor,
)
from thrifty.compress.quant import QuantLinear
from thrifty.errors import ConfigError
from thrifty.io import load_tensors, read_json


def _noop(*args, **kwargs):
    return None


@dataclass
class UnregisteredConfig:
    method: ClassVar[str] = "not_registered"
    step: str = "prepare"


# --- registry ---------------------------------------------------------------------------------------------------


def test_builtin_quantizers_are_registered_under_their_config_names():
    assert {"ptq", "qwt", "qwt_v2"} <= set(available_compressors())
    for name in ("ptq", "qwt", "qwt_v2"):
        entry = get_compressor(name)
        assert entry.config_cls.method == name and entry.manifest == "quantize_config.json"
        assert entry.cli_flags == ("bits",) and entry.export_onnx is not None
    with pytest.raises(ConfigError, match=r"unknown compressor 'nope'.*ptq \(PTQConfig\)"):
        get_compressor("nope")


def test_registry_refuses_duplicate_names_and_bad_registrations():
    @dataclass
    class Impostor:
        method: ClassVar[str] = "ptq"
        w_bits: int = 4

    with pytest.raises(ConfigError, match="'ptq' is already registered"):
        register_compressor(Impostor, apply=_noop, save=_noop, load=_noop)
    ptq = get_compressor("ptq")
    with pytest.raises(ConfigError, match="already registered"):
        register_compressor(PTQConfig, apply=_noop, save=ptq.save, load=ptq.load)
    same = {f.name: getattr(ptq, f.name) for f in dataclasses.fields(ptq) if f.name != "name"}
    assert register_compressor(**same) == ptq  # the same registration again is a no-op
    assert get_compressor("ptq") is ptq

    @dataclass
    class NoName:
        x: int = 1

    class NotADataclass:
        method = "plain"

    @dataclass
    class BadFlag:
        method: ClassVar[str] = "bad_flag"
        cli_flags: ClassVar[tuple[str, ...]] = ("rank",)
        ratio: float = 0.5

    for cls, message in ((NoName, "lower-case name"), (NotADataclass, "dataclass"), (BadFlag, "not options")):
        with pytest.raises(ConfigError, match=message):
            register_compressor(cls, apply=_noop, save=_noop, load=_noop)
    with pytest.raises(ConfigError, match="unknown field"):
        register_compressor(ScaleHeadConfig, apply=_noop, save=_noop, load=_noop, cli_modle=_noop)
    assert "bad_flag" not in available_compressors() and "scale_head" not in available_compressors()
    with pytest.raises(ConfigError, match="no compressor 'bad_flag'"):
        unregister_compressor("bad_flag")


def test_unknown_config_is_refused_with_the_registered_names():
    model = tiny_classifier()
    with pytest.raises(ConfigError, match=r"UnregisteredConfig.*ptq \(PTQConfig\), qwt \(QwTConfig\)"):
        compress_(model, UnregisteredConfig(), tiny_images())
    with pytest.raises(ConfigError, match="no compressor is registered for dict"):
        compress_(model, {"method": "ptq"})
    name = register_dummy()
    try:
        with pytest.raises(ConfigError, match="quantize_ takes a PTQConfig"):
            quantize_(model, ScaleHeadConfig())  # registered, but not a quantizer
    finally:
        unregister_compressor(name)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_compress_dispatches_like_quantize_and_passes_filter_fn():
    data = tiny_images()
    a, b = tiny_classifier(), tiny_classifier()
    cfg = QwTConfig(base_config=PTQConfig(w_bits=4, a_bits=8))

    def no_mlp(module, fqn):
        return ".mlp." not in fqn

    assert compress_(a, cfg, data, filter_fn=no_mlp) is None
    quantize_(b, cfg, data, filter_fn=no_mlp)
    x = tiny_images(1, 4, seed=1)[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    names = [n for n, m in a.named_modules() if isinstance(m, QuantLinear)]
    assert names and not any(".mlp." in n for n in names) and any(".attn." in n for n in names)


def test_make_compressor_config_coerces_and_rejects_bad_keys():
    cfg = make_compressor_config(
        "qwt", {"bits": "w4a6", "ridge": "0.01", "cache_hidden": "false", "edge_bits": "none", "percentiles": "0.99"}
    )
    assert cfg == make_quant_config("qwt", "w4a6", ridge=0.01, cache_hidden=False, edge_bits=None, percentiles=[0.99])
    assert make_compressor_config("ptq", {}) == PTQConfig()
    assert make_compressor_config("qwt_v2", {"calib-samples": "64", "fold": "no"}).calib_samples == 64
    for bad, message in (
        ({"nope": "1"}, "no option `nope`; options: .*bits.*ridge"),
        ({"w_bits": "4"}, "no option `w_bits`"),
        ({"step": "convert"}, "no option `step`"),
        ({"ridge": "x"}, "`ridge`"),
        ({"bits": "w5a8"}, "w5a8"),
        ({"cache_hidden": "maybe"}, "cache_hidden"),
    ):
        with pytest.raises(ConfigError, match=message):
            make_compressor_config("qwt", bad)
    name = register_dummy()
    try:  # a plain dataclass config: its fields are the options, less `step` / `version`
        assert set(get_compressor(name).options) == {"scale", "center"}
        assert make_compressor_config(name, {"scale": "0.25", "center": "off"}) == ScaleHeadConfig(0.25, False)
        with pytest.raises(ConfigError, match="`scale` must be positive"):
            make_compressor_config(name, {"scale": "-1"})
    finally:
        unregister_compressor(name)


# --- CLI --------------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA classifier for digits (10 classes) on the tiny random ViT, with non-zero LoRA weights so that merging
    it (as --adapter does) changes the model; saved as `thrifty train` saves adapters."""
    from thrifty.backbones import load_backbone
    from thrifty.tuners import get_tuned_model, make_config

    out = str(tmp_path_factory.mktemp("adapter") / "lora")
    bb = load_backbone("timm:test_vit", pretrained=False, image_size=32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_tuned_model(bb, make_config("lora", {"r": "4"}), 10)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def _common(adapter: str) -> list[str]:
    return [
        "--backbone",
        "timm:test_vit",
        "--random-init",
        "--image-size",
        "32",
        "--data",
        "digits:1k",
        "--test-size",
        "100",
        "--adapter",
        adapter,
        "--calib-samples",
        "16",
        "--batch-size",
        "8",
    ]


def test_compress_cli_gives_the_same_model_as_quantize(adapter, tmp_path, capsys):
    q, c = str(tmp_path / "q"), str(tmp_path / "c")
    flags = [*_common(adapter), "--method", "qwt_v2", "--bits", "w4a8", "--set", "eps=1e-7", "--eval"]
    code, _, err = run_cli(capsys, "quantize", *flags, "--output", q)
    assert code == 0, err
    code, _, err = run_cli(capsys, "compress", *flags, "--output", c)
    assert code == 0, err
    tq, tc = (
        load_tensors(os.path.join(q, "quantized_model.safetensors")),
        load_tensors(os.path.join(c, "quantized_model.safetensors")),
    )
    assert tq.keys() == tc.keys() and all(torch.equal(tq[k], tc[k]) for k in tq)
    assert not any("lora_" in k for k in tq)  # the LoRA adapter was merged before quantizing
    assert read_json(os.path.join(q, "quantize_config.json")) == read_json(os.path.join(c, "quantize_config.json"))
    mq, info = load_quantized(q)
    mc, _ = load_compressed(c)
    assert info["quant_config"]["method"] == "qwt_v2" and info["quant_config"]["base_config"]["w_bits"] == 4
    x = tiny_images(1, 8, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(mq(x), mc(x))
    rq, rc = read_json(os.path.join(q, "results.json")), read_json(os.path.join(c, "results.json"))
    assert rq["bits"] == "w4a8" and rc["options"] == {"eps": "1e-7", "bits": "w4a8"}
    assert rq["quantized_test"] == rc["compressed_test"] and rq["float_test"] == rc["float_test"]
    assert rq["compensation"] == rc["compensation"] and len(rc["compensation"]) > 20


def test_new_compressor_flags_and_cli_hooks_work_without_editing_the_cli(adapter, tmp_path, capsys):
    from thrifty.cli.compress import calibration_loader, default_model

    calls = []

    def cli_model(backbone, task, adapter_dir):
        calls.append(("model", task.name, adapter_dir))
        return default_model(backbone, task, adapter_dir)

    def cli_calibration(task, n, batch_size, seed):
        calls.append(("calibration", n, batch_size, seed))
        loader = calibration_loader(task, n, batch_size, seed)
        assert loader.dataset.base is task.split("train") and len(loader.dataset) == n  # never the test split
        return loader

    def cli_evaluate(model, task):
        calls.append(("evaluate", len(task.split("test"))))
        return {"test_rows": len(task.split("test"))}

    name = register_dummy(cli_model=cli_model, cli_calibration=cli_calibration, cli_evaluate=cli_evaluate)
    try:
        out = str(tmp_path / "d")
        args = [*_common(adapter), "--seed", "3", "--output", out]
        code, _, err = run_cli(capsys, "compress", "--method", name, "--scale", "0.25", "--set", "center=no", *args)
        assert code == 0, err
        saved = read_json(os.path.join(out, "compress_config.json"))["config"]
        assert saved == {"scale": 0.25, "center": False, "version": 1, "method": name}
        model, _ = load_compressed(out)
        assert model.thrifty_compress == saved
        assert calls == [("model", "digits:1k", adapter), ("calibration", 16, 8, 3)]
        code, _, err = run_cli(capsys, "compress", "--method", name, *args, "--eval")
        assert code == 0, err
        assert read_json(os.path.join(out, "results.json"))["compressed_test"] == {"test_rows": 100}
        for argv, message in (
            (["--method", "ptq", "--scale", "0.5"], "--scale is an option of scale_head, not of ptq"),
            (["--method", name, "--bits", "w4a8"], "--bits is an option of ptq, qwt, qwt_v2, not of scale_head"),
            (["--method", name, "--set", "nope=1"], "no option `nope`; options: center, scale"),
            (["--method", name, "--onnx"], "has no ONNX export.*ptq, qwt, qwt_v2"),
        ):
            code, _, err = run_cli(capsys, "compress", *argv, *args)
            assert code == 2 and message.split(".*")[0] in err, err
    finally:
        unregister_compressor(name)


def test_compress_cli_evaluates_with_its_batch_size(adapter, tmp_path, capsys, monkeypatch):
    """--batch-size is also the evaluation batch (a causal LM's eval holds batch x tokens x vocab logits)."""
    import thrifty.train

    seen = []
    real = thrifty.train.evaluate

    def spy(model, split, batch_size, **kw):
        seen.append(batch_size)
        return real(model, split, batch_size, **kw)

    monkeypatch.setattr(thrifty.train, "evaluate", spy)
    argv = [a if a != "8" else "4" for a in _common(adapter)]  # --batch-size 4 (no other flag takes the value 8)
    code, _, err = run_cli(
        capsys, "compress", *argv, "--method", "ptq", "--bits", "w8a8", "--eval", "--output", str(tmp_path / "c")
    )
    assert code == 0, err
    assert seen == [4, 4]  # the float and the compressed model
