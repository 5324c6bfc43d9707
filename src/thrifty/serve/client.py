"""Edge side: fetch gathered features from a feature server into a local feature cache, and train on them.

`FeatureClient` speaks thrifty.serve.protocol with bounded retries and exponential backoff (transport errors,
429 and 5xx), and counts the bytes it receives. `RemoteBackbone` is the server's backbone as the edge sees it: the
identity from /info (name, checkpoint hash, blocks, width, preprocessing) and no weights, so a feature cache
filled from the server has the same manifest identity as one extracted locally, and a cache made from another
backbone, weights, k or dtype is refused. `RemoteFeatures.batches` is the cache's batch source.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from thrifty.backbones.base import Backbone
from thrifty.backbones.preprocess import ImagePreprocess, TextPreprocess
from thrifty.data.base import ArrayImageDataset, FileImageDataset, LabelledDataset, Subset
from thrifty.errors import ConfigError, DataError
from thrifty.features.taps import MASK
from thrifty.serve.protocol import API_VERSION, GATHER, INFO, RemoteError, decode_features, encode_request


RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


def read_token(path: str | None) -> str:
    """The bearer token in `path` (whitespace stripped); at least 16 characters."""
    if not path:
        raise ConfigError("pass --token-file FILE holding the feature server's bearer token")
    try:
        with open(path) as fh:
            token = fh.read().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(
            f"{path} must hold one token of at least 16 characters without spaces; create one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE"
        )
    return token


class FeatureClient:
    """HTTP client of one feature server. Every request is retried at most `retries` times (transport errors,
    429, 5xx) after min(backoff_max, backoff * 2^attempt) seconds times a jitter in [0.5, 1]; 4xx is final."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        timeout: float = 120.0,
        retries: int = 10,
        backoff: float = 0.5,
        backoff_max: float = 8.0,
        seed: int = 0,
    ):
        import httpx

        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ConfigError(f"--remote must be an http(s) URL such as http://127.0.0.1:8765, got {url!r}")
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.backoff_max = retries, backoff, backoff_max
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout)
        self.rng = random.Random(seed)
        self.stats = {"requests": 0, "retries": 0, "bytes_received": 0, "bytes_sent": 0, "samples": 0}

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any):
        import httpx

        error = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats["retries"] += 1
                time.sleep(min(self.backoff_max, self.backoff * 2 ** (attempt - 1)) * (0.5 + 0.5 * self.rng.random()))
            try:
                resp = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # refused, reset, timed out: the server may be restarting
                error = f"{type(exc).__name__}: {exc}"
                continue
            self.stats["requests"] += 1
            if resp.status_code in RETRY_STATUS:
                error = f"HTTP {resp.status_code}: {_detail(resp)}"
                continue
            if resp.status_code == 401:
                raise RemoteError(f"{self.url} rejected the token (401); pass the server's --token-file")
            if resp.status_code >= 400:
                raise RemoteError(f"{self.url}{path} answered HTTP {resp.status_code}: {_detail(resp)}")
            return resp
        raise RemoteError(f"{self.url}{path}: no answer after {self.retries + 1} attempts; last error: {error}")

    def info(self) -> dict[str, Any]:
        info = self.request("GET", INFO).json()
        if info.get("api_version") != API_VERSION:
            raise RemoteError(f"{self.url} speaks API version {info.get('api_version')}, this client {API_VERSION}")
        return info

    def gather(
        self, *, images=None, input_ids=None, dtype: str, dim: int, max_tokens: int
    ) -> tuple[torch.Tensor, dict]:
        """(n, N, D) features of one request, checked against the expected shape and dtype."""
        body = encode_request(images=images, input_ids=input_ids, dtype=dtype)
        resp = self.request("POST", GATHER, content=body, headers={"Content-Type": "application/json"})
        n = len(images if images is not None else input_ids)
        feats, meta = decode_features(resp.content, samples=n, dim=dim, max_tokens=max_tokens, dtype=dtype)
        self.stats["bytes_received"] += len(resp.content)
        self.stats["bytes_sent"] += len(body)
        self.stats["samples"] += n
        return feats, meta


def _detail(resp) -> str:
    try:
        return str(resp.json().get("detail", resp.text))[:300]
    except ValueError:
        return resp.text[:300]


class _ServerBlock(nn.Module):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, *args, **kwargs):
        raise ConfigError(f"block {self.index} runs on the feature server; the edge model reads its features")


class RemoteBackbone(Backbone):
    """The server's backbone seen from the edge: identity and preprocessing from /info, no weights."""

    def __init__(self, info: dict[str, Any], preprocess: ImagePreprocess | TextPreprocess, url: str):
        b = info["backbone"]
        super().__init__(b["name"], nn.Identity(), preprocess, source=f"remote:{url}")
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


