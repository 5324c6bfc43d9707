"""Load test of the feature server on loopback: `thrifty serve` in a child process (stops by itself after
--lifetime), `clients` concurrent clients x `requests` requests each, p50/p99 latency, errors, throughput and how
the queue merged requests into model batches.

    python benchmarks/miet_load.py                 # timm:test_vit at 32 px (random init), 8 clients x 50 requests
    python benchmarks/miet_load.py --backbone timm:vit_base_patch16_224 --image-size 224 --requests 5

Target (issue 7): 8 x 50 requests with no errors, in well under 30 s on the small model. Writes JSON.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time

from thrifty.io import write_json
from thrifty.serve.loadtest import run_load
from thrifty.serve.process import ServerProcess


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="timm:test_vit")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=50, help="per client")
    p.add_argument("--samples", type=int, default=4, help="images per request")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--json", default="runs/benchmarks/miet_load.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        token = secrets.token_urlsafe(32)
        token_file = os.path.join(tmp, "token")
        with open(token_file, "w") as fh:
            fh.write(token)
        server_args = ["--backbone", args.backbone, "--random-init", "--image-size", str(args.image_size)]
        server_args += ["--token-file", token_file, "--dtype", args.dtype, "--threads", str(args.threads)]
        server_args += ["--lifetime", "600"]
        t0 = time.perf_counter()
        with ServerProcess(server_args) as server:
            started = time.perf_counter() - t0
            res = run_load(
                server.url,
                token,
                clients=args.clients,
                requests=args.requests,
                samples=args.samples,
                image_size=args.image_size,
            )
    res.update(backbone=args.backbone, image_size=args.image_size, dtype=args.dtype, server_start_seconds=started)
    s = res["server_stats"]
    print(
        f"{args.backbone} @ {args.image_size} px, {args.clients} clients x {args.requests} requests x "
        f"{args.samples} images: {res['ok']} ok, {res['errors']} errors in {res['seconds']:.1f} s "
        f"({res['requests_per_second']:.0f} req/s)\n"
        f"latency p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, max {res['max_ms']:.1f} ms; "
        f"{s['requests']} requests in {s['model_batches']} model batches (at most {s['max_requests_per_batch']} "
        f"merged); server start {started:.1f} s"
    )
    for e in res["first_errors"]:
        print("error:", e)
    write_json(args.json, res)
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
