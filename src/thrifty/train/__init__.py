"""Training: one loop for every method and objective (`Trainer`, N members on one data pass), and
`run_training` from spec strings to results.json."""

from thrifty.train.config import TrainConfig
from thrifty.train.evaluate import evaluate, evaluate_many
from thrifty.train.members import Member
from thrifty.train.run import run_training
from thrifty.train.trainer import RESULTS_NAME, Trainer


__all__ = ["RESULTS_NAME", "Member", "TrainConfig", "Trainer", "evaluate", "evaluate_many", "run_training"]
