import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from _dist import torchrun
from conftest import TINY_TRAIN
from thrifty.data import load_data
from thrifty.data.sampler import GlobalBatchSampler
from thrifty.errors import NonFiniteLossError, ResultsExistError
from thrifty.io import read_json
from thrifty.train import TrainConfig, Trainer
from thrifty.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from thrifty.train.optim import cosine_lr, param_groups
from thrifty.tuners import get_tuned_model, make_config


def _setup(tiny_vit_factory, epochs=3, method="adaptformer", **kw):
    bb = tiny_vit_factory(0)
    task = load_data("digits:1k", bb.preprocess, seed=0, test_size=100)
    torch.manual_seed(0)
    model = get_tuned_model(bb, make_config(method, {"bottleneck": "4", "dropout": "0.2"}), task.num_classes)
    cfg = TrainConfig(epochs=epochs, batch_size=100, lr=5e-3, seed=0, progress=False, **kw)
    return model, task, cfg


def _params(model):
    return {n: p.detach().clone() for n, p in model.trainable_named_parameters()}


def test_resume_after_interruption_is_exact(tmp_path, tiny_vit_factory, monkeypatch):
    model, task, cfg = _setup(tiny_vit_factory)
    full = Trainer(model, task, cfg, str(tmp_path / "a")).fit()
    ref = _params(model)

    model, task, cfg = _setup(tiny_vit_factory)
    trainer = Trainer(model, task, cfg, str(tmp_path / "b"))
    original = Trainer._train_epoch

    def die_at_epoch_2(self, epoch):
        if epoch == 2:
            raise KeyboardInterrupt
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", die_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(str(tmp_path / "b" / CHECKPOINT_NAME))["state"]["epoch"] == 1
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    with pytest.raises(ResultsExistError, match="--resume"):
        Trainer(*_setup(tiny_vit_factory)[:1], task, cfg, str(tmp_path / "b")).fit()

    model, task, cfg = _setup(tiny_vit_factory)
    resumed = Trainer(model, task, cfg, str(tmp_path / "b")).fit(resume=True)
    assert resumed["epochs_run_this_session"] == 1
    for n, p in _params(model).items():
        assert torch.equal(p, ref[n]), n
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in full["history"]]


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, tiny_vit_factory, monkeypatch):
    model, task, cfg = _setup(tiny_vit_factory)
    trainer = Trainer(model, task, cfg, str(tmp_path))
    original = Trainer._train_epoch

    def poison(self, epoch):
        if epoch == 1:
            with torch.no_grad():
                self.model.head.weight.fill_(float("nan"))
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", poison)
    with pytest.raises(NonFiniteLossError, match="loss became nan at epoch 2"):
        trainer.fit()
    ck = load_checkpoint(str(tmp_path / CHECKPOINT_NAME))
    assert ck["state"]["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_select_on_val_uses_tuning_splits(tmp_path, tiny_vit_factory):
    model, task, cfg = _setup(tiny_vit_factory, epochs=2, select_on_val=True)
    trainer = Trainer(model, task, cfg, None)
    assert trainer.train_set is task.split("tune_train") and len(trainer.train_set) == 800
    out = trainer.fit()
    assert out["selected_epoch"] in (0, 1) and "val_accuracy" in out
    assert out["val_accuracy"] == max(h["val_accuracy"] for h in out["history"])


def test_sampler_splits_global_batches_across_ranks():
    single = list(GlobalBatchSampler(10, 4, seed=1))
    ranks = [list(GlobalBatchSampler(10, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 3
    for k, batch in enumerate(single):
        assert ranks[0][k] + ranks[1][k] == batch
    assert list(GlobalBatchSampler(10, 4, seed=2)) != single


def test_optimizer_groups_and_schedule(tiny_vit):
    model = get_tuned_model(tiny_vit, make_config("full"), 3)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    lrs = [cosine_lr(s, 100, 1.0, 10, 0.0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _cli(*args, env=None):
    return [sys.executable, "-m", "thrifty.cli.main", *args]


TRAIN_ARGS = [*TINY_TRAIN, "--method", "lora", "--set", "r=2", "--no-peak-memory"]


def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        _cli(*TRAIN_ARGS, "--epochs", "2", "--output", str(tmp_path / "single")),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            *torchrun(2),
            "-m",
            "thrifty.cli.main",
            *TRAIN_ARGS,
            "--epochs",
            "2",
            "--output",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(str(tmp_path / "single" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ra, rb = read_json(tmp_path / "single" / "results.json"), read_json(tmp_path / "ddp" / "results.json")
    assert abs(ra["metrics"]["test_accuracy"] - rb["metrics"]["test_accuracy"]) <= 0.02


def test_cli_kill_and_resume_matches_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(
        _cli(*TRAIN_ARGS, "--epochs", "3", "--output", str(tmp_path / "ref")),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cli(*TRAIN_ARGS, "--epochs", "3", "--output", str(out)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (out / CHECKPOINT_NAME).exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "results.json").exists():
        pytest.skip("the run finished before it could be killed")
    again = subprocess.run(
        _cli(*TRAIN_ARGS, "--epochs", "3", "--output", str(out), "--resume"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-2000:]
    ra, rb = read_json(tmp_path / "ref" / "results.json"), read_json(out / "results.json")
    assert rb["metrics"]["epochs_run_this_session"] < 3
    assert ra["metrics"]["test_accuracy"] == rb["metrics"]["test_accuracy"]
    a, b = (
        load_file(str(tmp_path / "ref" / "adapter_model.safetensors")),
        load_file(str(out / "adapter_model.safetensors")),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)
