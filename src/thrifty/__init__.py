"""thrifty: adapt and compress large pretrained models on small budgets."""

from thrifty import train  # the training layer, as the README uses it: thrifty.train.run_training
from thrifty.backbones import Backbone, BackboneSpec, load_backbone, register_backbone
from thrifty.data import TaskData, load_data, register_dataset
from thrifty.objectives import Objective, make_objective, register_objective
from thrifty.tuners import (
    TunedModel,
    available_methods,
    get_tuned_model,
    load_tuned_model,
    make_config,
    register_method,
)
from thrifty.version import __version__


__all__ = [
    "Backbone",
    "BackboneSpec",
    "Objective",
    "TaskData",
    "TunedModel",
    "__version__",
    "available_methods",
    "get_tuned_model",
    "load_backbone",
    "load_data",
    "load_tuned_model",
    "make_config",
    "make_objective",
    "register_backbone",
    "register_dataset",
    "register_method",
    "register_objective",
    "train",
]
