"""Low-bit adapters: the quantizer (codebook, STE), packing, and the spec's exact ViT-B/16 parameter counts and
`.bin` byte sizes (side-tuning.md §5.2)."""

from __future__ import annotations

import copy
import itertools
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from thrifty.backbones import load_backbone
from thrifty.errors import CheckpointError, ConfigError
from thrifty.tuners import get_tuned_model, make_config
from thrifty.tuners.lowbit import (
    QLinear,
    codebook,
    gaussian_l1_levels,
    pack_codes,
    packed_nbytes,
    unpack_codes,
    write_bin,
)
from thrifty.tuners.lowbit.quant import EPS


# --- codebook ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bits", "expected"),
    [(1, [-0.67449, 0.67449]), (2, [-1.26572, -0.37775, 0.37775, 1.26572])],
)
def test_codebook_levels_match_spec(bits, expected):
    assert gaussian_l1_levels(bits) == pytest.approx(expected, abs=1e-4)
    levels, thresholds = codebook(bits)
    assert levels.dtype == torch.float32 and len(thresholds) == 2**bits - 1


def test_codebook_2bit_thresholds_and_outer_levels():
    _, t = codebook(2)
    assert t.tolist() == pytest.approx([-0.82174, 0.0, 0.82174], abs=1e-4)
    assert gaussian_l1_levels(4)[-1] == pytest.approx(2.2655, abs=1e-4)
    assert gaussian_l1_levels(8)[-1] == pytest.approx(2.8095, abs=1e-4)
    for bits in (1, 2, 4, 8):
        v = gaussian_l1_levels(bits)
        assert len(v) == 2**bits and all(a < b for a, b in itertools.pairwise(v))
        assert v == pytest.approx([-x for x in reversed(v)], abs=1e-9)  # symmetric


def test_codebook_is_l1_optimal_conditional_median():
    """Each level is the median of N(0,1) restricted to its cell (the L1 Lloyd fixed point), not the mean."""
    from scipy.special import ndtr

    v = gaussian_l1_levels(2)
    t = [-math.inf, *((a + b) / 2 for a, b in itertools.pairwise(v)), math.inf]
    for i, level in enumerate(v):
        lo, hi = ndtr(t[i]), ndtr(t[i + 1])
        assert ndtr(level) == pytest.approx((lo + hi) / 2, abs=1e-9)


# --- packing ----------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(1, 400), st.integers(0, 2**31 - 1))
def test_pack_unpack_roundtrip(bits, n, seed):
    idx = torch.randint(0, 2**bits, (n,), generator=torch.Generator().manual_seed(seed))
    packed = pack_codes(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack_codes(packed, n, bits), idx)


def test_packing_is_lsb_first():
    assert pack_codes(torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0x01, 0x01]
    assert pack_codes(torch.tensor([1, 1, 0, 1]), 1).tolist() == [0b1011]
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00_11_10_01]
    assert pack_codes(torch.tensor([0xA, 0x3]), 4).tolist() == [0x3A]
    assert pack_codes(torch.tensor([200]), 8).tolist() == [200]


def test_unpack_refuses_wrong_length_and_padding():
    packed = pack_codes(torch.tensor([1, 0, 1]), 1)
    with pytest.raises(CheckpointError, match="expected 1 packed bytes"):
        unpack_codes(torch.cat([packed, packed]), 3, 1)
    with pytest.raises(CheckpointError, match="padding"):
        unpack_codes(torch.tensor([0xFF], dtype=torch.uint8), 3, 1)


# --- quantizer and STE ------------------------------------------------------------------------------------------
def test_one_bit_forward_is_mean_plus_minus_sigma():
    torch.manual_seed(0)
    q = QLinear(16, 8, bits=1)
    w = q.weight.detach()
    expected = w.mean() + 0.67449 * w.std() * torch.sign(w - w.mean())
    torch.testing.assert_close(q.effective_weight(), expected, atol=1e-5, rtol=0)
    x = torch.randn(3, 16)
    torch.testing.assert_close(q(x), x @ q.effective_weight().T)


