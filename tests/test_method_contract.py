"""The contract every registered method meets, in the style of PEFT's test matrix: one parametrised suite over
`available_methods()` on a tiny random ViT and a tiny task. A new method gets these checks by registering; a
method that breaks the contract fails them (shown once with a deliberately broken registration).

Contract: it builds; one training step changes only the tensors it declares trainable (and at least one of
them); save -> load gives identical outputs; a foreign or corrupt file is refused with a CheckpointError; a run
killed after an epoch and resumed equals the uninterrupted run; results.json has the objective's keys."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

from thrifty.backbones import load_backbone
from thrifty.data.base import ArrayImageDataset, TaskData
from thrifty.errors import CheckpointError
from thrifty.objectives import make_objective
from thrifty.train import TrainConfig, Trainer, run_training
from thrifty.train.checkpoint import CHECKPOINT_NAME
from thrifty.tuners import TunedModel, available_methods, get_tuned_model, load_tuned_model, make_config
from thrifty.tuners.config import TunerConfig
from thrifty.tuners.registry import METHODS, register_method


CLASSES = 3
# small options so every method fits test_vit (4 blocks, width 32); a method not listed uses its defaults
OPTIONS = {"lora": {"r": "2"}, "adaptformer": {"bottleneck": "4"}, "last": {"r": "4"}, "miet": {"r": "4", "k": "2"}}


def backbone():
    return load_backbone("timm:test_vit", pretrained=False, image_size=32)


def tiny_task(preprocess, objective: str | None = None) -> TaskData:
    rng = np.random.default_rng(0)
    classes = 2 if objective == "binary" else CLASSES
    splits = {}
    for name, n in (("train", 48), ("test", 24)):
        labels = np.arange(n) % classes
        images = (rng.integers(0, 64, (n, 12, 12)) + labels[:, None, None] * 60).astype(np.uint8)  # learnable
        splits[name] = ArrayImageDataset(images, labels, preprocess, f"tiny/{name}")
    return TaskData("tiny", splits, classes, "full", objective=objective)


def build(method: str, objective: str | None = None):
    bb = backbone()
    task = tiny_task(bb.preprocess, objective)
    torch.manual_seed(0)
    model = get_tuned_model(bb, make_config(method, OPTIONS.get(method, {})), task.num_classes, objective=objective)
    return model, task


def train_cfg(epochs: int = 2) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, progress=False, device="cpu", seed=0)


def batch(task: TaskData):
    return task.split("test").get_batch(list(range(8)))[0]


def perturb(model: TunedModel) -> None:
    """Non-zero values in zero-initialised adapters, so a round trip that drops them shows."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


# --- the contract, as functions (the broken dummy below is checked with them too) ---------------------------------
def check_step_changes_only_trainable(method: str) -> None:
    model, task = build(method)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainable = set(model._saved_tensors())
    assert trainable, f"{method}: nothing trains"
    Trainer(model, task, train_cfg(1)).fit()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, f"{method}: a training epoch changed nothing"
    assert changed <= trainable, f"{method}: frozen tensors changed: {sorted(changed - trainable)[:5]}"


