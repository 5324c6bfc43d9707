"""Click-through-rate models as backbones (`ctr:deepfm`, `ctr:dcn`, `ctr:autoint`, `ctr:dnn`), trained from scratch.

The interaction layers and the MLP tower are torch-rechub's (PyPI `torch-rechub`: `FM`, `CrossNetwork`,
`InteractingLayer`, `MLP` = Linear -> BatchNorm1d -> ReLU -> Dropout per layer); one `nn.Embedding(vocab, d)` per
field (normal init, std 1e-4, as DeepCTR and torch-rechub). What thrifty adds is the Backbone protocol: rechub's
models end in `sigmoid(sum of logits)`; here `forward_features` returns what their output layers read, and the
`binary` objective's head Linear(D, 1) is that output layer (a sum of linear maps of concatenated inputs is one
linear map of the concatenation):

    e = [E_f[x_f]] (B, F, d),  flat = e.flatten(1) (B, F·d),  h = MLP(flat) (B, H)
    deepfm:  [flat, FM(e), h]       head = first-order term over the embeddings (rechub's LR) + FM + MLP output
             (DeepFM, Guo et al. 2017; the FM term's weight is the head's, learnt, instead of fixed at 1)
    dcn:     [Cross(flat), h]       head = DCN's output layer over [x_L, h_L] (Wang et al. 2017), exactly
    autoint: [Attn(e).flatten(1), flat, h]   AutoInt+ (Song et al. 2019): interacting layers + LR + MLP, exactly
    dnn:     [h]                    an MLP over the embeddings (no interaction layer)

The spec argument is `MODEL[,key=value...]`: embed (d, 16), mlp (widths joined by '-', 400-400-400: the reference
repository's Criteo tower), cross (3), attn_layers (3), heads (2), dropout (0). The tables depend on the data:
`fit_to_task_(task)` builds them from the task's schema (one vocabulary per field, id 0 = unseen).

Low-rank tables (`FactorizedEmbedding`, filled by thrifty.compress.afm): `codes = thin(ids)` (B, k) and
`e = U codes + μ`. With `deep_reads_codes` the MLP reads the codes through a first layer with the projections
merged in; the interaction layer (FM, cross, attention) still reads `e`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from thrifty.backbones.base import Backbone
from thrifty.backbones.preprocess import TablePreprocess
from thrifty.errors import ConfigError, DataError, SpecError


MODELS = ("deepfm", "dcn", "autoint", "dnn")


@dataclass(frozen=True)
class CTRArch:
    """Hyperparameters of a CTR model (everything but the field vocabularies)."""

    model: str
    embed: int = 16
    mlp: tuple[int, ...] = (400, 400, 400)
    cross: int = 3
    attn_layers: int = 3
    heads: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise SpecError(f"unknown CTR model {self.model!r}; use one of {', '.join(MODELS)} (e.g. ctr:deepfm)")
        if self.embed <= 0 or not self.mlp or min(self.mlp) <= 0 or self.cross < 0 or self.attn_layers < 0:
            raise SpecError(f"CTR sizes must be positive: {self}")
        if self.model == "autoint" and self.embed % self.heads:
            raise SpecError(f"autoint: embed ({self.embed}) must be a multiple of heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"dropout must lie in [0, 1), got {self.dropout}")

    @classmethod
    def parse(cls, argument: str) -> CTRArch:
        """'deepfm,embed=8,mlp=64-32' -> CTRArch('deepfm', embed=8, mlp=(64, 32))."""
        model, *pairs = argument.split(",")
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)} - {"model"}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or key not in names:
                raise SpecError(f"ctr:{argument}: `{pair}` is not key=value with a key in {sorted(names)}")
            try:
                if key == "mlp":
                    kw[key] = tuple(int(v) for v in value.split("-"))
                else:
                    kw[key] = float(value) if key == "dropout" else int(value)
            except ValueError as exc:
                raise SpecError(f"ctr:{argument}: bad value in `{pair}` ({exc})") from exc
        return cls(model, **kw)

    def to_argument(self) -> str:
        """The canonical argument (defaults left out)."""
        out = [self.model]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "model" and value != f.default:
                out.append(f"{f.name}={'-'.join(map(str, value)) if f.name == 'mlp' else value}")
        return ",".join(out)


class FactorizedEmbedding(nn.Module):
    """A field table of rank k: codes = thin[ids] (B, k); e = proj(codes) = U codes + μ (B, d).
    `proj` is None where nothing reads `e` (the MLP reads the codes through its merged first layer)."""

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int, projection: bool = True):
        super().__init__()
        self.thin = nn.Embedding(num_embeddings, rank)
        self.proj = nn.Linear(rank, embedding_dim) if projection else None
        self.num_embeddings, self.rank, self.embedding_dim = num_embeddings, rank, embedding_dim

    def codes(self, ids: torch.Tensor) -> torch.Tensor:
        return self.thin(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.proj is None:
            raise RuntimeError("this factorized table kept no projection: only its codes are read")
        return self.proj(self.thin(ids))


def table_codes(table: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the MLP reads from a table when `deep_reads_codes`: the codes of a factorized table, else the rows."""
    return table.codes(ids) if isinstance(table, FactorizedEmbedding) else table(ids)


