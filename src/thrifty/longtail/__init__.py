"""Long-tailed recognition on top of the one Trainer: BTM (balanced undersampling + weight merging, with a
class-balanced classifier re-training stage), cRT, weight-space merging, and the baselines as recipes.

The data side (`:lt<IF>`, shot groups, balanced subsets) is `thrifty.data.longtail`; the metrics, criteria and
sampler are the `long_tail` objective (`thrifty.objectives.long_tail`)."""

from thrifty.longtail.btm import BTMConfig, BTMRun, build_backbone
from thrifty.longtail.merge import average_states, greedy_soup
from thrifty.longtail.recipes import BASELINES, Baseline
from thrifty.longtail.stage2 import LWSHead, Stage2Config, head_only, retrain_classifier
from thrifty.longtail.worker import run_workers


__all__ = [
    "BASELINES",
    "BTMConfig",
    "BTMRun",
    "Baseline",
    "LWSHead",
    "Stage2Config",
    "average_states",
    "build_backbone",
    "greedy_soup",
    "head_only",
    "retrain_classifier",
    "run_workers",
]
