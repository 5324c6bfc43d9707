"""thrifty.io: safetensors files are byte-deterministic and safe to load."""

import os

import pytest
import torch
from safetensors import safe_open

from thrifty.errors import CheckpointError
from thrifty.io import load_tensors, save_tensors


TENSORS = {"up.weight": torch.arange(6.0).view(2, 3), "up.bias": torch.ones(3, dtype=torch.float16)}
META = {f"key{i}": f"value {i}" for i in range(8)} | {"unicode": "é ✓"}


def test_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    files = []
    for i, order in enumerate((list(META), list(reversed(META)), sorted(META, key=lambda k: META[k][::-1]))):
        path = tmp_path / f"{i}.safetensors"
        save_tensors(path, TENSORS, {k: META[k] for k in order})
        files.append(path.read_bytes())
    assert files[0] == files[1] == files[2]  # the library alone writes its metadata map in a random order
    size = int.from_bytes(files[0][:8], "little")
    assert (8 + size) % 8 == 0  # data stays 8-byte aligned
    header = files[0][8 : 8 + size].decode()
    positions = [header.index(f'"{k}"') for k in sorted({"format", *META})]
    assert positions == sorted(positions)
    with safe_open(str(tmp_path / "0.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pt", **META}
    loaded = load_tensors(tmp_path / "0.safetensors")
    assert loaded.keys() == TENSORS.keys() and all(torch.equal(loaded[k], v) for k, v in TENSORS.items())
    assert sorted(os.listdir(tmp_path)) == ["0.safetensors", "1.safetensors", "2.safetensors"]  # no temp files left


def test_truncated_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "a.safetensors"
    save_tensors(path, TENSORS)
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        load_tensors(path)
