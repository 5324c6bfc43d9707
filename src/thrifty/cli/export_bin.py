"""`thrifty export-bin`: write the 1-bit-adapter reference repository's raw `.bin` layout (PETL-ViT
`binary_adapter`), so adapter sizes compare byte for byte with the published `models_bin/**.bin` files.

    thrifty export-bin RUN_DIR --output adapter.bin                 # from a saved bi_lora / bi_adaptformer adapter
    thrifty export-bin --method bi_adaptformer --set dim=1 --set bi_head=true \\
        --backbone timm:vit_base_patch16_224 --random-init --num-classes 100 --output size-check.bin
    thrifty export-bin --from-bin cifar-bit1-dim1.bin --method bi_adaptformer --set dim=1 --set bi_head=true \\
        --backbone timm:vit_base_patch16_224.orig_in21k --checkpoint ViT-B_16.npz --num-classes 100 --output DIR

The last form converts a reference `.bin` into a thrifty adapter directory. Exporting from a saved directory only
needs the backbone's architecture (built with random weights), not its weights.
"""

from __future__ import annotations

import argparse
import os


def register(sub) -> argparse.ArgumentParser:
    from thrifty.cli.common import add_backbone_args, add_config_args

    p = sub.add_parser(
        "export-bin",
        help="write a low-bit adapter as the reference repository's raw .bin",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", nargs="?", help="saved adapter directory (adapter_config.json + safetensors)")
    add_config_args(p)
    add_backbone_args(p, required=False)
    p.add_argument("--method", help="bi_lora | bi_adaptformer (build a fresh model instead of loading one)")
    p.add_argument("--num-classes", type=int, help="classes of the fresh model / of the .bin to import")
    p.add_argument("--from-bin", metavar="FILE", help="import a reference .bin into an adapter directory")
    p.add_argument("--output", "-o", required=True, help=".bin file to write (a directory with --from-bin)")
    return p


def _backbone_spec(name: str) -> str:
    """Backbone spec from a saved `base_model_name_or_path` (`hf:minilm` was loaded as `minilm`)."""
    return "minilm" if name == "hf:minilm" else name


def load_lowbit_dir(directory: str, backbone=None):
    """A low-bit model rebuilt from a saved adapter directory (the architecture of its backbone suffices)."""
    from thrifty.backbones import load_backbone
    from thrifty.errors import CheckpointError
    from thrifty.io import read_json
    from thrifty.tuners import CONFIG_NAME, TunedModel, get_method
    from thrifty.tuners.lowbit import LowBitModel

    cfg = read_json(os.path.join(directory, CONFIG_NAME))
    _, model_cls = get_method(cfg.get("method", "?"))
    if not issubclass(model_cls, LowBitModel):
        raise CheckpointError(
            f"{directory} holds a {cfg.get('method')!r} adapter; export-bin needs bi_lora or bi_adaptformer"
        )
    saved = cfg.get("base_model_name_or_path", "")
    backbone = backbone or load_backbone(_backbone_spec(saved), pretrained=False)
    if saved and saved != backbone.name:
        raise CheckpointError(f"adapter in {directory} was trained on {saved!r}, not {backbone.name!r}")
    return TunedModel.from_pretrained(backbone, directory, check_weights=False).eval()  # the architecture suffices


def run(args: argparse.Namespace) -> int:
    from thrifty.backbones import load_backbone
    from thrifty.cli.common import backbone_spec
    from thrifty.errors import ConfigError
    from thrifty.tuners import get_tuned_model, make_config
    from thrifty.tuners.lowbit import LowBitModel, read_bin, write_bin

    if bool(args.adapter) == bool(args.method):
        raise ConfigError("give either a saved adapter directory or --method (with --backbone and --num-classes)")
    if args.adapter:
        if args.from_bin:
            raise ConfigError("--from-bin builds a model from --method; do not also pass an adapter directory")
        bb = load_backbone(backbone_spec(args)) if args.backbone else None
        model = load_lowbit_dir(args.adapter, bb)
    else:
        if not args.backbone or not args.num_classes:
            raise ConfigError("--method needs --backbone and --num-classes")
        spec = backbone_spec(args)
        if not args.from_bin and spec.checkpoint is None:
            spec = spec.replace(random_init=True)  # sizes only: the architecture is enough
        model = get_tuned_model(load_backbone(spec), make_config(args.method, args.overrides), args.num_classes)
        if not isinstance(model, LowBitModel):
            raise ConfigError(f"export-bin needs bi_lora or bi_adaptformer, not {args.method!r}")
        if args.from_bin:
            read_bin(model, args.from_bin)
            model.save_pretrained(args.output)
            print(f"imported {args.from_bin} ({os.path.getsize(args.from_bin):,d} B) into {args.output}")
            return 0
    size = write_bin(model, args.output)
    sizes = model.bin_bytes()
    print(
        f"wrote {args.output}: {size:,d} B (adapters {sizes['bin_adapter_bytes']:,d} B + head "
        f"{sizes['bin_head_bytes']:,d} B; {model.config.method} bits={model.config.bits} dim={model.config.dim} "
        f"bi_head={model.config.bi_head}, {model.num_classes} classes, {model.backbone.name})"
    )
    return 0
