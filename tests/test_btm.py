"""BTM: weight averaging (identity, arithmetic mean of every tensor incl. BatchNorm buffers), greedy soup, balanced
seeded subsets, classifier re-training (head only, LWS folded exactly, shift BN), and a killed-then-resumed run
equal to an uninterrupted one."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from thrifty.backbones import BackboneSpec, load_backbone
from thrifty.data import balanced_subsets, load_data
from thrifty.errors import CheckpointError, ConfigError, ResultsExistError, SpecError
from thrifty.io import read_json
from thrifty.longtail import (
    BTMConfig,
    BTMRun,
    LWSHead,
    Stage2Config,
    average_states,
    greedy_soup,
    head_only,
    retrain_classifier,
)
from thrifty.train import TrainConfig
from thrifty.tuners import get_tuned_model, make_config


SPEC = BackboneSpec("cifar-resnet:8w4", image_size=8)


def _resnet_model(seed: int):
    bb = load_backbone(SPEC).reset_parameters_(seed)
    torch.manual_seed(seed)
    model = get_tuned_model(bb, make_config("full", {"bn_stats": "update"}), 10, objective="long_tail")
    model.train()
    with torch.no_grad():  # move the BatchNorm statistics away from their init
        model(torch.randn(16, 3, 8, 8) * (seed + 1))
    return model


def test_averaging_is_identity_and_arithmetic_mean_of_every_tensor():
    a, b = _resnet_model(0).adapter_state_dict(), _resnet_model(1).adapter_state_dict()
    assert any("running_mean" in k for k in a) and any("running_var" in k for k in a)
    same = average_states([a, a, a])
    assert all(torch.equal(same[k], a[k]) for k in a)  # bit for bit
    mean = average_states([a, b])
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(mean[k], (a[k] + b[k]) / 2, rtol=0, atol=1e-7)
        else:
            assert torch.equal(mean[k], (a[k] + b[k]) // 2)
    assert not torch.equal(
        mean["base_model.model.blocks.0.bn1.running_var"], a["base_model.model.blocks.0.bn1.running_var"]
    )
    with pytest.raises(CheckpointError, match="other tensors"):
        average_states([a, {k: v for k, v in list(b.items())[1:]}])


def test_greedy_soup_adds_only_what_helps():
    target = torch.tensor([1.0, 1.0])
    states = [{"w": torch.tensor([1.2, 1.0])}, {"w": torch.tensor([0.8, 1.0])}, {"w": torch.tensor([5.0, 5.0])}]
    soup, used, singles = greedy_soup(states, lambda s: -float((s["w"] - target).norm()))
    assert sorted(used) == [0, 1] and torch.allclose(soup["w"], target)  # the far model would hurt: left out
    assert singles[2] < singles[0]


def test_balanced_subsets_are_balanced_and_seeded():
    labels = np.array([0] * 50 + [1] * 7 + [2] * 20)
    subs = balanced_subsets(labels, 3, per_class=10, count=4, seed=0)
    for ix in subs:
        assert np.bincount(labels[ix], minlength=3).tolist() == [10, 7, 10]  # min(n_c, K)
        assert len(np.unique(ix)) == len(ix)
    assert not np.array_equal(subs[0], subs[1])  # independent shuffles
    again = balanced_subsets(labels, 3, per_class=10, count=4, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(subs, again))
    assert not np.array_equal(subs[0], balanced_subsets(labels, 3, 10, 1, seed=1)[0])


def test_lws_folds_exactly_and_head_only_restores_the_recipe():
    model = _resnet_model(0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x = torch.randn(4, 3, 8, 8)
    with head_only(model, Stage2Config(lws=True, shift_bn=False)):
        assert isinstance(model.head, LWSHead) and model.config.bn_stats == "frozen"
        assert {n for n, p in model.named_parameters() if p.requires_grad} == {
            "head.linear.weight",
            "head.linear.bias",
            "head.scale",
        }
        with torch.no_grad():
            model.head.scale.uniform_(0.5, 2.0)
        model.eval()
        before = model(x)
    assert isinstance(model.head, torch.nn.Linear) and model.config.bn_stats == "update"
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


@pytest.mark.parametrize("shift_bn", [False, True])
def test_classifier_retraining_changes_only_the_head(tmp_path, shift_bn):
    model = _resnet_model(0)
    task = load_data("digits:lt10", model.backbone.preprocess)
    start = {k: v.clone() for k, v in model.adapter_state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-2, progress=False)
    counts = np.bincount(task.splits["train"].labels).tolist()
    config = Stage2Config(shift_bn=shift_bn, lws=True, criterion="las")
    res = retrain_classifier(model, task, cfg, config, counts, str(tmp_path))
    end = model.adapter_state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert {"head.weight", "head.bias"} <= changed
    params = {k for k in changed if not k.startswith("head.") and "running" not in k and "num_batches" not in k}
    assert not params  # the backbone's weights never move
    assert any("running_mean" in k for k in changed) == shift_bn  # shift BN re-estimates the statistics
    assert res["objective"]["balance"] == "class" and "test_hmean" in res["metrics"]


def _btm(out, **kw):
    return BTMRun.create(
        str(out),
        backbone=SPEC,
        data="digits:lt10",
        method="full",
        overrides={"bn_stats": "update"},
        objective="long_tail:mixup=0.2",
        stage1=TrainConfig(epochs=2, batch_size=64, lr=3e-3, progress=False),
        finetune=TrainConfig(epochs=2, batch_size=16, lr=1e-3, progress=False),
        stage2=TrainConfig(epochs=1, batch_size=64, lr=3e-3, progress=False),
        config=BTMConfig(subsets=3, per_class=5),
        **kw,
    )


def test_resumed_btm_equals_uninterrupted(tmp_path, monkeypatch):
    ref = _btm(tmp_path / "ref").run()
    assert ref["metrics"]["test_samples"] > 0 and len(ref["stages"]["subsets"]) == 3
    assert ref["stages"]["undersample_mean"]["test_gmean"] is not None
    subsets = read_json(tmp_path / "ref" / "subsets.json")
    assert subsets["class_counts"] == [[5] * 10] * 3  # min(n_c, K) with every n_c >= 11

    original = BTMRun.finetune
    done = []

    def killed_at_subset_1(self, m):
        if m == 1:
            raise KeyboardInterrupt
        original(self, m)
        done.append(m)

    monkeypatch.setattr(BTMRun, "finetune", killed_at_subset_1)
    with pytest.raises(KeyboardInterrupt):
        _btm(tmp_path / "b").run()
    assert done == [0] and not (tmp_path / "b" / "merged").exists()
    monkeypatch.setattr(BTMRun, "finetune", original)
    with pytest.raises(ResultsExistError, match="resume"):
        _btm(tmp_path / "b")
    with pytest.raises(ConfigError, match="another BTM configuration"):
        BTMRun.create(str(tmp_path / "b"), backbone=SPEC, data="digits:lt5", method="full", resume=True)
    seen = []
    monkeypatch.setattr(BTMRun, "finetune", lambda self, m: (seen.append(m), original(self, m)))
    resumed = _btm(tmp_path / "b", resume=True).run()
    assert seen == [1, 2]  # subset 0 was complete: not trained again
    for stage in ("merged", "stage2", "subset2"):
        a = load_file(str(tmp_path / "ref" / stage / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "b" / stage / "adapter_model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert resumed["metrics"]["test_gmean"] == ref["metrics"]["test_gmean"]


def test_greedy_soup_needs_a_val_split(tmp_path):
    run = _btm(tmp_path / "g")
    run.config = BTMConfig(subsets=3, per_class=5, merge="greedy")
    for step in (run.stage1, run.subsets, run.run_subsets):
        step()
    with pytest.raises(ConfigError, match="val split"):
        run.merge()
    run.config = BTMConfig(subsets=3, per_class=5, merge="greedy", soup_role="train")
    run.merge()
    info = read_json(tmp_path / "g" / "merged" / "results.json")["merge"]
    assert info["merge"] == "greedy" and len(info["single_scores"]) == 3 and 1 <= len(info["members"]) <= 3


def test_cifar_resnet_is_the_papers_architecture_and_seeded_by_spec():

    bb = load_backbone("cifar-resnet:32")
    model = get_tuned_model(bb, make_config("full"), 10)
    # He et al. 2016 ResNet-32 (option A): 432 stem + 23,040 / 87,552 / 350,208 conv weights per stage, 2,272 BN
    # affine parameters, 650 in Linear(64, 10) = 464,154 (the "0.46M" of the paper's CIFAR table)
    assert sum(p.numel() for p in model.parameters()) == 464_154
    assert len(bb.blocks) == 15 and bb.num_features == 64
    x = torch.randn(2, 3, 32, 32)
    assert bb.forward_features(x).shape == (2, 64) and [t.shape[1] for t in bb.forward_taps(x, [4, 9, 14])] == [
        16,
        32,
        64,
    ]
    a, b = load_backbone("cifar-resnet:8w4s3"), load_backbone("cifar-resnet:8w4s3")
    c = load_backbone("cifar-resnet:8w4").reset_parameters_(3)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]) for k in sa)
    assert a.checkpoint_hash == c.checkpoint_hash != load_backbone("cifar-resnet:8w4s4").checkpoint_hash
    for bad in ("cifar-resnet:9", "cifar-resnet:x"):
        with pytest.raises(SpecError):
            load_backbone(bad)


def _cli_btm(out, *extra):
    return [
        "-m",
        "thrifty.cli.main",
        "btm",
        *("--backbone", "cifar-resnet:8w4", "--image-size", "8", "--data", "digits:lt10", "--method", "full"),
        *("--set", "bn_stats=update", "--epochs", "1", "--batch-size", "64", "--lr", "0.05", "--optimizer", "sgd"),
        *("--subsets", "3", "--per-class", "5", "--finetune-epochs", "2", "--stage2-epochs", "1", "--no-progress"),
        *("--output", str(out), *extra),
    ]


@pytest.mark.slow  # two torchrun processes (~1 min on a busy 2-core box): run with -m slow
def test_torchrun_ranks_split_the_subsets_and_equal_one_process(tmp_path):
    import os
    import subprocess
    import sys

    from _dist import torchrun

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(torchrun(2) + _cli_btm(tmp_path / "ddp"), env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # the same subsets fine-tuned in one process from the torchrun stage 1: bit-identical subset, merged, final
    one = [sys.executable, *_cli_btm(tmp_path / "one", "--theta0", str(tmp_path / "ddp" / "stage1"))]
    r = subprocess.run(one, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    for stage in ("subset1", "merged", "stage2"):
        a = load_file(str(tmp_path / "ddp" / stage / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "one" / stage / "adapter_model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), stage