def check_save_load_identical(method: str, directory: str) -> None:
    model, task = build(method)
    perturb(model)
    model.eval()
    x = batch(task)
    with torch.no_grad():
        want = model(x)
    model.save_pretrained(directory)
    loaded = load_tuned_model(backbone(), directory)
    with torch.no_grad():
        got = loaded(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{method}: outputs differ after save -> load")
    assert not any(p.requires_grad for p in loaded.parameters()), f"{method}: a loaded adapter must be frozen"


def check_refuses_foreign_files(method: str, directory: str, tmp: str) -> None:
    model, _ = build(method)
    model.save_pretrained(directory)
    other = "lora" if method != "lora" else "adaptformer"
    foreign, _ = build(other)
    foreign.save_pretrained(tmp)
    weights = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
    os.replace(os.path.join(tmp, weights[0]), os.path.join(directory, weights[0]))  # another method's tensors
    with pytest.raises(CheckpointError):
        load_tuned_model(backbone(), directory)
    model.save_pretrained(directory)
    path = os.path.join(directory, weights[0])
    with open(path, "r+b") as fh:  # truncated file
        fh.truncate(os.path.getsize(path) // 2)
    with pytest.raises(CheckpointError):
        load_tuned_model(backbone(), directory)


def check_resume_equals_uninterrupted(method: str, tmp: str, monkeypatch) -> None:
    model, task = build(method)
    full = Trainer(model, task, train_cfg(), os.path.join(tmp, "a")).fit()
    ref = {k: v.detach().clone() for k, v in model._saved_tensors().items()}
    original = Trainer._train_epoch

    def die_at_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    model, task = build(method)
    monkeypatch.setattr(Trainer, "_train_epoch", die_at_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(model, task, train_cfg(), os.path.join(tmp, "b")).fit()
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert os.path.exists(os.path.join(tmp, "b", CHECKPOINT_NAME))
    model, task = build(method)
    resumed = Trainer(model, task, train_cfg(), os.path.join(tmp, "b")).fit(resume=True)
    assert resumed["epochs_run_this_session"] == 1
    for k, v in model._saved_tensors().items():
        assert torch.equal(v, ref[k]), f"{method}: {k} differs after resume"
    assert resumed["test_accuracy"] == full["test_accuracy"]


def check_results_keys(method: str, objective: str, directory: str) -> None:
    bb = backbone()
    task = tiny_task(bb.preprocess, objective)
    res = run_training(
        backbone=bb,
        data=task,
        method=method,
        overrides=OPTIONS.get(method, {}),
        train=train_cfg(1),
        output_dir=directory,
        peak_memory=False,
    )
    obj = make_objective(objective)
    assert res["objective"]["name"] == obj.name
    want = {f"test_{k}" for k in obj.metric_names} | {"saved_activation_bytes", "trainable_params", "adapter_bytes"}
    assert want <= set(res["metrics"]), f"{method}: results.json lacks {sorted(want - set(res['metrics']))}"
    assert os.path.isfile(os.path.join(directory, "results.json"))


# --- the matrix -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
def test_step_changes_only_trainable_tensors(method):
    check_step_changes_only_trainable(method)


@pytest.mark.parametrize("method", available_methods())
def test_save_load_gives_identical_outputs(method, tmp_path):
    check_save_load_identical(method, str(tmp_path))


@pytest.mark.parametrize("method", available_methods())
def test_foreign_or_corrupt_files_are_refused(method, tmp_path):
    check_refuses_foreign_files(method, str(tmp_path / "own"), str(tmp_path / "other"))


@pytest.mark.parametrize("method", available_methods())
def test_resume_equals_uninterrupted_run(method, tmp_path, monkeypatch):
    check_resume_equals_uninterrupted(method, str(tmp_path), monkeypatch)


@pytest.mark.parametrize("objective", ["classification", "binary"])
@pytest.mark.parametrize("method", available_methods())
def test_results_json_has_the_objective_keys(method, objective, tmp_path):
    check_results_keys(method, objective, str(tmp_path))


# --- a registration that breaks the contract fails it -------------------------------------------------------------
@dataclass
class LeakyConfig(TunerConfig):
    """Test dummy: trains a scale it never saves, and nudges a frozen backbone weight in every forward."""

    method: ClassVar[str] = "leaky_dummy"


class LeakyModel(TunedModel):
    def _setup(self) -> None:
        self.scale = nn.Parameter(torch.ones(1))

    def _saved_tensors(self) -> dict[str, torch.Tensor]:
        return {"head.weight": self.head.weight, "head.bias": self.head.bias}  # forgets `scale`

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                next(self.backbone.parameters()).add_(1e-3)  # changes a frozen tensor
        return self.head(self.features(x)) * self.scale


def test_a_broken_registration_fails_the_contract(tmp_path):
    register_method(LeakyConfig, LeakyModel)
    try:
        assert "leaky_dummy" in available_methods()
        with pytest.raises(AssertionError, match="frozen tensors changed"):
            check_step_changes_only_trainable("leaky_dummy")
        with pytest.raises(AssertionError, match="outputs differ"):
            check_save_load_identical("leaky_dummy", str(tmp_path))
    finally:
        METHODS.unregister("leaky_dummy")
    assert "leaky_dummy" not in available_methods()
