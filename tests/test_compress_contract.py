"""The shared contract of every registered compressor, as one parametrised suite (PEFT's test-matrix style).

Each compressor in `available_compressors()` needs a tiny case in TINY_CASES (a missing case fails the suite), and
`check_contract` then asserts, on a tiny model with tiny calibration data:
- `compress_` rewrites the model in place and returns None;
- `save` writes the registered manifest, which records the method and the config (up to the calibration step),
  and `saved_method` / `load_compressed` find the compressor from the folder alone;
- `load` (and `load_compressed`) give the same outputs as the compressed model;
- `load` refuses a foreign or corrupt folder with a CheckpointError (empty folder, manifest not JSON, manifest of
  another method, every other file truncated);
- the config is reachable from the CLI: `make_compressor_config(name, {})` builds it and every `cli_flags` entry is
  a `thrifty compress` flag.
A new compressor gets these tests by registering plus adding its case below.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from _compress_dummy import register_dummy
from _ctr_models import tiny_batches, tiny_ctr
from thrifty.backbones import BackboneSpec
from thrifty.compress import (
    PTQConfig,
    QwTConfig,
    QwTV2Config,
    available_compressors,
    compress_,
    compressor_for,
    config_dict,
    get_compressor,
    load_compressed,
    make_compressor_config,
    saved_method,
    unregister_compressor,
)
from thrifty.compress.afm import AFMConfig
from thrifty.compress.dc_vit import DCViTConfig
from thrifty.compress.kv_heads import KVHeadsConfig
from thrifty.errors import CheckpointError
from thrifty.io import read_json, write_json, write_text


TINY_BACKBONE = BackboneSpec("timm:test_vit", random_init=True, image_size=32)


def tiny_classifier(num_classes: int = 3):
    """A random-init timm test_vit (seeded by load_backbone) at 32 px with a seeded `full` head, frozen, eval."""
    from thrifty.backbones import load_backbone
    from thrifty.tuners import get_tuned_model, make_config

    bb = load_backbone(TINY_BACKBONE)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = get_tuned_model(bb, make_config("full"), num_classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_images(n: int = 2, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 32, 32, generator=g) for _ in range(n)]


@dataclass
class TinyCase:
    """How to exercise one compressor on a tiny model: its config, model, calibration batches, test inputs and any
    keywords its `save` needs (the backbone's architecture comes from the model's own BackboneSpec)."""

    config: Callable[[], Any]
    model: Callable[[], torch.nn.Module] = tiny_classifier
    calib: Callable[[], list[Any]] = tiny_images
    inputs: Callable[[], Any] = field(default=lambda: tiny_images(1, 4, seed=1)[0])
    save_kwargs: dict[str, Any] = field(default_factory=dict)


def tiny_causal_lm():
    """A tiny random Llama (4 query / 2 KV heads) saved with a tokenizer and loaded as thrifty's causal LM."""
    import tempfile
    from pathlib import Path

    from test_hf_decoder import tiny_decoder, tiny_tokenizer
    from thrifty.backbones import load_backbone
    from thrifty.compress.kv_heads.registration import cli_model

    path = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    tiny_tokenizer(path).save_pretrained(path)
    tiny_decoder("llama", 2).save_pretrained(path)
    return cli_model(load_backbone(BackboneSpec(f"hf:{path}")), None, None).eval()


def tiny_tokens(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": torch.randint(5, 95, (4, 12), generator=g), "attention_mask": torch.ones(4, 12)}
        for _ in range(n)
    ]


TINY_CASES: dict[str, TinyCase] = {
    "afm": TinyCase(
        lambda: AFMConfig(rank=6, embed_rank=3),
        model=tiny_ctr,
        calib=tiny_batches,
        inputs=lambda: tiny_batches(1, 16, seed=1, labels=False)[0],
    ),
    "ptq": TinyCase(lambda: PTQConfig(w_bits=4, a_bits=8)),
    "qwt": TinyCase(lambda: QwTConfig(base_config=PTQConfig(w_bits=4, a_bits=6))),
    "qwt_v2": TinyCase(lambda: QwTV2Config(base_config=PTQConfig(w_bits=4, a_bits=8))),
    "dc_vit": TinyCase(lambda: DCViTConfig(keep_macs=0.7, samples=8, metric_samples=8, epochs=1, batch_size=8)),
    "kv_heads": TinyCase(
        lambda: KVHeadsConfig(kv_heads=1), tiny_causal_lm, tiny_tokens, lambda: tiny_tokens(1, seed=1)[0]
    ),
}
DUMMY_CASE = TinyCase(lambda: _dummy_config(scale=0.5))


def _dummy_config(**kw):
    from _compress_dummy import ScaleHeadConfig

    return ScaleHeadConfig(**kw)


def missing_cases() -> list[str]:
    return sorted(set(available_compressors()) - set(TINY_CASES))


# --- the contract ---------------------------------------------------------------------------------------------


