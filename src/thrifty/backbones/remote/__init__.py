"""The `remote:URL` backbone kind: a feature server's backbone as the edge sees it (MIET edge tuning). The identity
comes from /info (name, checkpoint hash, blocks, width, preprocessing), no weights, so a feature cache filled from
the server has the same manifest identity as one extracted locally, and a cache made from another backbone,
weights, k or dtype is refused. `RemoteBackbone.client` fetches the gathered features
(thrifty.features.remote.RemoteFeatures turns them into feature-cache batches). Wire format: `protocol`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from thrifty.backbones.base import Backbone
from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.backbones.remote.client import FeatureClient, read_token
from thrifty.backbones.remote.protocol import RemoteError
from thrifty.backbones.spec import BackboneSpec
from thrifty.errors import ConfigError


class _ServerBlock(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise ConfigError(f"block {self.index} runs on the feature server; the edge model reads its features")


class RemoteBackbone(Backbone):
    """The server's backbone seen from the edge: identity and preprocessing from /info, no weights; `client`
    talks to the server, `info` is its /info answer (tap, k, dtype, limits)."""

    def __init__(
        self, info: dict[str, Any], preprocess: ImagePreprocess | TextPreprocess, url: str, client: Any = None
    ):
        b = info["backbone"]
        super().__init__(b["name"], nn.Identity(), preprocess, source=f"remote:{url}")
        self.info, self.client = info, client
        self.tap, self.dtype = info["tap"], info["dtype"]
        self.kind = b["kind"]
        self.checkpoint_hash = b["checkpoint_hash"]
        self.num_prefix_tokens = int(b["num_prefix_tokens"])
        self._num_features = int(b["num_features"])
        self.remote_blocks = nn.ModuleList(_ServerBlock(i) for i in range(int(b["num_blocks"])))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.remote_blocks

    @property
    def num_features(self) -> int:
        return self._num_features

    def embed(self, x):
        raise ConfigError("the backbone runs on the feature server; the edge model reads its features (--remote)")

    @classmethod
    def connect(cls, spec: BackboneSpec, expect: str | None = None, **client_kwargs: Any) -> RemoteBackbone:
        """Read /info of the server at `spec`'s URL (`remote:http://host:port`, bearer token in `spec.token_file`)
        and build the edge's view of its backbone. `expect` (a backbone spec), `spec.image_size` and
        `spec.max_length`, when given, must match what the server runs (they are the server's to choose)."""
        url = spec.argument or ""
        client = FeatureClient(url, read_token(spec.token_file), **client_kwargs)
        info = client.info()
        b, pre = info["backbone"], info["preprocess"]
        if expect is not None and backbone_name(expect) != b["name"]:
            raise ConfigError(f"{url} serves {b['name']}, not {backbone_name(expect)}; pass --backbone {b['name']}")
        if pre["kind"] == "image":
            if spec.image_size is not None and [spec.image_size, spec.image_size] != list(pre["size"]):
                raise ConfigError(f"{url} preprocesses images to {pre['size']}; drop --image-size or restart it")
            fields = {k: tuple(pre[k]) for k in ("size", "mean", "std")}
            preprocess = _served(_ServedImage, pre, interpolation=pre["interpolation"], **fields)
        else:
            if spec.max_length is not None and spec.max_length != pre["max_length"]:
                raise ConfigError(f"{url} embeds {pre['max_length']} tokens; drop --max-length or restart it")
            tok = load_tokenizer(expect or b["name"])
            if len(tok) != pre["vocab_size"] or tok.padding_side != "right":
                raise ConfigError(f"the local tokenizer of {b['name']} does not match the server's")
            preprocess = _served(_ServedText, pre, tokenizer=tok, max_length=int(pre["max_length"]))
        return cls(info, preprocess, client.url, client)

    def method_defaults(self, config_cls: type) -> dict[str, str]:
        """The served gather's k and first as `--set` defaults for a method config that has those options."""
        names = getattr(config_cls, "__dataclass_fields__", {})
        return {key: str(self.info[key]) for key in ("k", "first") if key in names}

    def check_taps(self, taps: list[str]) -> None:
        """The method must read exactly the one tap the server gathers (besides the text mask)."""
        wanted = [t for t in taps if t != "mask"]  # thrifty.features.taps.MASK
        if wanted != [self.tap]:
            raise ConfigError(
                f"{self.client.url} serves {self.tap} (k={self.info['k']}, first={self.info['first']}) but the "
                f"method reads {wanted}; set the method's k/first to the server's or restart it with --k"
            )

    def metrics(self) -> dict[str, Any]:
        """Transfer counters for results.json (bytes are response bodies: safetensors header + features)."""
        s = self.client.stats
        return {
            "remote_url": self.client.url,
            "remote_tap": self.tap,
            "remote_dtype": self.dtype,
            "remote_bytes_received": s["bytes_received"],
            "remote_bytes_sent": s["bytes_sent"],
            "remote_samples_received": s["samples"],
            "remote_bytes_per_sample": s["bytes_received"] / s["samples"] if s["samples"] else None,
            "remote_requests": s["requests"],
            "remote_retries": s["retries"],
            "remote_payload_bytes_per_sample": self.info["bytes_per_sample"],
        }


class _ServedImage(ImagePreprocess):
    def describe(self) -> dict[str, Any]:
        return dict(self.served)


class _ServedText(TextPreprocess):
    def describe(self) -> dict[str, Any]:
        return dict(self.served)


def _served(cls, served: dict[str, Any], **fields):
    obj = cls(**fields)
    object.__setattr__(obj, "served", served)  # frozen dataclass: the cache identity is the server's description
    return obj


def backbone_name(spec: str) -> str:
    """The name `load_backbone(spec)` gives its backbone (what /info reports)."""
    return "hf:minilm" if spec in ("minilm", "all-minilm-l6-v2") else spec


def load_tokenizer(spec: str):
    """The tokenizer of a text backbone spec, without its weights (the edge tokenizes, the server embeds)."""
    from transformers import AutoTokenizer

    from thrifty.backbones.hf_encoder import minilm_path

    if spec in ("minilm", "all-minilm-l6-v2", "hf:minilm"):
        return AutoTokenizer.from_pretrained(minilm_path())
    if spec.startswith("hf:"):
        return AutoTokenizer.from_pretrained(spec[3:])
    raise ConfigError(f"cannot load a tokenizer for backbone {spec!r}")


__all__ = ["FeatureClient", "RemoteBackbone", "RemoteError", "backbone_name", "load_tokenizer", "read_token"]
