"""Edge side of MIET: a feature server's gathered features as the batch source of a local feature cache.

`RemoteFeatures` wraps a connected `RemoteBackbone` (thrifty.backbones.remote; `--backbone remote:URL` or
`--remote URL`): `batches(dataset, start, stop)` sends the samples (image bytes or token ids) and yields tap
dicts for FeatureCache.extract_split; `metrics()` gives the transfer counters recorded in results.json.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from thrifty.backbones.remote import RemoteBackbone
from thrifty.backbones.remote.protocol import RemoteError
from thrifty.backbones.spec import BackboneSpec
from thrifty.data.base import ArrayImageDataset, FileImageDataset, LabelledDataset, Subset
from thrifty.errors import DataError
from thrifty.features.taps import MASK


class RemoteFeatures:
    """A feature server as the batch source of one run's feature cache: `backbone` is the connected
    RemoteBackbone; `batches(dataset, start, stop)` for FeatureCache.extract_split."""

    def __init__(self, backbone: RemoteBackbone, request_batch: int = 32):
        self.backbone, self.client, self.info = backbone, backbone.client, backbone.info
        self.tap, self.dtype = backbone.tap, backbone.dtype
        self.request_batch = max(1, min(request_batch, int(self.info["limits"]["max_batch"])))

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
        """Connect to the server at `url` (see RemoteBackbone.connect); `backbone` is the spec the edge expects."""
        spec = BackboneSpec(f"remote:{url}", image_size=image_size, max_length=max_length, token_file=token_file)
        return cls(RemoteBackbone.connect(spec, expect=backbone, **client_kwargs), request_batch)

    def metrics(self) -> dict[str, Any]:
        return self.backbone.metrics()

    def tap_shapes(self, dataset: LabelledDataset) -> dict[str, tuple[int, ...]]:
        """Per-sample shapes of what `batches` yields, from the server's /info (no request): (tokens, dim) for
        images; text: (max_length, dim) plus the mask (max_length,)."""
        b = self.info["backbone"]
        if self.backbone.kind != "text":
            return {self.tap: (int(b["tokens"]), int(b["num_features"]))}
        n = int(dataset[0][0]["attention_mask"].shape[0])
        return {self.tap: (n, int(b["num_features"])), MASK: (n,)}

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
