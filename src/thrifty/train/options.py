"""The options of a training run as data: one table that the CLI turns into `thrifty train`'s flags and the
benchmark harness uses to validate suite files and render a cell's argv (no one reads argparse internals)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from thrifty.runtime import MALLOC_MODES


@dataclass(frozen=True)
class Option:
    """One `--flag`: `type` None is a switch (store_true); `repeat` collects repeated flags in a list."""

    flag: str
    group: str
    type: type | None = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None
    required: bool = False
    repeat: bool = False
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def is_switch(self) -> bool:
        return self.type is None


BACKBONE = (
    Option(
        "--backbone", "backbone", required=True, help="a spec (`thrifty list backbones`): timm:<name>, minilm, ..."
    ),
    Option("--checkpoint", "backbone", help="local weights: .safetensors, .pth, Google ViT .npz, or a HF model dir"),
    Option("--random-init", "backbone", None, help="random weights (no download); for smoke tests"),
    Option("--max-length", "backbone", int, help="text backbones: tokens per sample (default 128)"),
    Option("--image-size", "backbone", int, help="image backbones: input resolution (default: the model's)"),
)
DATA = (
    Option(
        "--data",
        "data",
        required=True,
        help="a spec: `thrifty list datasets` (fashion-mnist, reviews, vtab:PATH, imagefolder:PATH, ...); "
        "append :1k for the few-sample protocol",
    ),
    Option("--test-size", "data", int, help="cap the test split (stratified subsample)"),
    Option("--split-seed", "data", int, help="seed of the 1k split draw (default: --seed)"),
)
METHOD = (
    Option("--method", "method", required=True, help="a registered method (`thrifty list methods`): lora, last, ..."),
    Option(
        "--objective",
        "method",
        help="what to optimise and report (`thrifty list objectives`); default: the data's own, else classification",
    ),
)
TRAINING = (
    Option("--epochs", "training", int, 10),
    Option("--batch-size", "training", int, 32, help="global batch (split across torchrun ranks)"),
    Option("--lr", "training", float, help="default: the method's (1e-3; full fine-tuning 1e-4)"),
    Option("--weight-decay", "training", float, 1e-4),
    Option("--warmup-epochs", "training", float, 1.0),
    Option("--min-lr", "training", float, 1e-6),
    Option("--grad-clip", "training", float, 1.0, help="max gradient norm (0 disables)"),
    Option("--optimizer", "training", str, "adamw", choices=("adamw", "sgd"), help="sgd: momentum 0.9"),
    Option("--label-smoothing", "training", float, 0.0),
    Option("--seed", "training", int, 0),
    Option("--device", "training", str, "auto", help="auto | cpu | cuda | cuda:N"),
    Option("--no-amp", "training", None, help="disable bf16 autocast on CUDA"),
    Option(
        "--select-on-val",
        "training",
        None,
        help="train on the tuning split (train800), keep the best epoch on val (val200), report test",
    ),
    Option("--no-progress", "training", None, help="no progress bars"),
    Option(
        "--malloc",
        "training",
        str,
        "tuned",
        choices=MALLOC_MODES,
        help="CPU: `tuned` keeps freed large blocks for reuse (glibc; fewer page faults per step), `system` leaves "
        "the allocator alone",
    ),
    Option(
        "--keep-denormals",
        "training",
        None,
        help="CPU: do not flush subnormal floats to zero during training (slower once attention sharpens)",
    ),
)
OUTPUT = (
    Option("--output", "output", required=True, help="run directory (adapter files, results.json, checkpoint)"),
    Option("--resume", "output", None, help="continue from the checkpoint in --output"),
    Option("--overwrite", "output", None, help="replace finished results in --output"),
    Option("--no-peak-memory", "output", None, help="skip the fresh-process peak-memory measurement"),
    Option("--keep-checkpoint", "output", None, help="keep checkpoint.safetensors after success"),
)
SIDE = (
    Option("--cache", "side methods", help="feature-cache dir (thrifty extract): train a side method on cached taps"),
    Option("--remote", "side methods", metavar="URL", help="feature server (thrifty serve): edge training"),
    Option("--token-file", "side methods", help="file holding the feature server's bearer token"),
    Option(
        "--keep-features",
        "side methods",
        None,
        help="keep the temporary feature cache of a --remote run without --cache (OUTPUT/features); by default it "
        "is removed after a successful run (a --cache DIR is always kept)",
    ),
    Option(
        "--skip-disk-check",
        "side methods",
        None,
        help="extract features even when the estimate exceeds the free disk space (default: refuse)",
    ),
    Option(
        "--sweep",
        "side methods",
        repeat=True,
        metavar="KEY=V1,V2",
        help="train every combination together on one backbone pass (repeatable; training or method options); "
        "writes one run per combination under --output plus summary.md",
    ),
)
TRAIN_COMMAND = (*BACKBONE, *DATA, *METHOD, *TRAINING, *OUTPUT, *SIDE)
"""Every flag of `thrifty train` (besides -c/--config and --set)."""


def train_options() -> dict[str, Option]:
    """`thrifty train`'s options by dest (e.g. 'batch_size')."""
    return {o.dest: o for o in TRAIN_COMMAND}


def options_to_argv(values: dict[str, Any]) -> list[str]:
    """{'batch_size': 64, 'random_init': True} -> ['--batch-size', '64', '--random-init'] (False/None dropped)."""
    options = train_options()
    out: list[str] = []
    for key in sorted(values):
        value, option = values[key], options[key]
        if option.is_switch:
            if value:
                out.append(option.flag)
        elif value is not None:
            out += [option.flag, str(value)]
    return out
