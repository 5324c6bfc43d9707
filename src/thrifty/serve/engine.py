"""Server side: decode requests into backbone inputs, run Gather*(B, x, k) on the frozen backbone, and a queue
whose single worker task drains waiting requests into one model batch.

`GatherEngine` is synchronous (the model runs in one worker thread at a time); `Batcher` is the asyncio side.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from dataclasses import dataclass, field
from typing import Any

import torch

from thrifty.backbones import Backbone
from thrifty.backbones.preprocess import ImagePreprocess
from thrifty.backbones.remote.protocol import API_VERSION, DTYPES, encode_features
from thrifty.errors import ConfigError
from thrifty.features.taps import canonical_taps, extract_taps, gather_tap
from thrifty.runtime.denormals import flushed_denormals
from thrifty.tuners.miet.model import resolve_k


IMAGE_FORMATS = ("PNG", "JPEG")


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with `message` (becomes {"detail": message})."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Limits:
    max_batch: int = 64  # samples per request
    max_body_bytes: int = 32 << 20
    max_image_pixels: int = 4096 * 4096
    model_batch: int = 64  # samples per model batch assembled by the worker
    queue_size: int = 64  # requests waiting for the model
    request_timeout: float = 120.0

    def describe(self) -> dict[str, Any]:
        return {
            "max_batch": self.max_batch,
            "max_body_bytes": self.max_body_bytes,
            "max_image_pixels": self.max_image_pixels,
            "model_batch": self.model_batch,
            "queue_size": self.queue_size,
        }


@dataclass
class Job:
    """One request's decoded inputs: images (n, C, H, W), or token ids + mask (n, T) and real lengths."""

    inputs: torch.Tensor | dict[str, torch.Tensor]
    n: int
    dtype: str
    lengths: list[int] | None = None
    future: asyncio.Future | None = field(default=None, repr=False)


class GatherEngine:
    """The frozen backbone and one gather: Gather*(B, x, k) = z_first + ... + z_k (thrifty.features.taps)."""

    def __init__(
        self,
        backbone: Backbone,
        k: int | None = None,
        first: int = 0,
        gather: str = "sum",
        dtype: str = "float16",
        device: str | torch.device = "cpu",
        flush_denormal: bool = True,
    ):
        if gather != "sum":
            raise ConfigError(f"gather {gather!r} is not supported; use `sum` (MIET's Gather*)")
        if backbone.kind not in ("vit", "text"):
            raise ConfigError(f"the feature server needs a token backbone (timm ViT or text), not {backbone.kind!r}")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.backbone = backbone.to(device).eval()
        self.device = torch.device(device)
        self.flush_denormal = flush_denormal  # on CPU, as training and extraction do
        self.k, self.first, self.gather, self.dtype = resolve_k(k, first, len(backbone.blocks)), first, gather, dtype
        self.tap = canonical_taps([gather_tap(self.k, first)], len(backbone.blocks))[0]
        self.tokens = int(self.backbone.random_inputs(1)["input_ids"].shape[1]) if self.is_text else self._tokens()

    @property
    def is_text(self) -> bool:
        return self.backbone.kind == "text"

    def _tokens(self) -> int:
        with torch.no_grad():
            return int(self.backbone.embed(self.backbone.random_inputs(1).to(self.device))[0].shape[1])

    def info(self) -> dict[str, Any]:
        bb, pre = self.backbone, self.backbone.preprocess
        preprocess = pre.describe()
        if self.is_text:
            tok = pre.tokenizer
            preprocess.update(vocab_size=len(tok), pad_token_id=int(tok.pad_token_id or 0))
        return {
            "api_version": API_VERSION,
            "backbone": {
                "name": bb.name,
                "kind": bb.kind,
                "checkpoint_hash": bb.checkpoint_hash,
                "num_blocks": len(bb.blocks),
                "num_features": bb.num_features,
                "num_prefix_tokens": int(getattr(bb, "num_prefix_tokens", 0)) if bb.kind == "vit" else 0,
                "tokens": self.tokens,
            },
            "preprocess": preprocess,
            "gather": self.gather,
            "k": self.k,
            "first": self.first,
            "tap": self.tap,
            "z": "z_0 = embedding output (input of block 0), z_i = output of block i-1 (0-based), i = 1..L",
            "dtype": self.dtype,
            "dtypes": sorted(DTYPES),
            "bytes_per_sample": self.tokens * bb.num_features * DTYPES[self.dtype].itemsize,
        }

    # --- requests -> inputs ----------------------------------------------------------------------------------
    def parse(self, payload: Any, limits: Limits) -> Job:
        """Validate a decoded JSON body into a Job (RequestError 413/422 with a message otherwise)."""
        if not isinstance(payload, dict):
            raise RequestError(422, "the body must be a JSON object with `images` or `input_ids`")
        extra = set(payload) - {"images", "input_ids", "dtype"}
        if extra:
            raise RequestError(422, f"unknown fields {sorted(extra)}; allowed: images, input_ids, dtype")
        dtype = payload.get("dtype", self.dtype)
        if dtype not in DTYPES:
            raise RequestError(422, f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        key = "input_ids" if self.is_text else "images"
        wrong = "images" if self.is_text else "input_ids"
        if wrong in payload:
            raise RequestError(422, f"this server runs a {self.backbone.kind} backbone: send `{key}`, not `{wrong}`")
        items = payload.get(key)
        if not isinstance(items, list) or not items:
            raise RequestError(422, f"`{key}` must be a non-empty list")
        if len(items) > limits.max_batch:
            raise RequestError(413, f"{len(items)} samples in one request; the limit is {limits.max_batch}")
        if self.is_text:
            return self._parse_ids(items, dtype)
        images = torch.stack([self._decode_image(i, s, limits) for i, s in enumerate(items)])
        return Job(images, len(items), dtype)

    def _decode_image(self, i: int, item: Any, limits: Limits) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        if not isinstance(item, str):
            raise RequestError(422, f"images[{i}] must be a base64 string of PNG or JPEG bytes")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"images[{i}] is not valid base64") from None
        pre: ImagePreprocess = self.backbone.preprocess
        try:
            with Image.open(io.BytesIO(data)) as img:
                if img.format not in IMAGE_FORMATS:
                    raise RequestError(415, f"images[{i}] is {img.format}; send PNG or JPEG")
                if img.width * img.height > limits.max_image_pixels:
                    raise RequestError(
                        413, f"images[{i}] has {img.width}x{img.height} pixels; limit {limits.max_image_pixels}"
                    )
                img.load()
                return pre.from_pil(img)
        except RequestError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestError(422, f"images[{i}] could not be decoded ({exc}); send PNG or JPEG bytes") from None

    def _parse_ids(self, seqs: list[Any], dtype: str) -> Job:
        tok, max_len = self.backbone.preprocess.tokenizer, self.tokens
        vocab, pad = len(tok), int(tok.pad_token_id or 0)
        ids = torch.full((len(seqs), max_len), pad, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_len, dtype=torch.long)
        lengths = []
        for i, seq in enumerate(seqs):
            if not isinstance(seq, list) or not 1 <= len(seq) <= max_len:
                raise RequestError(422, f"input_ids[{i}] must be a list of 1..{max_len} token ids (the server's max)")
            if not all(type(t) is int and 0 <= t < vocab for t in seq):
                raise RequestError(422, f"input_ids[{i}] holds a value that is not a token id in [0, {vocab})")
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            lengths.append(len(seq))
        return Job({"input_ids": ids, "attention_mask": mask}, len(seqs), dtype, lengths)

    # --- model -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[bytes | RequestError]:
        """One model batch for several requests; returns each request's safetensors body (or its error)."""
        if self.is_text:
            x: Any = {k: torch.cat([j.inputs[k] for j in jobs]).to(self.device) for k in jobs[0].inputs}
        else:
            x = torch.cat([j.inputs for j in jobs]).to(self.device)
        with flushed_denormals(self.flush_denormal, self.device):  # this worker thread and its OpenMP pool
            feats = extract_taps(self.backbone, x, [self.tap])[self.tap].float().cpu()
        out: list[bytes | RequestError] = []
        for job, part in zip(jobs, feats.split([j.n for j in jobs])):
            if job.lengths is not None:
                part = part[:, : max(job.lengths)]  # padding columns are not sent
            part = part.to(DTYPES[job.dtype])
            if not torch.isfinite(part).all():
                out.append(RequestError(422, f"features overflow {job.dtype}; ask for dtype float32"))
                continue
            meta = {"tap": self.tap, "checkpoint_hash": str(self.backbone.checkpoint_hash), "dtype": job.dtype}
            out.append(encode_features(part, {**meta, "tokens": str(part.shape[1])}))
        return out


