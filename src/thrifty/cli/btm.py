"""`thrifty btm`: BTM on long-tailed data (balanced undersampled subsets fine-tuned from a stage-1 model, merged
by weight averaging, then class-balanced classifier re-training); or, with --crt-from DIR, only the cRT stage on a
finished run. The training flags are stage 1's; the subset fine-tunes and stage 2 have their own flags. Subsets
run in --workers processes (or one per torchrun rank); --resume continues a killed run at the subset level.
The final model is OUTPUT/stage2 (a normal adapter directory: `thrifty eval` loads it)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from thrifty.cli.common import add_config_args, add_options, backbone_spec, train_config
from thrifty.train.options import BACKBONE, DATA, TRAINING


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "btm",
        help="BTM / cRT for long-tailed data",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_args(p)
    add_options(p, (*BACKBONE, *DATA, *TRAINING))
    g = p.add_argument_group("btm")
    g.add_argument("--method", required=True, help="a registered method (full for a from-scratch CNN, linear, ...)")
    g.add_argument("--objective", default="long_tail:mixup=0.2", help="stage 1 and fine-tune objective")
    g.add_argument("--output", required=True)
    g.add_argument("--resume", action="store_true")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--subsets", type=int, default=10, help="M balanced subsets")
    g.add_argument("--per-class", type=int, default=10, help="K: each subset takes min(n_c, K) per class")
    g.add_argument("--merge", choices=("uniform", "greedy"), default="uniform")
    g.add_argument("--soup-role", choices=("val", "train"), default="val", help="greedy soup: selection split")
    g.add_argument("--workers", type=int, default=1, help="subset fine-tunes in this many processes")
    g.add_argument("--theta0", help="reuse a finished run directory as stage 1 (e.g. the mixup baseline)")
    g.add_argument("--cache", help="feature-cache dir (side methods train on cached taps)")
    g.add_argument("--finetune-epochs", type=int, help="default: --epochs")
    g.add_argument("--finetune-lr", type=float, help="default: --lr")
    g.add_argument("--finetune-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--stage2", choices=("las", "ce", "gml", "none"), default="las", help="stage-2 criterion")
    g.add_argument("--stage2-epochs", type=int, default=10)
    g.add_argument("--stage2-lr", type=float, help="head lr (default: --lr x 0.05, MiSLAS)")
    g.add_argument("--no-shift-bn", action="store_true", help="keep BatchNorm statistics in stage 2")
    g.add_argument("--no-lws", action="store_true", help="no learnable weight scaling in stage 2")
    g.add_argument("--reinit-head", action="store_true", help="stage 2 starts from a fresh head (cRT)")
    g.add_argument("--crt-from", help="only re-train the classifier of this finished run (cRT) into --output")
    return p


def run(args: argparse.Namespace) -> int:
    from thrifty.longtail import BTMConfig, BTMRun, Stage2Config

    stage1 = train_config(args)
    if args.crt_from:
        return _crt(args, stage1)
    s2 = None
    if args.stage2 != "none":
        s2 = Stage2Config(
            criterion=args.stage2, shift_bn=not args.no_shift_bn, lws=not args.no_lws, reinit=args.reinit_head
        )
    stage2_train = dataclasses.replace(stage1, epochs=args.stage2_epochs, lr=args.stage2_lr or stage1.lr * 0.05)
    finetune = dataclasses.replace(
        stage1,
        epochs=args.finetune_epochs or stage1.epochs,
        lr=args.finetune_lr or stage1.lr,
        batch_size=args.finetune_batch_size or stage1.batch_size,
    )
    config = BTMConfig(args.subsets, args.per_class, args.merge, args.soup_role, stage2=s2, workers=args.workers)
    results = BTMRun.create(
        args.output,
        backbone=backbone_spec(args),
        data=args.data,
        method=args.method,
        overrides=args.overrides,
        objective=args.objective,
        stage1=stage1,
        finetune=finetune,
        stage2=stage2_train,
        config=config,
        theta0=args.theta0,
        split_seed=args.split_seed,
        test_size=args.test_size,
        cache=args.cache,
        resume=args.resume,
        overwrite=args.overwrite,
    ).run()
    if results:
        print(json.dumps({k: v for k, v in results["metrics"].items() if k.startswith("test_")}, indent=2))
    return 0


def _crt(args: argparse.Namespace, train) -> int:
    import copy

    import numpy as np

    from thrifty.data import load_data
    from thrifty.longtail import Stage2Config, build_backbone, retrain_classifier
    from thrifty.train.run import use_feature_cache
    from thrifty.tuners import TunedModel

    bb = build_backbone(backbone_spec(args))
    task = load_data(args.data, bb.preprocess, seed=args.split_seed or train.seed, test_size=args.test_size)
    model = TunedModel.from_pretrained(copy.deepcopy(bb), args.crt_from, is_trainable=True, check_weights=False)
    if args.cache:
        task = use_feature_cache([model], task, args.cache, train)
    counts = np.bincount(task.split(train.train_role).labels, minlength=task.num_classes).tolist()
    res = retrain_classifier(model, task, train, Stage2Config.crt(), counts, args.output, {"after": args.crt_from})
    print(json.dumps({k: v for k, v in res["metrics"].items() if k.startswith("test_")}, indent=2))
    return 0
