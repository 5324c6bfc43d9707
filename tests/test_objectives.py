"""Objectives: binary AUC / log loss equal scikit-learn's (ties included); causal_lm perplexity equals exp of
transformers' own loss; the registry and the Trainer use the objective's loss, metrics and selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from thrifty.errors import ConfigError
from thrifty.objectives import (
    BinaryObjective,
    CausalLMObjective,
    ClassificationObjective,
    available_objectives,
    make_objective,
    roc_auc,
)


def test_registry_names_come_from_the_classes():
    assert available_objectives() == ["binary", "causal_lm", "classification", "long_tail"]
    assert isinstance(make_objective(None), ClassificationObjective)
    assert make_objective("binary", {"pos_weight": "2.5"}).pos_weight == 2.5
    with pytest.raises(ConfigError, match="unknown objective"):
        make_objective("regression")
    with pytest.raises(ConfigError, match="no option"):
        make_objective("binary", {"gamma": "2"})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_auc_and_logloss_equal_scikit_learn_with_ties(seed):
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    logits = np.round(rng.normal(size=500) + labels, 1)  # rounding makes many exact ties across classes
    assert len(np.unique(logits)) < 200
    obj, meter = BinaryObjective(), BinaryObjective().meter()
    for chunk in np.array_split(np.arange(500), 7):  # accumulated over batches
        meter.update(torch.tensor(logits[chunk]).float().unsqueeze(1), torch.tensor(labels[chunk]))
    res = meter.compute()
    probs = 1 / (1 + np.exp(-logits.astype(np.float32).astype(np.float64)))
    assert res["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)
    assert res["logloss"] == pytest.approx(log_loss(labels, probs), abs=1e-6)
    z, y = torch.tensor(logits).float().unsqueeze(1), torch.tensor(labels)
    assert float(obj.loss(z, y)) == pytest.approx(res["logloss"], abs=1e-6)
    assert roc_auc(logits, labels) == pytest.approx(roc_auc_score(labels, logits), abs=1e-12)


def test_binary_needs_two_classes_and_builds_one_logit():
    obj = BinaryObjective()
    backbone = nn.Module()
    backbone.num_features = 8
    head = obj.build_head(backbone, obj.num_outputs(2))
    assert head.out_features == 1 and torch.equal(head.bias, torch.zeros(1))
    with pytest.raises(ConfigError, match="2 classes"):
        obj.num_outputs(5)
    with pytest.raises(ConfigError, match="label_smoothing"):
        obj.check_train(0.1)


def test_causal_lm_perplexity_is_exp_of_transformers_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding in two rows
    mask[2, 5:] = 0
    obj = CausalLMObjective()
    targets = obj.targets({"input_ids": ids, "attention_mask": mask}, torch.zeros(3))
    assert (targets == -100).sum() == 4 + 7
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=targets)
    meter = obj.meter()
    meter.update(out.logits, targets)
    res = meter.compute()
    assert res["tokens"] == (12 - 1) + (8 - 1) + (5 - 1)
    assert res["perplexity"] == pytest.approx(math.exp(float(out.loss)), rel=1e-5)
    assert float(obj.loss(out.logits, targets)) == pytest.approx(float(out.loss), rel=1e-5)
    holder = nn.Module()
    holder.lm_head = model.lm_head
    assert obj.build_head(holder, None) is model.lm_head
    with pytest.raises(ConfigError, match="LM head"):
        obj.build_head(nn.Linear(2, 2), None)


def test_trainer_uses_the_objective(tiny_vit_factory):
    """A 2-class task trained with `binary`: results carry AUC and log loss (test and val), selection by AUC."""
    from dataclasses import replace

    from thrifty.data import from_pools
    from thrifty.data.packaged import digits
    from thrifty.train import TrainConfig, Trainer
    from thrifty.tuners import get_tuned_model, make_config

    bb = tiny_vit_factory(0)
    pools = digits()
    parity = replace(  # even vs odd digits, a source that asks for the binary objective
        pools,
        train=(pools.train[0], pools.train[1] % 2),
        test=(pools.test[0], pools.test[1] % 2),
        num_classes=2,
        class_names=["even", "odd"],
        objective="binary",
    )
    task = from_pools("parity", parity, bb.preprocess, few_sample=True, seed=0, test_size=100)
    assert task.objective == "binary"
    torch.manual_seed(0)
    model = get_tuned_model(bb, make_config("linear"), 2, objective=task.objective)
    assert model.head.out_features == 1 and model.objective == "binary"
    cfg = TrainConfig(epochs=2, batch_size=100, lr=1e-2, progress=False, select_on_val=True)
    out = Trainer(model, task, cfg).fit()
    assert {"test_auc", "test_logloss", "val_auc", "selected_epoch"} <= set(out)
    assert 0.0 <= out["test_auc"] <= 1.0 and out["test_logloss"] > 0
    assert out["val_auc"] == max(h["val_auc"] for h in out["history"])