class CTRBackbone(Backbone):
    """See the module docstring. `model` holds `embeddings` (ModuleDict by field), `mlp` and the interaction."""

    kind = "ctr"

    def __init__(self, arch: CTRArch):
        super().__init__(f"ctr:{arch.to_argument()}", nn.Module(), TablePreprocess(), "random")
        self.arch = arch
        self.fields: list[str] = []
        self.deep_reads_codes = False  # set by thrifty.compress.afm when the projections merge into the MLP

    # --- building ------------------------------------------------------------------------------------------
    def fit_to_task_(self, task: Any, seed: int = 0) -> None:
        schema = getattr(task, "meta", {}).get("schema")
        if not schema:
            raise DataError(f"{task.name} is not a table task; CTR backbones train on movielens-100k, adult, ...")
        self.build_from_schema_(schema, seed)

    def data_schema(self) -> dict[str, Any] | None:
        if not self.fields:
            return None
        return {"fields": [[f, int(self.model.embeddings[f].num_embeddings)] for f in self.fields]}

    def build_from_schema_(self, schema: dict[str, Any], seed: int = 0) -> None:
        """One table per field of `schema` {"fields": [[name, vocabulary size], ...]}, the tower, the interaction;
        initialised under `seed` (the global RNG is left untouched); frozen like every loaded backbone."""
        from torch_rechub.basic.layers import FM, MLP, CrossNetwork, InteractingLayer

        fields = [(str(n), int(v)) for n, v in schema.get("fields", [])]
        if not fields or min(v for _, v in fields) < 1:
            raise ConfigError(f"a CTR schema needs fields with vocabularies >= 1, got {schema!r}")
        a, d = self.arch, self.arch.embed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            tables = nn.ModuleDict({name: nn.Embedding(size, d) for name, size in fields})
            for t in tables.values():
                nn.init.normal_(t.weight, 0.0, 1e-4)
            self.model.embeddings = tables
            width = len(fields) * d
            self.model.mlp = MLP(width, output_layer=False, dims=list(a.mlp), dropout=a.dropout, activation="relu")
            if a.model == "deepfm":
                self.model.fm = FM(reduce_sum=True)
            elif a.model == "dcn":
                self.model.cross = CrossNetwork(width, a.cross)
            elif a.model == "autoint":
                self.model.interacting = nn.ModuleList(
                    InteractingLayer(d, num_heads=a.heads, dropout=a.dropout, residual=True)
                    for _ in range(a.attn_layers)
                )
        self.fields = [n for n, _ in fields]
        self.preprocess = TablePreprocess(tuple(fields))
        self.deep_reads_codes = False
        self.freeze_().eval()

    def _require_built(self) -> None:
        if not self.fields:
            raise ConfigError(f"{self.name} has no tables yet: fit it to a table task first (fit_to_task_)")

    # --- protocol ------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> nn.ModuleList:
        raise NotImplementedError("CTR models have no blocks (no taps, no side methods)")

    @property
    def num_features(self) -> int:
        self._require_built()
        flat, h = len(self.fields) * self.arch.embed, self.arch.mlp[-1]
        return {"deepfm": flat + 1 + h, "dcn": flat + h, "autoint": 2 * flat + h, "dnn": h}[self.arch.model]

    @property
    def needs_full_embeddings(self) -> bool:
        """Whether an interaction layer (or the first-order term) reads the d-dim embeddings, not only the MLP."""
        return self.arch.model != "dnn"

    def deep_input_layer(self) -> str:
        """Name (in `model`) of the MLP's first Linear, which reads the flattened embeddings."""
        return "mlp.mlp.0"

    def low_rank_targets(self) -> list[str]:
        """The tower's Linear layers except the first (the reference repository's tags [False, True, True])."""
        names = [f"mlp.mlp.{i}" for i, m in enumerate(self.model.mlp.mlp) if isinstance(m, nn.Linear)]
        return names[1:]

    def forward_features(self, x: Any) -> torch.Tensor:
        self._require_built()
        if not isinstance(x, dict):
            raise DataError(f"{self.name} reads a dict {{field: (B,) ids}}, got {type(x).__name__}")
        missing = [f for f in self.fields if f not in x]
        if missing:
            raise DataError(f"{self.name}: the inputs lack fields {missing[:5]}; this model reads {self.fields}")
        tables = self.model.embeddings
        ids = [x[f].long() for f in self.fields]
        e = None
        if self.needs_full_embeddings or not self.deep_reads_codes:
            e = torch.stack([tables[f](i) for f, i in zip(self.fields, ids)], 1)  # (B, F, d)
        if self.deep_reads_codes:
            deep_in = torch.cat([table_codes(tables[f], i) for f, i in zip(self.fields, ids)], 1)  # (B, sum k)
        else:
            deep_in = e.flatten(1)
        h = self.model.mlp(deep_in)
        model = self.arch.model
        if model == "dnn":
            return h
        flat = e.flatten(1)
        if model == "deepfm":
            return torch.cat([flat, self.model.fm(e), h], 1)
        if model == "dcn":
            return torch.cat([self.model.cross(flat), h], 1)
        a = e
        for layer in self.model.interacting:
            a = layer(a)
        return torch.cat([a.flatten(1), flat, h], 1)

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.name,
            "kind": self.kind,
            "source": self.source,
            "checkpoint_hash": None,
            "num_features": self.num_features if self.fields else None,
            "arch": dataclasses.asdict(self.arch),
            "schema": self.data_schema(),
            "preprocess": self.preprocess.describe(),
        }


def load_ctr(spec: Any) -> CTRBackbone:
    """`ctr:MODEL[,key=value...]` (random init; the tables are built by fit_to_task_)."""
    if spec.checkpoint:
        raise SpecError("CTR backbones train from scratch; load a trained model with --adapter DIR instead")
    return CTRBackbone(CTRArch.parse(spec.argument))
