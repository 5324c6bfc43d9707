"""`thrifty eval`: evaluate a saved adapter directory (or, with --quantized / --onnx, a model written by
`thrifty quantize`) on a task's test split (or another split)."""

from __future__ import annotations

import argparse

from thrifty.cli.common import add_backbone_args, add_config_args, add_data_args, add_json_flag, backbone_for_run, emit


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a saved adapter", description=__doc__)
    add_config_args(p)
    add_backbone_args(p, required=False)
    add_data_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--adapter", help="directory with adapter_config.json + adapter_model.safetensors")
    src.add_argument("--quantized", help="directory written by `thrifty quantize` (PyTorch simulation)")
    src.add_argument(
        "--onnx",
        help="an ONNX classifier run in onnxruntime: model.onnx of `thrifty quantize --onnx` (its backbone is read "
        "from the quantize_config.json next to it) or any other export of the same model (give --backbone)",
    )
    p.add_argument("--split", default="test", help="role or split name: test | val | train | train800 | ...")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the 1k split draw (use the training seed)")
    p.add_argument("--device", default="auto")
    p.add_argument("--output", help="also write the result to this JSON file")
    add_json_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import load_backbone
    from thrifty.data import PROTOCOLS, load_data
    from thrifty.io import write_json
    from thrifty.runtime import resolve_device
    from thrifty.train import evaluate
    from thrifty.tuners import load_tuned_model

    if args.adapter:
        bb = load_backbone(backbone_for_run(args, args.adapter))
    elif args.quantized:
        from thrifty.compress import load_quantized

        model, _ = load_quantized(args.quantized)
        bb = model.backbone
    else:
        bb = _onnx_backbone(args)
    task = load_data(
        args.data,
        bb.preprocess,
        seed=args.seed if args.split_seed is None else args.split_seed,
        test_size=args.test_size,
    )
    if args.adapter:
        bb.fit_to_task_(task, seed=args.seed)  # data-shaped architectures (CTR tables) before the weights load
    split = task.split(args.split) if args.split in PROTOCOLS[task.protocol] else task.splits[args.split]
    if args.onnx:
        from thrifty.compress.quant.onnx_export import evaluate_onnx

        res = evaluate_onnx(args.onnx, split, args.batch_size)
    else:
        model = load_tuned_model(bb, args.adapter) if args.adapter else model
        res = evaluate(model.to(resolve_device(args.device)), split, args.batch_size, progress=True)
    source = {"adapter": args.adapter} if args.adapter else {"quantized": args.quantized, "onnx": args.onnx}
    out = {**source, "data": task.name, "split": args.split, **res}
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float))
    emit(args, out, f"{task.name} {args.split}: {metrics} ({res.get('samples')} samples)")
    if args.output:
        write_json(args.output, out)
    return 0


def _onnx_backbone(args: argparse.Namespace):
    """The preprocessing of an exported model: --backbone, else the quantize_config.json next to the file."""
    import os

    from thrifty.backbones import load_backbone
    from thrifty.errors import ConfigError
    from thrifty.io import read_json

    if not os.path.isfile(args.onnx):
        raise ConfigError(f"--onnx {args.onnx}: no such file")
    if args.backbone:
        return load_backbone(args.backbone, pretrained=False, max_length=args.max_length, image_size=args.image_size)
    manifest = os.path.join(os.path.dirname(os.path.abspath(args.onnx)), "quantize_config.json")
    if not os.path.isfile(manifest):
        raise ConfigError(
            f"--onnx {args.onnx}: no quantize_config.json next to it to name the backbone; give --backbone (and "
            "--max-length / --image-size as the model was trained)"
        )
    meta = read_json(manifest)["model"]
    return load_backbone(meta["backbone"], pretrained=False, **meta.get("backbone_kwargs", {}))  # as save wrote it
