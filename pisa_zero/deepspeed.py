"""``pisa_zero.deepspeed``: PISA as a DeepSpeed optimizer (re-exports `pisa_zero.integrations.deepspeed`)."""

from .integrations.deepspeed import (
    PISA_KEYS,
    build_optimizer,
    convert_checkpoint,
    initialize,
    is_pisa_config,
    load_universal,
    parse_pisa_params,
    register,
    unregister,
)

__all__ = [
    "PISA_KEYS",
    "build_optimizer",
    "convert_checkpoint",
    "initialize",
    "is_pisa_config",
    "load_universal",
    "parse_pisa_params",
    "register",
    "unregister",
]
