"""Wire format of the feature server (`thrifty serve`), shared by server and client.

    GET  /health                  -> {"status": "ok"}                                  (no authentication)
    GET  /info                    -> backbone identity, gather, k, tap, dtype, preprocessing, limits, stats
    POST /v1/gather               JSON {"images": [base64 PNG/JPEG, ...]} or {"input_ids": [[int, ...], ...]},
                                  optional "dtype": "float16" | "float32"
                                  -> application/octet-stream: safetensors bytes, one tensor `features`
                                     (n, N, D) = Gather*(B, x, k) per sample, metadata {tap, checkpoint_hash,
                                     dtype, tokens}; for token ids N = the longest sequence of the request
                                     (padding columns are not sent)
Every endpoint but /health needs `Authorization: Bearer <token>`. Errors are JSON {"detail": message} with a 4xx
status for bad requests (401 token, 400 malformed body, 413 too large, 415 content type, 422 invalid content),
503 when the queue is full (Retry-After) and 500 if the model fails.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import torch

from thrifty.errors import ThriftyError


API_VERSION = 1
HEALTH, INFO, GATHER = "/health", "/info", "/v1/gather"
FEATURES = "features"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
_ST_DTYPES = {"float16": "F16", "float32": "F32"}
MAX_HEADER = 1 << 16


class RemoteError(ThriftyError, RuntimeError):
    """The feature server refused a request, sent something invalid, or could not be reached."""


def encode_request(
    *, images: list[bytes] | None = None, input_ids: list[list[int]] | None = None, dtype=None
) -> bytes:
    """JSON body of a /v1/gather request (exactly one of `images` (encoded PNG/JPEG) or `input_ids`)."""
    if (images is None) == (input_ids is None):
        raise ValueError("pass exactly one of images or input_ids")
    body: dict[str, Any] = (
        {"images": [base64.b64encode(b).decode("ascii") for b in images]}
        if images is not None
        else {"input_ids": input_ids}
    )
    if dtype is not None:
        body["dtype"] = dtype
    return json.dumps(body, separators=(",", ":")).encode()


def encode_features(features: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """(n, N, D) tensor -> safetensors bytes."""
    from safetensors.torch import save

    return save({FEATURES: features.contiguous()}, metadata=metadata)


def decode_features(body: bytes, *, samples: int, dim: int, max_tokens: int, dtype: str) -> tuple[torch.Tensor, dict]:
    """Check the safetensors header (one `features` tensor of `dtype`, shape (samples, 1..max_tokens, dim), sizes
    consistent with the body) before reading anything, then load it: a bad answer raises RemoteError."""
    from safetensors.torch import load

    def bad(why: str) -> RemoteError:
        return RemoteError(f"the feature server sent an invalid answer ({why})")

    if len(body) < 8:
        raise bad(f"{len(body)} bytes")
    size = int.from_bytes(body[:8], "little")
    if size > MAX_HEADER or 8 + size > len(body):
        raise bad(f"header of {size} bytes")
    try:
        header = json.loads(body[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header is not JSON: {exc}") from None
    meta = header.pop("__metadata__", None) or {}
    spec = header.get(FEATURES) if isinstance(header, dict) and set(header) == {FEATURES} else None
    if not isinstance(spec, dict):
        raise bad(f"tensors {sorted(header) if isinstance(header, dict) else header!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if spec.get("dtype") != _ST_DTYPES[dtype]:
        raise bad(f"dtype {spec.get('dtype')}, asked {dtype}")
    if not (isinstance(shape, list) and len(shape) == 3 and shape[0] == samples and shape[2] == dim):
        raise bad(f"shape {shape}, expected ({samples}, N, {dim})")
    if not 1 <= shape[1] <= max_tokens:
        raise bad(f"{shape[1]} tokens, at most {max_tokens}")
    nbytes = shape[0] * shape[1] * shape[2] * DTYPES[dtype].itemsize
    if offsets != [0, nbytes] or len(body) != 8 + size + nbytes:
        raise bad(f"data offsets {offsets} for {nbytes} bytes in a {len(body)}-byte body")
    return load(body)[FEATURES], meta