class Busy(Exception):
    """The request queue is full."""


class Batcher:
    """A bounded queue of Jobs and ONE worker task: it takes the oldest job, adds every job already waiting (up
    to `model_batch` samples), runs the model on them together in a worker thread, and answers each request."""

    def __init__(self, engine: GatherEngine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=limits.queue_size)
        self.task: asyncio.Task | None = None
        self.stats = {"requests": 0, "samples": 0, "model_batches": 0, "max_requests_per_batch": 0, "errors": 0}

    async def start(self) -> None:
        self.task = asyncio.create_task(self._work())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        while not self.queue.empty():
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RequestError(503, "the server is shutting down; retry later"))

    async def submit(self, job: Job) -> bytes:
        job.future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy from None
        return await asyncio.wait_for(job.future, self.limits.request_timeout)

    async def _work(self) -> None:
        carry: Job | None = None
        while True:
            job = carry or await self.queue.get()
            carry, batch, n = None, [job], job.n
            while not self.queue.empty():
                nxt = self.queue.get_nowait()
                if n + nxt.n > self.limits.model_batch:
                    carry = nxt
                    break
                batch.append(nxt)
                n += nxt.n
            batch = [j for j in batch if not j.future.done()]  # e.g. timed out while waiting
            if not batch:
                continue
            n = sum(j.n for j in batch)
            try:
                results = await asyncio.to_thread(self.engine.run, batch)
            except Exception as exc:  # never let the worker die: fail this batch's requests, keep serving
                self.stats["errors"] += len(batch)
                results = [RequestError(500, f"feature extraction failed: {type(exc).__name__}: {exc}")] * len(batch)
            self.stats["model_batches"] += 1
            self.stats["requests"] += len(batch)
            self.stats["samples"] += n
            self.stats["max_requests_per_batch"] = max(self.stats["max_requests_per_batch"], len(batch))
            for j, res in zip(batch, results):
                if j.future.done():
                    continue
                if isinstance(res, RequestError):
                    j.future.set_exception(res)
                else:
                    j.future.set_result(res)