class RemoteFeatures:
    """A connection to a feature server for one training run: the edge's `backbone` (RemoteBackbone), the tap it
    serves, and `batches(dataset, start, stop)` for FeatureCache.extract_split."""

    def __init__(self, client: FeatureClient, info: dict[str, Any], backbone: RemoteBackbone, request_batch: int):
        self.client, self.info, self.backbone = client, info, backbone
        self.tap, self.dtype = info["tap"], info["dtype"]
        self.request_batch = max(1, min(request_batch, int(info["limits"]["max_batch"])))

    @classmethod
    def connect(
        cls,
        url: str,
        token_file: str | None,
        *,
        backbone: str | None = None,
        image_size: int | None = None,
        max_length: int | None = None,
        request_batch: int = 32,
        **client_kwargs: Any,
    ) -> RemoteFeatures:
        """Read /info and build the edge's view of the server's backbone; `backbone` (a spec), `image_size` and
        `max_length`, when given, must match what the server runs (they are the server's to choose)."""
        client = FeatureClient(url, read_token(token_file), **client_kwargs)
        info = client.info()
        b, pre = info["backbone"], info["preprocess"]
        if backbone is not None and backbone_name(backbone) != b["name"]:
            raise ConfigError(f"{url} serves {b['name']}, not {backbone_name(backbone)}; pass --backbone {b['name']}")
        if pre["kind"] == "image":
            if image_size is not None and [image_size, image_size] != list(pre["size"]):
                raise ConfigError(f"{url} preprocesses images to {pre['size']}; drop --image-size or restart it")
            fields = {k: tuple(pre[k]) for k in ("size", "mean", "std")}
            preprocess = _served(_ServedImage, pre, interpolation=pre["interpolation"], **fields)
        else:
            if max_length is not None and max_length != pre["max_length"]:
                raise ConfigError(f"{url} embeds {pre['max_length']} tokens; drop --max-length or restart it")
            tok = load_tokenizer(backbone or b["name"])
            if len(tok) != pre["vocab_size"] or tok.padding_side != "right":
                raise ConfigError(f"the local tokenizer of {b['name']} does not match the server's")
            preprocess = _served(_ServedText, pre, tokenizer=tok, max_length=int(pre["max_length"]))
        return cls(client, info, RemoteBackbone(info, preprocess, client.url), request_batch)

    def method_defaults(self, config_cls: type) -> dict[str, str]:
        """The served gather's k and first as `--set` defaults for a method config that has those options."""
        names = getattr(config_cls, "__dataclass_fields__", {})
        return {key: str(self.info[key]) for key in ("k", "first") if key in names}

    def check_taps(self, taps: list[str]) -> None:
        wanted = [t for t in taps if t != MASK]
        if wanted != [self.tap]:
            raise ConfigError(
                f"{self.client.url} serves {self.tap} (k={self.info['k']}, first={self.info['first']}) but the "
                f"method reads {wanted}; set the method's k/first to the server's or restart it with --k"
            )

    def batches(self, dataset: LabelledDataset, start: int, stop: int) -> Iterator[dict[str, torch.Tensor]]:
        """Tap dicts of rows [start, stop), `request_batch` samples per request (deterministic boundaries)."""
        b = self.info["backbone"]
        kw = {"dtype": self.dtype, "dim": int(b["num_features"]), "max_tokens": int(b["tokens"])}
        for s in range(start, stop, self.request_batch):
            rows = range(s, min(stop, s + self.request_batch))
            if self.backbone.kind != "text":
                feats, _ = self._checked(self.client.gather(images=[encoded_image(dataset, i) for i in rows], **kw))
                yield {self.tap: feats.float()}
                continue
            items = [dataset[i][0] for i in rows]
            mask = torch.stack([it["attention_mask"] for it in items]).bool()
            ids = [it["input_ids"][: int(m.sum())].tolist() for it, m in zip(items, mask)]
            feats, _ = self._checked(self.client.gather(input_ids=ids, **kw))
            out = torch.zeros(len(rows), mask.shape[1], feats.shape[2])
            out[:, : feats.shape[1]] = feats.float()
            out[~mask] = 0.0  # padding positions (never read) are zeros: the cache does not depend on batching
            yield {self.tap: out, MASK: mask}

    def _checked(self, result: tuple[torch.Tensor, dict]) -> tuple[torch.Tensor, dict]:
        feats, meta = result
        want = {"tap": self.tap, "checkpoint_hash": str(self.info["backbone"]["checkpoint_hash"])}
        got = {k: meta.get(k) for k in want}
        if got != want:
            raise RemoteError(f"{self.client.url} changed while fetching: it now serves {got}, this run uses {want}")
        return feats, meta

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


def encoded_image(dataset: LabelledDataset, i: int) -> bytes:
    """Sample i of an image dataset as PNG/JPEG bytes: the file as stored, or the uint8 array encoded as PNG
    (lossless: the server's preprocessing then sees exactly the pixels the local path sees)."""
    while isinstance(dataset, Subset):
        dataset, i = dataset.base, int(dataset.indices[i])
    if isinstance(dataset, FileImageDataset):
        with open(dataset.paths[i], "rb") as fh:
            return fh.read()
    if isinstance(dataset, ArrayImageDataset):
        from PIL import Image

        arr = np.asarray(dataset.images[i])
        buf = io.BytesIO()
        Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr).save(buf, format="PNG")
        return buf.getvalue()
    raise DataError(f"cannot send samples of {type(dataset).__name__} to a feature server (images or text only)")