def _outputs(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _snapshot(model) -> tuple[list[tuple[str, str]], dict[str, torch.Tensor]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        k: v.detach().clone() for k, v in model.state_dict().items()
    }


def _changed(before, after) -> bool:
    (mods_a, sd_a), (mods_b, sd_b) = before, after
    if mods_a != mods_b or sd_a.keys() != sd_b.keys():
        return True
    return any(sd_a[k].shape != sd_b[k].shape or not torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


def _without_step(d: Any) -> Any:
    """A config dict without its calibration `step` (prepare on save after the one-call form, convert otherwise)."""
    if isinstance(d, dict):
        return {k: _without_step(v) for k, v in d.items() if k != "step"}
    return d


def spoiled_copies(directory: str, manifest: str, config_key: str, root: str) -> Iterator[tuple[str, str]]:
    """(what, folder) copies of a saved folder that a loader must refuse."""
    empty = os.path.join(root, "empty")
    os.makedirs(empty)
    yield "empty folder", empty
    not_json = os.path.join(root, "not_json")
    shutil.copytree(directory, not_json)
    write_text(os.path.join(not_json, manifest), "{not json")
    yield "manifest is not JSON", not_json
    foreign = os.path.join(root, "foreign")
    shutil.copytree(directory, foreign)
    data = read_json(os.path.join(foreign, manifest))
    data[config_key] = {**data[config_key], "method": "some_other_method"}
    write_json(os.path.join(foreign, manifest), data)
    yield "manifest of another method", foreign
    for name in sorted(os.listdir(directory)):
        if name == manifest:
            continue
        cut = os.path.join(root, f"truncated-{name}")
        shutil.copytree(directory, cut)
        with open(os.path.join(cut, name), "r+b") as fh:
            fh.truncate(os.path.getsize(os.path.join(cut, name)) // 2)
        yield f"{name} truncated", cut


def check_contract(name: str, case: TinyCase, root: str) -> None:
    """Assert the shared contract for compressor `name` (raises AssertionError on a violation)."""
    from thrifty.cli.main import build_parser

    entry = get_compressor(name)
    config = case.config()
    assert type(config) is entry.config_cls and compressor_for(config) is entry
    assert isinstance(make_compressor_config(name, {}), entry.config_cls)
    compress_cli = build_parser().subcommands["compress"]
    flags = {s for a in compress_cli._actions for s in a.option_strings}
    method_choices = next(a.choices for a in compress_cli._actions if a.dest == "method")
    assert name in method_choices
    assert all("--" + f.replace("_", "-") in flags for f in entry.cli_flags), "cli_flags missing from the CLI"

    model, x = case.model(), case.inputs()
    before = _snapshot(model)
    assert compress_(model, config, case.calib()) is None
    assert _changed(before, _snapshot(model)), f"compress_ with {name} did not rewrite the model in place"
    out = _outputs(model, x)

    directory = os.path.join(root, "saved")
    entry.save(model, directory, **copy.deepcopy(case.save_kwargs))
    manifest = os.path.join(directory, entry.manifest)
    assert os.path.isfile(manifest), f"{name}: save did not write its manifest {entry.manifest}"
    saved = read_json(manifest)[entry.config_key]
    assert saved["method"] == name
    assert _without_step(saved) == _without_step(config_dict(config)), "the saved config is not the applied one"
    assert saved_method(directory) == name

    loaded, _ = entry.load(directory)
    torch.testing.assert_close(_outputs(loaded, x), out, msg=lambda m: f"{name}: load did not restore outputs\n{m}")
    again, _ = load_compressed(directory)
    torch.testing.assert_close(_outputs(again, x), out)

    for what, folder in spoiled_copies(directory, entry.manifest, entry.config_key, os.path.join(root, "spoiled")):
        try:
            entry.load(folder)
        except CheckpointError:
            continue
        except Exception as exc:
            raise AssertionError(f"{name}: loading a folder with {what} raised {exc!r}, not CheckpointError") from exc
        raise AssertionError(f"{name}: loading a folder with {what} did not raise CheckpointError")


# --- the suite ------------------------------------------------------------------------------------------------


def test_every_compressor_has_a_tiny_case():
    assert not missing_cases(), (
        f"add a TinyCase for {missing_cases()} to TINY_CASES in tests/test_compress_contract.py"
    )


@pytest.mark.parametrize("name", available_compressors())
def test_contract(name, tmp_path):
    if name not in TINY_CASES:
        pytest.fail(f"compressor {name!r} has no tiny case in TINY_CASES")
    check_contract(name, TINY_CASES[name], str(tmp_path))


def test_contract_accepts_a_correct_new_compressor_and_catches_a_broken_load(tmp_path):
    """A compressor outside thrifty.compress registers and passes; its twin whose `load` forgets the saved tensors
    fails the check; while registered without a case, both are reported as missing a tiny case."""
    good = register_dummy()
    try:
        assert good in missing_cases()
        check_contract(good, DUMMY_CASE, str(tmp_path / "good"))
        broken = register_dummy(broken=True)
        try:
            from _compress_dummy import BrokenScaleHeadConfig

            case = TinyCase(lambda: BrokenScaleHeadConfig(scale=0.5))
            with pytest.raises(AssertionError, match="load did not restore outputs"):
                check_contract(broken, case, str(tmp_path / "broken"))
        finally:
            unregister_compressor(broken)
    finally:
        unregister_compressor(good)
    assert good not in available_compressors() and not missing_cases()
