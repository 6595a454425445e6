"""pisa_zero: the PISA optimizer (Preconditioned Inexact Stochastic ADMM) with ZeRO-style sharded state."""

from .optimizer import PISA, grads_are_finite
from .param_groups import param_groups

__all__ = ["PISA", "grads_are_finite", "param_groups"]
__version__ = "0.1.0"
