"""Edge training survives the feature server being killed (SIGKILL) and restarted mid-run: the client retries
with backoff and the run ends exactly as an uninterrupted one (same features, losses, accuracy, weights)."""

import glob
import os
import threading

import numpy as np
import torch

from serve_util import server_args, write_checkpoint, write_token
from thrifty.backbones.remote import FeatureClient
from thrifty.io import load_tensors
from thrifty.serve.process import ServerProcess
from thrifty.train import TrainConfig, run_training


torch.set_num_threads(1)


def edge_run(url, token_file, out):
    return run_training(
        backbone="timm:test_vit",
        data="digits:1k",
        method="miet",
        overrides={"r": "4"},
        test_size=100,
        peak_memory=False,
        train=TrainConfig(epochs=1, batch_size=50, progress=False),
        output_dir=str(out),
        remote=url,
        token_file=token_file,
        keep_features=True,  # the arrays are compared below (by default the temporary cache goes after the run)
    )


def cache_arrays(run_dir):
    files = sorted(glob.glob(os.path.join(run_dir, "features", "*", "*", "*.npy")))
    return {os.path.relpath(f, run_dir): np.load(f) for f in files}


def test_server_killed_and_restarted_during_edge_training(tmp_path, monkeypatch):
    ck, tok = write_checkpoint(tmp_path / "ck.safetensors"), write_token(tmp_path / "token")
    server = ServerProcess(server_args(ck, tok, "--max-batch", "16"))
    url = server.start()
    restarts = []
    try:
        ref = edge_run(url, tok, tmp_path / "ref")
        real, calls = FeatureClient.gather, []

        def gather_then_kill(self, **kw):
            out = real(self, **kw)
            calls.append(1)
            if len(calls) == 3:  # SIGKILL the server after the 3rd answer, restart it on the same port
                server.kill()
                restarts.append(threading.Thread(target=server.start))
                restarts[-1].start()
            return out

        monkeypatch.setattr(FeatureClient, "gather", gather_then_kill)
        run = edge_run(url, tok, tmp_path / "killed")
    finally:
        for t in restarts:
            t.join()
        server.stop()
    assert len(restarts) == 1 and server.url == url
    m, r = run["metrics"], ref["metrics"]
    assert m["remote_retries"] > 0 == r["remote_retries"]
    assert m["remote_samples_received"] == r["remote_samples_received"] == 1100  # train800val200 + test
    assert m["remote_bytes_received"] == r["remote_bytes_received"] > 1100 * 640
    a, b = cache_arrays(tmp_path / "ref"), cache_arrays(tmp_path / "killed")
    assert a.keys() == b.keys() and len(a) == 5 and all(np.array_equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in run["history"]] == [h["train_loss"] for h in ref["history"]]
    assert m["test_accuracy"] == r["test_accuracy"] and m["test_loss"] == r["test_loss"]
    wa, wb = (load_tensors(str(tmp_path / n / "adapter_model.safetensors")) for n in ("ref", "killed"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
