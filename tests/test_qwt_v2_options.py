"""QwT-v2 options of issue 21: `skip_modules` (layers left without an affine) and `layernorm` (CWAC on LayerNorm
outputs, folded into the LayerNorm)."""

import copy

import pytest
import torch
from torch import nn

from _ptq_models import stacked_logits, tuned_bert
from thrifty.compress import PTQConfig, QwTV2Config, quantize_
from thrifty.compress.quant import QuantLinear
from thrifty.compress.quant.qwt_v2 import NORM_AFFINE_ATTR
from thrifty.errors import ConfigError


@pytest.fixture(scope="module")
def bert():
    return tuned_bert()


def test_skip_modules_leaves_layers_unfitted(bert):
    model, data = bert
    q = copy.deepcopy(model)
    cfg = QwTV2Config(base_config=PTQConfig(w_bits=4, a_bits=4), fold=False, skip_modules=(r".*intermediate\.dense",))
    quantize_(q, cfg, calib_data=data)
    layers = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear)}
    skipped = [n for n in layers if n.endswith("intermediate.dense")]
    assert skipped and all(layers[n].cwac_a is None for n in skipped)
    assert all(m.cwac_a is not None for n, m in layers.items() if n not in skipped)
    fitted = {e["layer"] for e in q.thrifty_quant["spec"]["compensation_log"]}
    assert fitted == set(layers) - set(skipped)
    with pytest.raises(ConfigError, match="skip_modules"):
        QwTV2Config(skip_modules=("(",))


def test_layernorm_affine_is_fitted_folded_and_helps(bert):
    model, data = bert
    base = PTQConfig(w_bits=4, a_bits=4)
    plain, with_ln = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(plain, QwTV2Config(base_config=base), calib_data=data)
    quantize_(with_ln, QwTV2Config(base_config=base, layernorm=True), calib_data=data)
    norms = [n for n, m in with_ln.named_modules() if isinstance(m, nn.LayerNorm)]
    log = with_ln.thrifty_quant["spec"]["compensation_log"]
    assert set(norms) <= {e["layer"] for e in log}
    # folded: no helper modules or hooks left, the state dict has plain QwT-v2's keys and shapes
    assert not any(NORM_AFFINE_ATTR in n for n, _ in with_ln.named_modules())
    assert all(not m._forward_hooks for m in with_ln.modules() if isinstance(m, nn.LayerNorm))
    sd_a, sd_b = plain.state_dict(), with_ln.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(sd_a[k].shape == sd_b[k].shape for k in sd_a)
    # the LayerNorm affines changed the norms, and every fit lowered (never raised) its own calibration error
    changed = [n for n in norms if not torch.equal(sd_a[n + ".weight"], sd_b[n + ".weight"])]
    assert changed
    assert all(e["sse_after"] <= e["sse_before"] * (1 + 1e-6) + 1e-9 for e in log)
    ref = stacked_logits(model, data)
    err = lambda q: float((stacked_logits(q, data) - ref).norm() / ref.norm())  # noqa: E731
    assert err(with_ln) < 1.5 * err(plain)


def test_fit_estimators():
    """ls shrinks a noisy y_q towards the mean (a = Cov/Var < 1); moments matches the variance; bias keeps a = 1."""
    from thrifty.compress.quant.lstsq import ChannelAffine

    g = torch.Generator().manual_seed(0)
    y_fp = torch.randn(20000, 4, generator=g) * torch.tensor([1.0, 2.0, 0.5, 1.0]) + 3
    y_q = 0.9 * y_fp + 0.5 * torch.randn(20000, 4, generator=g) - 1
    stats = ChannelAffine(4)
    stats.update(y_q, y_fp)
    a_ls, b_ls = stats.solve(fit="ls")
    a_mm, b_mm = stats.solve(fit="moments")
    a_b, b_b = stats.solve(fit="bias")
    for c in range(4):
        cov = torch.cov(torch.stack([y_q[:, c], y_fp[:, c]]).double(), correction=0)
        assert abs(float(a_ls[c]) - float(cov[0, 1] / cov[0, 0])) < 1e-6
        assert abs(float(a_mm[c]) - float((cov[1, 1] / cov[0, 0]).sqrt())) < 1e-6
    assert bool((a_ls < a_mm).all()) and bool((a_b == 1).all())
    for a, b in ((a_ls, b_ls), (a_mm, b_mm), (a_b, b_b)):  # every estimator matches the mean
        torch.testing.assert_close((a * y_q.double().mean(0) + b).float(), y_fp.mean(0), rtol=1e-4, atol=1e-4)
    assert stats.sse(a_ls, b_ls) <= min(stats.sse(a_mm, b_mm), stats.sse(a_b, b_b))  # ls is the MSE optimum
    with pytest.raises(ConfigError, match="fit"):
        QwTV2Config(fit="median")
