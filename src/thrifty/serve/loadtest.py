"""Load test of a feature server: `clients` threads, each sending `requests` /v1/gather requests back to back
(no retries: every failure counts), with the latency of every request. Used by benchmarks/miet_load.py."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import numpy as np

from thrifty.backbones.remote.protocol import GATHER, INFO, decode_features, encode_request


def png_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """`count` random RGB PNGs of size x size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def run_load(
    url: str, token: str, *, clients: int = 8, requests: int = 50, samples: int = 4, image_size: int = 32
) -> dict[str, Any]:
    """Latency percentiles (ms), error count and throughput of `clients` x `requests` concurrent requests."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    info = httpx.get(f"{url}{INFO}", headers=headers, timeout=30).raise_for_status().json()
    b = info["backbone"]
    body = encode_request(images=png_images(samples, image_size), dtype=info["dtype"])
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        with httpx.Client(base_url=url, headers={**headers, "Content-Type": "application/json"}, timeout=60) as c:
            start.wait()
            for _ in range(requests):
                t0 = time.perf_counter()
                try:
                    resp = c.post(GATHER, content=body)
                    if resp.status_code != 200:
                        raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                    decode_features(
                        resp.content,
                        samples=samples,
                        dim=b["num_features"],
                        max_tokens=b["tokens"],
                        dtype=info["dtype"],
                    )
                    ms = 1000 * (time.perf_counter() - t0)
                    with lock:
                        latencies.append(ms)
                except Exception as exc:  # counted, reported
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    stats = httpx.get(f"{url}{INFO}", headers=headers, timeout=30).json()["stats"]
    return {
        "clients": clients,
        "requests_per_client": requests,
        "samples_per_request": samples,
        "ok": len(latencies),
        "errors": len(errors),
        "first_errors": errors[:5],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
        "seconds": seconds,
        "requests_per_second": len(latencies) / seconds,
        "server_stats": stats,
    }
