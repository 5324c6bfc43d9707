"""Closed forms of QwT / QwT-v2 against torch.linalg.lstsq; streaming == one shot; the R^2 gate."""

import torch

from thrifty.compress.quant.lstsq import ChannelAffine, NormalEquations
from thrifty.compress.quant.qwt import conv_groups


def _data(n=300, f=6, m=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, f, generator=g, dtype=torch.float64)
    W = torch.randn(f, m, generator=g, dtype=torch.float64)
    R = X @ W + 0.5 + 0.3 * torch.randn(n, m, generator=g, dtype=torch.float64)
    return X, R


def _lstsq(X, R):
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    return torch.linalg.lstsq(Xa, R).solution


def test_normal_equations_match_lstsq():
    X, R = _data()
    acc = NormalEquations(X.shape[1], R.shape[1])
    acc.update(X, R)
    theta = acc.solve()[0]
    torch.testing.assert_close(theta, _lstsq(X, R), rtol=1e-9, atol=1e-9)


def test_streaming_equals_one_shot_and_r2():
    X, R = _data(n=257)
    one = NormalEquations(X.shape[1], R.shape[1])
    one.update(X, R)
    stream = NormalEquations(X.shape[1], R.shape[1])
    for chunk in torch.split(torch.arange(len(X)), 40):
        stream.update(X[chunk].float(), R[chunk].float())  # float32 batches, float64 accumulation
    torch.testing.assert_close(stream.solve(), one.solve(), rtol=1e-5, atol=1e-5)
    theta = _lstsq(X, R)
    pred = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1) @ theta
    r2 = 1 - ((R - pred) ** 2).sum() / ((R - R.mean(0)) ** 2).sum()
    assert abs(one.r2(one.solve()) - float(r2)) < 1e-9
    assert 0.5 < float(r2) < 1.0


def test_grouped_equations_solve_each_group():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(3, 100, 5, generator=g, dtype=torch.float64)
    R = torch.randn(3, 100, 2, generator=g, dtype=torch.float64)
    acc = NormalEquations(5, 2, groups=3)
    acc.update(X, R)
    theta = acc.solve()
    for k in range(3):
        torch.testing.assert_close(theta[k], _lstsq(X[k], R[k]), rtol=1e-9, atol=1e-9)


def test_ridge_and_r2_gate_inputs():
    X, R = _data()
    acc = NormalEquations(X.shape[1], R.shape[1])
    acc.update(X, R)
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    lam = 3.0
    expected = torch.linalg.solve(Xa.T @ Xa + lam * torch.eye(Xa.shape[1], dtype=X.dtype), Xa.T @ R)
    torch.testing.assert_close(acc.solve(lam)[0], expected, rtol=1e-9, atol=1e-9)
    assert acc.r2(acc.solve(1e9)) < 0  # a branch shrunk to ~0 cannot explain a non-zero-mean residual: gated
    zero = NormalEquations(X.shape[1], R.shape[1])
    zero.update(X, torch.zeros_like(R))  # nothing to correct
    assert zero.r2(zero.solve()) == 0.0


def test_singular_design_gives_min_norm_solution():
    X, R = _data(f=4)
    X = torch.cat([X, X[:, :1] * 2 - 1], 1)  # a column collinear with another and the ones column
    acc = NormalEquations(X.shape[1], R.shape[1])
    acc.update(X, R)
    theta = acc.solve()[0]
    Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
    torch.testing.assert_close(theta, torch.linalg.pinv(Xa) @ R, rtol=1e-6, atol=1e-6)


def test_channel_affine_matches_per_channel_lstsq():
    g = torch.Generator().manual_seed(2)
    yq = torch.randn(500, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 0.5, 1], dtype=torch.float64)
    yf = 1.3 * yq + 0.2 + 0.1 * torch.randn(500, 5, generator=g, dtype=torch.float64)
    acc = ChannelAffine(5)
    for chunk in torch.split(torch.arange(500), 77):
        acc.update(yq[chunk], yf[chunk])
    a, beta = acc.solve(eps=0.0)
    for c in range(5):
        sol = torch.linalg.lstsq(
            torch.stack([yq[:, c], torch.ones(500, dtype=yq.dtype)], 1), yf[:, c : c + 1]
        ).solution
        assert abs(float(a[c] - sol[0, 0])) < 1e-9 and abs(float(beta[c] - sol[1, 0])) < 1e-9
    before = acc.sse(torch.ones_like(a), torch.zeros_like(beta))
    assert abs(before - float(((yf - yq) ** 2).sum())) < 1e-6 * before
    assert abs(acc.sse(a, beta) - float(((yf - a * yq - beta) ** 2).sum())) < 1e-6 * before


def test_channel_affine_keeps_gain_positive():
    yq = torch.randn(200, 3, dtype=torch.float64)
    yf = torch.stack([-yq[:, 0], torch.full((200,), 2.0, dtype=torch.float64), yq[:, 2]], 1)
    yq[:, 1] = 0.7  # constant channel: no slope can be fitted
    acc = ChannelAffine(3)
    acc.update(yq, yf)
    a, beta = acc.solve()
    assert torch.all(a > 0)
    assert float(a[0]) == 1.0 and float(a[1]) == 1.0  # negative / degenerate fits: mean shift only
    assert abs(float(beta[1]) - 1.3) < 1e-9 and abs(float(a[2]) - 1.0) < 1e-6


def test_conv_groups_divide_both_channel_counts():
    assert conv_groups(32, 16, 64) == 1
    assert conv_groups(256, 256, 64) == 4
    g = conv_groups(192, 320, 64)
    assert 192 % g == 0 and 320 % g == 0 and g == 2
