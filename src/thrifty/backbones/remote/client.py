"""HTTP client of one feature server (`thrifty serve`): bearer token, bounded retries with exponential backoff
(transport errors, 429 and 5xx), and counters of the bytes it sends and receives."""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from thrifty.backbones.remote.protocol import API_VERSION, GATHER, INFO, RemoteError, decode_features, encode_request
from thrifty.errors import ConfigError


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
