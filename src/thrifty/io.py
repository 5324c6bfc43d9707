"""Atomic file writes and safe loading of the files thrifty writes (safetensors and JSON only)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from thrifty.errors import CheckpointError, ConfigError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`, so a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, sorted keys, indent 2 (PEFT's adapter_config.json style)."""

    def _write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=True, default=_json_default)
            fh.write("\n")

    atomic_write(path, _write)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); delete it or re-create it") from exc


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    """Write a safetensors file atomically; tensors are made contiguous and de-aliased first."""
    clean = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    meta = {"format": "pt", **(metadata or {})}

    def write(tmp: str) -> None:
        save_file(clean, tmp, metadata=meta)
        _sort_metadata(tmp)

    atomic_write(path, write)


def _sort_metadata(path: str) -> None:
    """Rewrite a safetensors header in place with its `__metadata__` keys sorted, so the same tensors and metadata
    give the same bytes (the library writes metadata from a hash map, in a different order on every call). Only
    the order changes, so the header keeps its length; if it would not (another JSON spelling), it is left as is."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size).rstrip(b" ")
        header = json.loads(raw)
        if "__metadata__" not in header:
            return
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        ordered = {"__metadata__": dict(sorted(header["__metadata__"].items())), **tensors}
        new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) == len(raw) and json.loads(new) == header:
            fh.seek(8)
            fh.write(new)


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning corruption into a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); it may be truncated") from exc


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or JSON file holding a mapping: `-c/--config` files, benchmark suites."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as fh:
        text = fh.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); YAML files must end in .yaml/.yml") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values")
    return data
