"""thrifty.runtime.denormals: subnormal floats flushed to zero on every CPU thread torch uses, during a fit only."""

from __future__ import annotations

import pytest
import torch

from thrifty.cli.common import add_train_args, train_config
from thrifty.data import load_data
from thrifty.features import FeatureCache, extract_features
from thrifty.runtime.denormals import flushed_denormals, set_flush_denormal_all, thread_flushes_denormals
from thrifty.train import TrainConfig, Trainer
from thrifty.tuners import get_tuned_model, make_config


SUPPORTED = torch.set_flush_denormal(False)  # False on CPUs without FTZ/DAZ (then nothing can be flushed)
pytestmark = pytest.mark.skipif(not SUPPORTED, reason="this CPU has no flush-to-zero mode")


@pytest.fixture
def two_threads():
    """torch with a 2-thread OpenMP pool that already exists before any flushing (as after loading a backbone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    torch.ones(1 << 20).mul(2.0)  # a parallel op: the pool's threads are created now, without FTZ
    yield
    set_flush_denormal_all(False)
    torch.set_num_threads(before)


def zero_fraction() -> float:
    """Share of a 4M-element subnormal tensor read as 0 by a parallel elementwise op (split across the pool). The
    tensor is made from its bit pattern: a float literal would itself be flushed by the calling thread."""
    subnormal = torch.full((1 << 22,), 1 << 20, dtype=torch.int32).view(torch.float32)  # 2^-129, about 1.5e-39
    return subnormal.mul(1.0).eq(0).float().mean().item()


def test_torch_setting_reaches_only_the_calling_thread(two_threads):
    """Why the module exists: torch.set_flush_denormal leaves the pool's other thread computing subnormals."""
    torch.set_flush_denormal(True)
    assert thread_flushes_denormals()
    assert 0.0 < zero_fraction() < 1.0


def test_flush_reaches_every_pool_thread_and_is_restored(two_threads):
    assert zero_fraction() == 0.0 and not thread_flushes_denormals()
    with flushed_denormals() as state:
        assert state == "flushed (2 of 2 threads)"
        assert zero_fraction() == 1.0
        torch.set_num_threads(1)  # a smaller team later, then a bigger one again: still flushed
        assert zero_fraction() == 1.0
        torch.set_num_threads(2)
        assert zero_fraction() == 1.0
    assert zero_fraction() == 0.0 and not thread_flushes_denormals()
    with flushed_denormals(False) as state:
        assert state == "kept" and zero_fraction() == 0.0
    with flushed_denormals(True, "meta") as state:  # only CPU threads are touched
        assert state == "kept" and zero_fraction() == 0.0


def test_an_outer_flush_is_left_in_place(two_threads):
    set_flush_denormal_all(True)
    with flushed_denormals() as state:
        assert state == "flushed (2 of 2 threads)"
    assert zero_fraction() == 1.0  # the caller had it on before the block: still on


def test_trainer_flushes_during_fit_only_and_records_it(tiny_vit_factory, two_threads, monkeypatch):
    bb = tiny_vit_factory(0)
    task = load_data("digits:1k", bb.preprocess, seed=0, test_size=50)
    seen = []
    original = Trainer._train_epoch

    def spy(self, epoch):
        seen.append(zero_fraction())
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    for flush, state, fraction in ((True, "flushed (2 of 2 threads)", 1.0), (False, "kept", 0.0)):
        seen.clear()
        model = get_tuned_model(bb, make_config("linear"), task.num_classes)
        cfg = TrainConfig(epochs=2, batch_size=250, progress=False, device="cpu", flush_denormal=flush)
        out = Trainer(model, task, cfg).fit()
        assert out["denormals"] == state and seen == [fraction, fraction]
        assert zero_fraction() == 0.0


def test_extraction_flushes_like_training(tmp_path, tiny_vit_factory, two_threads, monkeypatch):
    """Cached taps are computed under the same numerics as a run on the inputs (which flushes by default)."""
    bb = tiny_vit_factory(0)
    task = load_data("digits:1k", bb.preprocess, seed=0, test_size=50)
    seen = []
    original = FeatureCache.extract_split

    def spy(self, *args, **kwargs):
        seen.append(zero_fraction())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FeatureCache, "extract_split", spy)
    extract_features(str(tmp_path / "a"), bb, task, ["pooled"], splits=["test"])
    extract_features(str(tmp_path / "b"), bb, task, ["pooled"], splits=["test"], flush_denormal=False)
    assert seen == [1.0, 0.0] and zero_fraction() == 0.0


def test_cli_flag():
    import argparse

    parser = argparse.ArgumentParser()
    add_train_args(parser)
    assert train_config(parser.parse_args([])).flush_denormal is True
    assert train_config(parser.parse_args(["--keep-denormals"])).flush_denormal is False
