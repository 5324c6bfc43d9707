"""Quantization configs (torchao style): `PTQConfig` and the compensation configs that wrap it (`base_config`).

    quantize_(model, QwTConfig(base_config=PTQConfig(w_bits=4, a_bits=8)), calib_data=batches)

`step` follows the one calibration vocabulary (thrifty.compress.calibration). In a wrapper, the wrapper's
`step` drives; the base config's `step` is ignored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from thrifty.compress.calibration import check_step
from thrifty.errors import ConfigError
from thrifty.values import check


SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
FLOAT_ACT_BITS = 16  # a_bits=16: activations stay float (weight-only quantization, e.g. W4A16)
CLI_BITS = (4, 6, 8)
SOFTMAX_QUANTIZERS = ("log2", "uniform")
FORMAT_VERSION = 1


def parse_bits(text: str, allowed: tuple[int, ...] = CLI_BITS) -> tuple[int, int]:
    """'w4a8' -> (4, 8); each width must be in `allowed`; activations may also be 16 (float: weight-only)."""
    m = re.fullmatch(r"[wW](\d+)[aA](\d+)", text.strip())
    if not m:
        raise ConfigError(f"bit widths {text!r} must look like w4a8 (weights 4 bits, activations 8 bits)")
    w, a = int(m.group(1)), int(m.group(2))
    if w not in allowed or a not in (*allowed, FLOAT_ACT_BITS):
        raise ConfigError(
            f"bit widths {text!r}: weights must be one of {allowed}, activations one of {allowed} or 16 (float)"
        )
    return w, a


class _QuantConfig:
    method: ClassVar[str] = ""
    cli_flags: ClassVar[tuple[str, ...]] = ("bits",)  # `thrifty compress --method ptq --bits w4a8`

    def to_dict(self) -> dict[str, Any]:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = v.to_dict() if isinstance(v, _QuantConfig) else list(v) if isinstance(v, tuple) else v
        d["method"] = self.method
        return d

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


@dataclass
class PTQConfig(_QuantConfig):
    """Base PTQ (RepQ-ViT-style, without its scale reparameterization; see docs/methods.md).

    Weights per output channel, activations layer-wise (inputs of every Linear/Conv2d, the q/k/v projection outputs
    and, with `softmax_quant`, the post-softmax probabilities through a log2 quantizer). The first layer (patch
    embedding / stem, when outside the blocks) and the last layer (classifier) use `edge_bits`.
    """

    method: ClassVar[str] = "ptq"

    w_bits: int = field(default=8, metadata={"help": "weight bits (per output channel)"})
    a_bits: int = field(default=8, metadata={"help": "activation bits (layer-wise)"})
    step: str = field(default="prepare", metadata={"help": "prepare | convert | prepare_for_loading"})
    edge_bits: int | None = field(default=8, metadata={"help": "bits of the first and last layers; None = same"})
    weight_symmetric: bool = field(default=True, metadata={"help": "symmetric int weights (zero point 0)"})
    qkv_quant: bool = field(default=True, metadata={"help": "quantize q, k, v (outputs of their projections)"})
    softmax_quant: bool = field(default=True, metadata={"help": "quantize post-softmax attention"})
    softmax_quantizer: str = field(
        default="log2",
        metadata={
            "help": "log2 (RepQ-ViT) | uniform (uint8, zero point 0: runs P x V on integer kernels in onnxruntime)"
        },
    )
    embedding_bits: int | str | None = field(
        default="auto",
        metadata={
            "help": "nn.Embedding tables: symmetric int codes, per row (> 4 bits) or per block of "
            "`embedding_block_size` (<= 4 bits: onnxruntime's GatherBlockQuantized on int4); None = float; "
            "auto = 4 when w_bits <= 4, else 8"
        },
    )
    embedding_block_size: int = field(
        default=128, metadata={"help": "<= 4-bit tables: values per scale along a row (power of 2, >= 16)"}
    )
    weight_block_size: int | None = field(
        default=None,
        metadata={
            "help": "<= 4-bit Linear weights: one scale per block of this many inputs along a row (power of 2, "
            ">= 16, dividing in_features; the ONNX export's MatMulNBits block); None = one scale per output channel"
        },
    )
    half_params: bool = field(
        default=True,
        metadata={
            "help": "weight / table scales (and, when PTQ packs, quantized layers' biases) rounded to float16 "
            "values (relative change <= 2^-11), so the ONNX export stores them exactly in half the bytes"
        },
    )
    percentiles: tuple[float, ...] = field(default=(0.999, 0.9999, 0.99999), metadata={"help": "range search"})
    lp_norm: float = field(default=2.0, metadata={"help": "p of the L_p error the range search minimises"})
    observer_samples: int = field(default=2**17, metadata={"help": "values kept per activation quantizer"})
    fold_bn: bool = field(default=True, metadata={"help": "fold BatchNorm into the preceding conv"})
    conv_output_quant: bool = field(
        default=False,
        metadata={
            "help": "quantize every conv output with the quantizer of its consumer (CNN residual stream included): "
            "the ONNX export then runs on QLinearConv / QLinearAdd in onnxruntime (8-bit activations only)"
        },
    )
    pack: bool = field(default=True, metadata={"help": "drop float weights after convert (deployable form)"})
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.step = check_step(self.step)
        check(self.w_bits in SUPPORTED_BITS, f"`w_bits` must be one of {SUPPORTED_BITS}, got {self.w_bits!r}")
        check(
            self.a_bits in (*SUPPORTED_BITS, FLOAT_ACT_BITS),
            f"`a_bits` must be one of {SUPPORTED_BITS} or 16 (float activations), got {self.a_bits!r}",
        )
        check(
            self.softmax_quantizer in SOFTMAX_QUANTIZERS,
            f"`softmax_quantizer` must be one of {SOFTMAX_QUANTIZERS}, got {self.softmax_quantizer!r}",
        )
        if self.embedding_bits == "auto":
            self.embedding_bits = 4 if self.w_bits <= 4 else 8
        check(
            self.embedding_bits is None or self.embedding_bits in SUPPORTED_BITS,
            f"`embedding_bits` must be None or one of {SUPPORTED_BITS}, got {self.embedding_bits!r}",
        )
        check(
            self.embedding_block_size >= 16 and self.embedding_block_size & (self.embedding_block_size - 1) == 0,
            f"`embedding_block_size` must be a power of 2 >= 16, got {self.embedding_block_size!r}",
        )
        check(
            self.weight_block_size is None
            or (
                isinstance(self.weight_block_size, int)
                and self.weight_block_size >= 16
                and self.weight_block_size & (self.weight_block_size - 1) == 0
            ),
            f"`weight_block_size` must be None or a power of 2 >= 16, got {self.weight_block_size!r}",
        )
        check(
            self.weight_block_size is None or self.w_bits <= 4,
            f"`weight_block_size` applies to <= 4-bit weights (MatMulNBits); w_bits={self.w_bits}: set "
            "weight_block_size=None or w_bits <= 4",
        )
        check(
            self.edge_bits is None or self.edge_bits in SUPPORTED_BITS,
            f"`edge_bits` must be None or one of {SUPPORTED_BITS}, got {self.edge_bits!r}",
        )
        self.percentiles = tuple(float(p) for p in self.percentiles)
        check(
            len(self.percentiles) > 0 and all(0.5 < p <= 1.0 for p in self.percentiles),
            f"`percentiles` must be values in (0.5, 1], got {self.percentiles!r}",
        )
        check(
            not self.conv_output_quant or self.a_bits == 8,
            f"`conv_output_quant` needs 8-bit activations (QLinearConv is uint8), got a_bits={self.a_bits}",
        )
        check(self.lp_norm > 0, f"`lp_norm` must be positive, got {self.lp_norm!r}")
        check(self.observer_samples >= 1024, f"`observer_samples` must be >= 1024, got {self.observer_samples!r}")


@dataclass
class _CompensationConfig(_QuantConfig):
    base_config: PTQConfig = field(default_factory=PTQConfig, metadata={"help": "the PTQ that is compensated"})
    step: str = field(default="prepare", metadata={"help": "prepare | convert | prepare_for_loading"})
    calib_samples: int = field(default=512, metadata={"help": "samples recorded for the compensation fit"})
    cache_hidden: bool = field(
        default=True,
        metadata={
            "help": "keep the block inputs of all samples (float32, like the reference code); False "
            "re-runs the quantized prefix per batch (memory of one batch, quadratic time in depth)"
        },
    )

    def __post_init__(self) -> None:
        self.step = check_step(self.step)
        if isinstance(self.base_config, dict):
            self.base_config = PTQConfig(**{k: v for k, v in self.base_config.items() if k != "method"})
        check(isinstance(self.base_config, PTQConfig), f"`base_config` must be a PTQConfig, got {self.base_config!r}")
        check(self.calib_samples > 0, f"`calib_samples` must be positive, got {self.calib_samples!r}")


@dataclass
class QwTConfig(_CompensationConfig):
    """QwT (CVPR 2025): per block `out = Block_q(X) + X W + b`, closed form on the quantized prefix's inputs.

    Token blocks get a dense (d_in x d_out) linear compensation; CNN blocks a grouped conv (kernel `kernel_size`,
    `groups = max(C_in // group_factor, 1)` reduced to divide both channel counts). `ridge=None` uses the released
    code's choices: plain OLS for token blocks, 1e-3 for CNN blocks.
    """

    method: ClassVar[str] = "qwt"

    ridge: float | None = field(default=None, metadata={"help": "lambda of (X'X + lambda I)"})
    r2_gate: bool = field(default=True, metadata={"help": "R^2 <= 0 -> zero compensation for that block"})
    start_block: int = field(default=0, metadata={"help": "blocks before it stay uncompensated"})
    group_factor: int = field(default=64, metadata={"help": "CNN: groups = C_in // group_factor"})
    kernel_size: int = field(default=1, metadata={"help": "CNN: compensation kernel size (odd)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.ridge is None or self.ridge >= 0, f"`ridge` must be None or >= 0, got {self.ridge!r}")
        check(self.start_block >= 0, f"`start_block` must be >= 0, got {self.start_block!r}")
        check(self.group_factor >= 1, f"`group_factor` must be >= 1, got {self.group_factor!r}")
        check(self.kernel_size % 2 == 1, f"`kernel_size` must be odd, got {self.kernel_size!r}")


@dataclass
class QwTV2Config(_CompensationConfig):
    """QwT-v2 CWAC: `y <- a * y_q + beta` per output channel of every quantized Linear/Conv2d, fitted in closed
    form, layer after layer on the quantized prefix; `fold=True` moves a into the weight scales, beta into the bias.
    """

    method: ClassVar[str] = "qwt_v2"

    eps: float = field(default=1e-8, metadata={"help": "added to Var(y_q) in a = Cov / Var"})
    target: str = field(
        default="model",
        metadata={"help": "y_fp = the float model's activation (model) or the float layer on the same input (layer)"},
    )
    fold: bool = field(default=True, metadata={"help": "fold a, beta into scales and biases (needs pack)"})
    skip_modules: tuple[str, ...] = field(
        default=(),
        metadata={"help": "quantized layers left without an affine: exact name, name suffix or regex (fullmatch)"},
    )
    fit: str = field(
        default="ls",
        metadata={"help": "a_c estimator: ls (Cov/Var, the paper's) | moments (Std ratio) | bias (a = 1)"},
    )
    layernorm: bool = field(
        default=False,
        metadata={"help": "also fit a per-channel affine on LayerNorm outputs, folded into the LayerNorm's affine"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.skip_modules, str):
            self.skip_modules = (self.skip_modules,)
        self.skip_modules = tuple(self.skip_modules)
        for pat in self.skip_modules:
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"`skip_modules`: {pat!r} is not a valid regex ({e}); fix or escape it") from e
        check(self.eps >= 0, f"`eps` must be >= 0, got {self.eps!r}")
        check(self.fit in ("ls", "moments", "bias"), f"`fit` must be ls, moments or bias, got {self.fit!r}")
        check(self.target in ("layer", "model"), f"`target` must be layer or model, got {self.target!r}")
        check(
            not (self.fold and not self.base_config.pack),
            "`fold=True` needs `base_config.pack=True` (the float weights must be gone before the bias changes)",
        )


QUANT_CONFIGS: dict[str, type] = {"ptq": PTQConfig, "qwt": QwTConfig, "qwt_v2": QwTV2Config}


def make_quant_config(method: str, bits: str | tuple[int, int], **options: Any):
    """Config for `method` (ptq | qwt | qwt_v2) at `bits` ('w4a8' or (4, 8)); PTQ options go to the base config."""
    if method not in QUANT_CONFIGS:
        raise ConfigError(f"unknown quantization method {method!r}; use one of {', '.join(QUANT_CONFIGS)}")
    w, a = parse_bits(bits, SUPPORTED_BITS) if isinstance(bits, str) else bits
    base_fields = {f.name for f in dataclasses.fields(PTQConfig)}
    cls = QUANT_CONFIGS[method]
    own_fields = {f.name for f in dataclasses.fields(cls)}
    base_opts = {k: v for k, v in options.items() if k in base_fields and (cls is PTQConfig or k not in own_fields)}
    unknown = set(options) - base_fields - own_fields
    if unknown:
        raise ConfigError(f"{cls.__name__} has no option(s) {sorted(unknown)}; options: {sorted(own_fields)}")
    if cls is PTQConfig:
        return PTQConfig(w_bits=w, a_bits=a, **base_opts)
    own = {k: v for k, v in options.items() if k in own_fields and k not in ("base_config", "step")}
    if "step" in options:
        own["step"] = options["step"]
    return cls(base_config=PTQConfig(w_bits=w, a_bits=a, **base_opts), **own)


def config_from_dict(d: dict[str, Any]):
    """Inverse of `to_dict()` (used when loading a saved quantized model)."""
    d = dict(d)
    cls = QUANT_CONFIGS.get(d.pop("method", "ptq"))
    if cls is None:
        raise ConfigError(f"unknown quantization method in saved config: {d!r}")
    for key in ("percentiles", "skip_modules"):
        if key in d:
            d[key] = tuple(d[key])
    return cls(**d)