def _reference_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    """binary_adapter/utils.py QLinear, literally: (Wn + (q(Wn) - Wn).detach()) * std + mean, with the
    sign-sum lookup q(x) = sum_j sign(x - t_j) * (v_j+1 - v_j) / 2."""
    levels, t = codebook(bits)
    mean, std = w.mean(), w.std()
    wn = (w - mean) / (std + EPS)
    steps = (levels[1:] - levels[:-1]) / 2
    wq = (torch.sign(wn.unsqueeze(-1) - t) * steps).sum(-1)
    return (wn + (wq - wn).detach()) * std + mean


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_ste_gradient_matches_reference(bits):
    torch.manual_seed(bits)
    q = QLinear(24, 12, bits=bits)
    w_ref = q.weight.detach().clone().requires_grad_(True)
    x, g = torch.randn(5, 24), torch.randn(5, 12)
    (q(x) * g).sum().backward()
    (torch.nn.functional.linear(x, _reference_weight(w_ref, bits)) * g).sum().backward()
    torch.testing.assert_close(q.effective_weight(), _reference_weight(w_ref, bits), atol=1e-6, rtol=0)
    torch.testing.assert_close(q.weight.grad, w_ref.grad, atol=1e-6, rtol=1e-5)


def test_ste_gradient_closed_form():
    """dL/dW = A/(s+e) + gmu/n + gsigma*(W-mu)/((n-1)s), A = G*s, gsigma = sum(G*Wq) - sum(A*(W-mu))/(s+e)^2,
    gmu = sum(G) - sum(A)/(s+e): identity STE through Wn plus the paths through mu and sigma."""
    torch.manual_seed(3)
    q = QLinear(10, 6, bits=1)
    G = torch.randn(6, 10)
    (q.effective_weight() * G).sum().backward()
    w = q.weight.detach()
    n, mu, s = w.numel(), w.mean(), w.std()
    z = w - mu
    wq = 0.6744897501960817 * torch.sign(z)
    A = G * s
    g_sigma = (G * wq).sum() - (A * z).sum() / (s + EPS) ** 2
    g_mu = G.sum() - A.sum() / (s + EPS)
    expected = A / (s + EPS) + g_mu / n + g_sigma * z / ((n - 1) * s)
    torch.testing.assert_close(q.weight.grad, expected, atol=1e-5, rtol=1e-4)


def test_qlinear_validation():
    with pytest.raises(ConfigError, match="bits"):
        QLinear(4, 4, bits=3)
    with pytest.raises(ConfigError, match="bits"):
        make_config("bi_lora", {"bits": "16"})
    with pytest.raises(ConfigError, match="dim"):
        make_config("bi_adaptformer", {"dim": "0"})
    assert make_config("bi_lora", {"bit": "2", "s": "10"}).bits == 2


# --- ViT-B/16: spec's counts and byte-exact .bin sizes ------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b():
    torch.manual_seed(0)
    return load_backbone("timm:vit_base_patch16_224", pretrained=False)


CASES = [  # method, dim, adapter params, adapter .bin bytes (spec table)
    ("bi_adaptformer", 32, 589_824, 73_920),
    ("bi_adaptformer", 1, 18_432, 2_496),
    ("bi_lora", 32, 1_179_648, 147_840),
    ("bi_lora", 1, 36_864, 4_992),
]


@pytest.mark.parametrize(("method", "dim", "params", "nbytes"), CASES)
def test_vit_b_params_and_bin_sizes(vit_b, tmp_path, method, dim, params, nbytes):
    for bi_head, classes in ((True, 100), (False, 10)):
        cfg = make_config(method, {"dim": str(dim), "bi_head": str(bi_head)})
        model = get_tuned_model(copy.deepcopy(vit_b), cfg, classes)
        assert model.num_trainable(include_head=False) == params
        head = 96 * classes + 8 if bi_head else 3076 * classes
        assert model.describe()["head_params"] == (768 * classes if bi_head else 769 * classes)
        sizes = model.bin_bytes()
        assert (sizes["bin_adapter_bytes"], sizes["bin_head_bytes"]) == (nbytes, head)
        path = os.path.join(tmp_path, f"{method}-{dim}-{bi_head}.bin")
        assert write_bin(model, path) == os.path.getsize(path) == nbytes + head


def test_vit_b_released_file_sizes(vit_b, tmp_path):
    """adaptformer-bihead/cifar-bit1-dim1.bin = 12,104 B and lora-bihead/cifar-bit1-dim1.bin = 14,600 B."""
    for method, size in (("bi_adaptformer", 12_104), ("bi_lora", 14_600)):
        cfg = make_config(method, {"bits": "1", "dim": "1", "bi_head": "true"})
        model = get_tuned_model(copy.deepcopy(vit_b), cfg, 100)
        assert write_bin(model, os.path.join(tmp_path, "x.bin")) == size
