"""PISA's hyper-parameter checks: one function for a param group (at construction and at every ``step()``), and the
error that names the key, so that hosts can name it in their own terms (the DeepSpeed JSON path)."""

from __future__ import annotations

import difflib
import math
import numbers

import torch

from . import functional as F

PRECONDITIONERS = (*F.PRECONDITIONERS, "adamw")


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class HyperparameterError(ValueError):
    """A hyper-parameter PISA refuses; ``key``, ``value`` and ``expected`` let hosts name it in their own terms
    (the DeepSpeed integration says ``optimizer.params.<key>``)."""

    def __init__(self, key: str, value, expected: str, where: str = ""):
        super().__init__(f"PISA: invalid {key}={value!r}{where}: expected {expected}")
        self.key, self.value, self.expected = key, value, expected


def _check_range(name: str, value, ok, expected: str, where: str = "") -> None:
    """HyperparameterError unless ``value`` is a real number (not a str/bool) with ``ok(value)``."""
    if not (_is_real(value) and ok(value)):
        raise HyperparameterError(name, value, expected, where)


def validate_group(group: dict, where: str = "") -> None:
    """Check every hyper-parameter of ``group`` (at construction, and at each step(): schedulers and users
    write groups); ``where`` names the group in the message."""
    p = group["preconditioner"]
    if p not in PRECONDITIONERS:
        raise HyperparameterError("preconditioner", p, f"one of {PRECONDITIONERS}", where)
    lr = group["lr"]
    finite_nonneg = lambda x: math.isfinite(x) and x >= 0  # noqa: E731
    if p == "adamw":
        _check_range("lr", lr, finite_nonneg, "a finite lr >= 0 for adamw", where)
        betas = group["betas"]
        pair = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(map(_is_real, betas))
        if not (pair and all(0 <= b < 1 for b in betas)):
            raise HyperparameterError("betas", betas, "(beta1, beta2), each in [0, 1)", where)
    else:
        if lr is not None:
            _check_range("lr", lr, finite_nonneg, "None or a finite lr >= 0", where)
        _check_range("sigma", group["sigma"], lambda x: math.isfinite(x) and x > 0, "a finite sigma > 0", where)
        _check_range("rho", group["rho"], finite_nonneg, "a finite rho >= 0", where)
        if lr is None and group["sigma"] + group["rho"] <= 0:
            raise HyperparameterError("lr", None, "an explicit lr (sigma + rho is 0)", where)
        if lr == 0 and "lr_ref" not in group:
            raise HyperparameterError("lr", lr, "a reference lr > 0 at construction", where)
        if "lr_ref" in group:
            ok = lambda x: math.isfinite(x) and x > 0  # noqa: E731
            _check_range("lr_ref", group["lr_ref"], ok, "a finite reference lr > 0", where)
        _check_range("beta2", group["beta2"], lambda x: 0 <= x < 1, "beta2 in [0, 1)", where)
        _check_range("momentum", group["momentum"], lambda x: 0 <= x < 1, "momentum in [0, 1)", where)
        if not isinstance(group["nesterov"], bool):
            raise HyperparameterError("nesterov", group["nesterov"], "True or False", where)
        _check_range("l2_lambda", group["l2_lambda"], finite_nonneg, "a finite l2_lambda >= 0", where)
        if group.get("prox_sigma") is not None:
            ok = lambda x: math.isfinite(x) and x > 0  # noqa: E731
            _check_range("prox_sigma", group["prox_sigma"], ok, "None or a finite prox_sigma > 0", where)
        if not isinstance(group.get("centred_dual", False), bool):
            raise ValueError(f"PISA: invalid centred_dual={group['centred_dual']!r}{where}: expected True or False")
        if group.get("ns_dtype", "auto") not in F.NS_DTYPES:
            raise HyperparameterError("ns_dtype", group["ns_dtype"], f"one of {F.NS_DTYPES}", where)
        if group.get("ns_dtype", "auto") == "auto":
            F.bf16_matmul_is_fast(torch.device("cpu"))  # a bad PISA_ZERO_CPU_FAST_BF16 fails here, before any step
        ns = group["ns_steps"]
        _check_range("ns_steps", ns, lambda x: isinstance(x, int) and x >= 1, "an integer ns_steps >= 1", where)
    _check_range("eps", group["eps"], lambda x: math.isfinite(x) and x > 0, "a finite eps > 0", where)
    _check_range("weight_decay", group["weight_decay"], finite_nonneg, "a finite weight_decay >= 0", where)


#: Keys PISA writes into its own groups besides the constructor's defaults.
BOOKKEEPING_KEYS = ("params", "lr_ref", "local_calls", "round_tokens", "prox_sigma", "centred_dual")


def check_group_keys(group: dict, known: set[str], where: str = "") -> None:
    """ValueError for a key that is not PISA's but is close to one of PISA's (``sigmaa``, ``prox_sigmaa``): it would
    be carried and never read. Other unknown keys stay: hosts and schedulers keep their own in param groups (Megatron's
    ``wd_mult`` and ``max_lr``, a scheduler's ``initial_lr``, a ``name``)."""
    for key in group:
        if key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.8)
        if close:
            raise ValueError(f"PISA: unknown key {key!r}{where}: did you mean {close[0]!r}? (PISA would never read it)")
