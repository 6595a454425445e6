"""``pisa_zero.deepspeed``: PISA as a DeepSpeed optimizer (re-exports `pisa_zero.integrations.deepspeed`)."""

from .integrations.deepspeed import (
    PISA_KEYS,
    add_config_arguments,
    build_optimizer,
    initialize,
    install_nsisa,
    is_pisa_config,
    parse_pisa_params,
    register,
    unregister,
)
from .integrations.deepspeed_checkpoint import convert_checkpoint, load_universal

__all__ = [
    "PISA_KEYS",
    "add_config_arguments",
    "build_optimizer",
    "convert_checkpoint",
    "initialize",
    "install_nsisa",
    "is_pisa_config",
    "load_universal",
    "parse_pisa_params",
    "register",
    "unregister",
]
