"""thrifty: adapt and compress large pretrained models on small budgets."""

__version__ = "0.1.0"

from thrifty.backbones import Backbone, load_backbone  # noqa: E402
from thrifty.data import TaskData, load_data  # noqa: E402
from thrifty.tuners import (  # noqa: E402
    TunedModel,
    available_methods,
    get_tuned_model,
    load_tuned_model,
    make_config,
    register_method,
)


__all__ = [
    "Backbone", "TaskData", "TunedModel", "__version__", "available_methods", "get_tuned_model", "load_backbone",
    "load_data", "load_tuned_model", "make_config", "register_method",
]
