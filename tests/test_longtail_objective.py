"""The `long_tail` objective: BTM's metrics (checked against scipy with the 1e-3 floor), the shot groups, the
criteria against direct implementations of their papers' formulas, mixup, and the default/override selection."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import gmean, hmean

from thrifty.backbones import BackboneSpec
from thrifty.errors import ConfigError
from thrifty.objectives import LongTailObjective, make_objective
from thrifty.train import TrainConfig, run_training


def _outputs_for(per_class_correct, per_class_total, num_classes):
    """Logits/targets whose per-class recall is correct_c / total_c (wrong answers go to the next class)."""
    logits, targets = [], []
    for c, (k, n) in enumerate(zip(per_class_correct, per_class_total)):
        for i in range(n):
            z = torch.zeros(num_classes)
            z[c if i < k else (c + 1) % num_classes] = 5.0
            logits.append(z)
            targets.append(c)
    return torch.stack(logits), torch.tensor(targets)


def test_metrics_equal_scipy_with_btm_floor():
    correct, total = [4, 2, 0, 1, 3], [4, 4, 4, 4, 4]
    counts = [500, 150, 60, 19, 5]  # many: 0, 1; medium: 2; few: 3, 4
    obj = LongTailObjective(class_counts=counts)
    meter = obj.meter()
    logits, targets = _outputs_for(correct, total, 5)
    meter.update(logits[:7], targets[:7])  # accumulates over batches
    meter.update(logits[7:], targets[7:])
    m = meter.compute()
    acc = np.array(correct) / np.array(total)
    floored = np.where(acc == 0, 1e-3, acc)  # BTM: acc_classes[acc_classes == 0] = 1e-3
    assert m["hmean"] == pytest.approx(hmean(floored), rel=1e-12)
    assert m["gmean"] == pytest.approx(gmean(floored), rel=1e-12)
    assert m["mean_class_accuracy"] == pytest.approx(acc.mean()) and m["worst_class_accuracy"] == 0.0
    assert m["hmean"] <= m["gmean"] <= m["mean_class_accuracy"]
    assert m["many_accuracy"] == pytest.approx(0.75) and m["medium_accuracy"] == 0.0
    assert m["few_accuracy"] == pytest.approx((0.25 + 0.75) / 2)
    assert m["per_class_accuracy"] == pytest.approx(acc.tolist()) and m["accuracy"] == pytest.approx(10 / 20)
    assert m["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    # thresholds are options; a group without classes is None, not 0
    m2 = LongTailObjective(class_counts=counts, many_threshold=1000, few_threshold=1).meter()
    m2.update(logits, targets)
    r = m2.compute()
    assert r["many_accuracy"] is None and r["few_accuracy"] is None and r["medium_accuracy"] == pytest.approx(0.5)


def test_unbalanced_test_split_weights_classes_equally():
    obj = LongTailObjective()
    meter = obj.meter()
    logits, targets = _outputs_for([90, 0], [100, 10], 2)
    meter.update(logits, targets)
    m = meter.compute()
    assert m["accuracy"] == pytest.approx(90 / 110) and m["mean_class_accuracy"] == pytest.approx(0.45)
    assert m["many_accuracy"] is None  # no training counts known


def test_criteria_match_their_formulas():
    torch.manual_seed(0)
    z, y = torch.randn(12, 4), torch.tensor([0, 1, 2, 3, 0, 0, 1, 2, 0, 0, 1, 0])
    counts = np.array([60, 25, 10, 5])
    # class-balanced: w_c = (1 - b) / (1 - b^n_c), sum C; mean over the batch of w_y CE_i
    b = 0.99
    w = (1 - b) / (1 - b ** counts.astype(float))
    w = w / w.sum() * 4
    expect = (torch.tensor(w, dtype=torch.float32)[y] * F.cross_entropy(z, y, reduction="none")).mean()
    got = make_objective("long_tail:criterion=cb,beta=0.99", None)
    got.class_counts = counts.tolist()
    assert got.loss(z, y).item() == pytest.approx(expect.item(), rel=1e-5)
    # logit adjustment with tau = 1 == Balanced Softmax: CE(z + log n_c)
    la = LongTailObjective(criterion="logit_adjust", class_counts=counts.tolist())
    bs = F.cross_entropy(z + torch.log(torch.tensor(counts, dtype=torch.float32)), y)
    assert la.loss(z, y).item() == pytest.approx(bs.item(), rel=1e-5)
    # GML, log after mean (BTM methods.py ReweightedGMLLogAfterMean), written out per class
    for p in (1.0, 2.0):
        q = F.softmax(z + torch.log(torch.tensor(counts, dtype=torch.float32)), -1).clamp(1e-5, 1)
        per = [-torch.log(q[y == c, c].mean()) for c in sorted(set(y.tolist()))]
        ref = torch.stack(per).pow(p).mean().pow(1 / p)
        gml = LongTailObjective(criterion="gml", gml_p=p, class_counts=counts.tolist())
        assert gml.loss(z, y).item() == pytest.approx(ref.item(), rel=1e-5)
    # LAS (MiSLAS): eps_y = tail + (head - tail) sin(pi/2 (n_y - n_min) / (n_max - n_min))
    eps = 0.0 + 0.3 * np.sin((counts - 5) / 55 * np.pi / 2)
    logp = F.log_softmax(z, -1)
    e = torch.tensor(eps, dtype=torch.float32)[y]
    ref = ((1 - e) * -logp.gather(1, y[:, None]).squeeze(1) + e * -logp.mean(-1)).mean()
    las = LongTailObjective(criterion="las", class_counts=counts.tolist())
    assert las.loss(z, y).item() == pytest.approx(ref.item(), rel=1e-5)


def test_mixup_is_the_mixed_criterion():
    obj = LongTailObjective(mixup=0.2, class_counts=[3, 3, 3])
    x, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    xm, t = obj.training_batch(x, y, (0, 1, 2))
    xm2, t2 = obj.training_batch(x, y, (0, 1, 2))
    assert torch.equal(xm, xm2) and torch.equal(t, t2)  # seeded by (seed, epoch, step)
    lam = float(t[torch.arange(6), y].min())  # the own class keeps weight lam (or 1 when paired with itself)
    perm = [
        int(torch.nonzero((t[i] > 0) & (torch.arange(3) != y[i])).flatten()[0]) if t[i].max() < 1 else int(y[i])
        for i in range(6)
    ]
    z = torch.randn(6, 3)
    ya, yb = y, torch.tensor(perm)
    ref = lam * F.cross_entropy(z, ya) + (1 - lam) * F.cross_entropy(z, yb)
    assert obj.loss(z, t).item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="token ids"):
        obj.training_batch({"input_ids": torch.ones(6, 3, dtype=torch.long)}, y, (0, 0, 0))
    with pytest.raises(ConfigError, match="hard labels"):
        LongTailObjective(criterion="gml", mixup=0.2)


def test_options_parse_and_validate():
    o = make_objective("long_tail:criterion=logit_adjust,tau=0.5,balance=class,class_counts=[5,3,1]")
    assert (o.criterion, o.tau, o.balance, o.class_counts) == ("logit_adjust", 0.5, "class", [5, 3, 1])
    for bad in ("long_tail:criterion=focal", "long_tail:balance=sqrt", "long_tail:beta=1", "long_tail:nope=1"):
        with pytest.raises(ConfigError):
            make_objective(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        make_objective("long_tail:mixup")


def test_lt_data_selects_long_tail_and_objective_overrides(tmp_path):
    kw = dict(
        backbone=BackboneSpec("cifar-resnet:8w4", image_size=8),
        data="digits:lt10",
        method="full",
        overrides={"bn_stats": "update"},
        train=TrainConfig(epochs=1, batch_size=64, lr=1e-3, progress=False),
        peak_memory=False,
    )
    r = run_training(**kw, output_dir=str(tmp_path / "a"))
    assert (
        r["objective"]["name"] == "long_tail"
        and r["objective"]["train_counts"] == r["task"]["long_tail"]["class_counts"]
    )
    for k in LongTailObjective.metric_names:  # every metric the objective declares reaches results.json
        assert f"test_{k}" in r["metrics"]
    assert len(r["metrics"]["test_per_class_accuracy"]) == 10
    c = run_training(**kw, objective="classification", output_dir=str(tmp_path / "b"))
    assert c["objective"]["name"] == "classification" and "test_hmean" not in c["metrics"]


def test_report_draws_a_per_class_bar_plot(tmp_path):
    from thrifty.bench.collect import CellResult, Layout
    from thrifty.bench.document import per_class_plots

    layout = Layout("lt", "", [("fmnist-lt", "all")], ["ce", "btm"], [0, 1])
    cells = [
        CellResult(
            "fmnist-lt",
            m,
            s,
            "complete",
            {
                "metrics": {"test_per_class_accuracy": [0.9, 0.5 + 0.1 * s, 0.1]},
                "objective": {"train_counts": [9, 1, 3]},
            },
        )
        for m in ("ce", "btm")
        for s in (0, 1)
    ] + [CellResult("fmnist-lt", "ce", 2, "failed")]
    (png,) = per_class_plots(layout, cells, str(tmp_path))
    assert png.endswith("per_class-fmnist-lt.png") and (tmp_path / "per_class-fmnist-lt.png").stat().st_size > 1000


def test_select_on_val_trains_on_the_lt_split_and_selects_on_the_lt_val_split(tmp_path):
    r = run_training(
        backbone=BackboneSpec("cifar-resnet:8w4", image_size=8),
        data="digits:lt10-max60-val20",  # val: 20 per class of the training images the LT draw left unused
        method="full",
        overrides={"bn_stats": "update"},
        train=TrainConfig(epochs=2, batch_size=64, lr=1e-3, progress=False, select_on_val=True),
        peak_memory=False,
        output_dir=str(tmp_path / "v"),
    )
    counts = r["task"]["long_tail"]["class_counts"]
    assert r["task"]["split_sizes"]["val"] == 200 and r["objective"]["train_counts"] == counts
    assert r["metrics"]["train_samples"] == sum(counts) == r["task"]["split_sizes"]["train"]  # LT split only
    hist = r["history"]
    assert r["metrics"]["selected_epoch"] in (0, 1) and all("val_hmean" in h for h in hist)
    best = max(h["val_mean_class_accuracy"] for h in hist)
    assert r["metrics"]["val_mean_class_accuracy"] == best  # the long_tail selection metric, read on val
