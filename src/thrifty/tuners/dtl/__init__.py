"""`dtl`, `dtl_plus`: Disentangled Transfer Learning with a compact side network (Fu, Zhu & Wu, AAAI 2024)."""

from thrifty.tuners.dtl.config import DTLConfig, DTLPlusConfig
from thrifty.tuners.dtl.model import DTLModel
from thrifty.tuners.registry import register_method


register_method(DTLConfig, DTLModel)
register_method(DTLPlusConfig, DTLModel)
__all__ = ["DTLConfig", "DTLModel", "DTLPlusConfig"]
