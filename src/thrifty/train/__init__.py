"""Training: one loop for every method (`Trainer`), and `run_training` from spec strings to results.json."""

from thrifty.train.loop import TrainConfig, Trainer, evaluate
from thrifty.train.run import RESULTS_NAME, run_training


__all__ = ["RESULTS_NAME", "TrainConfig", "Trainer", "evaluate", "run_training"]
