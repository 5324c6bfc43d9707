"""`thrifty serve`: a feature server for edge tuning (MIET). The frozen backbone runs here; each request gets
one gathered map per sample, Gather*(B, x, k) = z_0 + ... + z_k (z_0 = embedding output, z_i = output of the
i-th block), as safetensors bytes. Every endpoint but /health needs `Authorization: Bearer <token>` with the
token in --token-file. Edge side: `thrifty train --method miet --remote URL --token-file F ...`."""

from __future__ import annotations

import argparse
import ipaddress
import sys

from thrifty.cli.common import add_backbone_args, add_config_args, backbone_spec


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve",
        help="serve gathered backbone features to edge trainers (MIET)",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_backbone_args(p)
    g = p.add_argument_group("gather")
    g.add_argument("--gather", default="sum", choices=["sum"], help="gather function (MIET's Gather*: a sum)")
    g.add_argument("--k", type=int, help="sum z_0..z_k, 0 <= k <= L (negative counts from L); default L (all)")
    g.add_argument("--first", type=int, default=0, help="first index summed (0 includes the embedding output)")
    g.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="default feature dtype")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument(
        "--keep-denormals",
        action="store_true",
        help="CPU: do not flush subnormal floats to zero (training and extraction flush them by default)",
    )
    g = p.add_argument_group("service")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    g.add_argument("--port", type=int, default=8765, help="port (0: any free port; the chosen one is printed)")
    g.add_argument("--token-file", required=True, help="file holding the bearer token (>= 16 characters)")
    g.add_argument("--max-batch", type=int, default=64, help="samples per request")
    g.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit (MiB)")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="pixels per decoded image")
    g.add_argument("--model-batch", type=int, default=64, help="samples per model batch (requests are merged)")
    g.add_argument("--queue-size", type=int, default=64, help="requests waiting for the model (then 503)")
    g.add_argument("--lifetime", type=float, help="stop by itself after this many seconds (tests, demos)")
    g.add_argument("--log-level", default="warning", help="uvicorn log level")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from thrifty.backbones import load_backbone
    from thrifty.backbones.remote import read_token
    from thrifty.errors import ConfigError
    from thrifty.runtime import resolve_device
    from thrifty.serve.app import run_server
    from thrifty.serve.engine import GatherEngine, Limits

    for name in ("max_batch", "model_batch", "queue_size", "max_image_pixels"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.max_body_mb <= 0 or not 0 <= args.port < 65536:
        raise ConfigError("--max-body-mb must be positive and --port in 0..65535")
    token = read_token(args.token_file)
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(backbone_spec(args))
    engine = GatherEngine(
        bb,
        k=args.k,
        first=args.first,
        gather=args.gather,
        dtype=args.dtype,
        device=resolve_device(args.device),
        flush_denormal=not args.keep_denormals,
    )
    limits = Limits(
        max_batch=args.max_batch,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        max_image_pixels=args.max_image_pixels,
        model_batch=max(args.model_batch, args.max_batch),
        queue_size=args.queue_size,
    )
    if not _is_loopback(args.host):
        print(
            f"thrifty serve: WARNING: binding {args.host}; plain HTTP sends the token in clear: put a TLS "
            "proxy in front or use 127.0.0.1 with an SSH tunnel",
            file=sys.stderr,
        )
    info = engine.info()
    print(
        f"thrifty serve: {bb.name} (hash {bb.checkpoint_hash}), {info['tap']} = z_{engine.first}..z_{engine.k} "
        f"of {len(bb.blocks)} blocks, {info['bytes_per_sample']:,d} B/sample in {engine.dtype}",
        flush=True,
    )
    run_server(
        engine, token, host=args.host, port=args.port, limits=limits, lifetime=args.lifetime, log_level=args.log_level
    )
    return 0


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
