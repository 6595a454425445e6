"""The DeepSpeed JSON as PISA reads it: ``optimizer.params`` parsed and validated into a :class:`PISASpec`, and the
flags DeepSpeed needs for a client optimizer set (or what cannot work refused) before any process-group work."""

from __future__ import annotations

import copy
import inspect
import json
import os
import warnings
from dataclasses import dataclass

import torch

from ...hyperparameters import HyperparameterError
from ...optimizer import PISA
from ...param_groups import param_groups as _auto_param_groups
from ...routing import check_routing_bytes
from .layout import check_deepspeed_version

#: PISA constructor keywords a JSON ``optimizer.params`` block may set.
PISA_KEYS = tuple(
    k for k in inspect.signature(PISA.__init__).parameters if k not in ("self", "params", "consensus", "orthogonalizer")
)
#: Keys of ``optimizer.params`` that are ours, not PISA's constructor's: how parameters are grouped, and how the host
#: runs them (``agents``: mode B with that many agents, see :class:`AgentMPU`; ``routing_bytes``: nsisa's routing
#: buffers per rank and round, see `pisa_zero.routing.MatrixRouter`).
GROUPING_KEYS = (
    "param_groups",
    "matrix_preconditioner",
    "other_preconditioner",
    "other_options",
    "agents",
    "routing_bytes",
)
#: Per-group options a ``other_options`` block may set.
GROUP_OPTION_KEYS = (
    "lr",
    "sigma",
    "rho",
    "betas",
    "eps",
    "weight_decay",
    "beta2",
    "momentum",
    "nesterov",
    "l2_lambda",
    "ns_steps",
    "ns_dtype",
)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
#: ``"param_groups"`` value that routes block matrices to ``preconditioner`` and the rest to ``other_preconditioner``
#: (`pisa_zero.param_groups`). Not ``"auto"``: Hugging Face's Trainer and accelerate take every ``"auto"`` in a
#: DeepSpeed JSON for their own placeholder and refuse the ones they cannot fill.
BY_ROLE = "by_role"
#: The first spelling of :data:`BY_ROLE`, still read (with a warning) for configs written before it.
LEGACY_BY_ROLE = "auto"
#: Top-level keys that only some preconditioners read: a JSON that sets one no group reads is refused, not ignored.
READ_BY = {
    "betas": {"adamw"},
    "beta2": {"sisa"},
    "momentum": {"nsisa"},
    "nesterov": {"nsisa"},
    "ns_steps": {"nsisa"},
    "ns_dtype": {"nsisa"},
}


def _load_config(args, config) -> tuple[dict, object]:
    """The DeepSpeed config as a dict (a deep copy) and the ``args`` to hand DeepSpeed (its config slot emptied)."""
    source = config
    ds_args = args
    for attr in ("deepspeed_config", "deepscale_config"):
        value = getattr(args, attr, None) if args is not None else None
        if value is not None:
            if source is not None:
                raise ValueError(f"pisa_zero.deepspeed: both args.{attr}={value!r} and config= were given")
            source = value
            ds_args = copy.copy(args)
            setattr(ds_args, attr, None)
    if source is None:
        raise ValueError("pisa_zero.deepspeed: no DeepSpeed config (pass config= or args.deepspeed_config)")
    if isinstance(source, dict):
        return copy.deepcopy(source), ds_args
    if isinstance(source, (str, os.PathLike)):
        with open(source) as f:
            return json.load(f), ds_args
    raise ValueError(f"pisa_zero.deepspeed: config must be a dict or a JSON path, got {type(source).__name__}")


def is_pisa_config(config: dict) -> bool:
    opt = config.get("optimizer") or {}
    return isinstance(opt, dict) and str(opt.get("type", "")).lower() == "pisa"


@dataclass(frozen=True)
class PISASpec:
    """What ``optimizer.params`` asks for: PISA's constructor kwargs and the grouping."""

    kwargs: dict
    auto_groups: bool
    matrix_preconditioner: str | None
    other_preconditioner: str
    other_options: dict
    agents: int = 1
    routing_bytes: int | None = None  # None: pisa_zero.routing.ROUTING_BYTES

    def preconditioners(self) -> set[str]:
        if not self.auto_groups:
            return {self.kwargs.get("preconditioner", "sisa")}
        return {self.matrix_preconditioner, self.other_preconditioner}

    def groups(self, model: torch.nn.Module) -> list[dict]:
        return _auto_param_groups(
            model,
            matrix_preconditioner=self.matrix_preconditioner,
            other_preconditioner=self.other_preconditioner,
            other_options=self.other_options,
        )


def _warn_legacy_by_role() -> None:
    warnings.warn(
        f'pisa_zero.deepspeed: optimizer.params "param_groups": "{LEGACY_BY_ROLE}" is read as "{BY_ROLE}"; write '
        f'"{BY_ROLE}" (Hugging Face Trainer and accelerate take every "auto" in the JSON for their own placeholder '
        "and refuse this one)",
        FutureWarning,
        stacklevel=3,
    )


def _refuse_unread_keys(spec: PISASpec) -> None:
    """ValueError naming a top-level key that no param group reads (Hugging Face's Trainer fills ``"betas": "auto"``
    with its Adam betas, which only an ``adamw`` group reads)."""
    if spec.auto_groups:
        readers = {key: {spec.matrix_preconditioner} for key in READ_BY}
        for key in READ_BY:
            if key not in spec.other_options:  # the other group's own value wins over the top-level one
                readers[key].add(spec.other_preconditioner)
    else:
        readers = {key: {spec.kwargs.get("preconditioner", "sisa")} for key in READ_BY}
    for key, preconditioners in READ_BY.items():
        if key in spec.kwargs and not preconditioners & readers[key]:
            where = " and other_options sets its own" if spec.auto_groups and key in spec.other_options else ""
            raise ValueError(
                f"pisa_zero.deepspeed: optimizer.params.{key}={spec.kwargs[key]!r} is read by no param group: only "
                f"{'/'.join(sorted(preconditioners))} groups read it, the groups here are "
                f"{'/'.join(sorted(spec.preconditioners()))}{where}; remove it (Hugging Face's Trainer fills a "
                f'"{key}": "auto" from its own arguments)'
            )


def parse_pisa_params(params: dict | None) -> PISASpec:
    """Validate a JSON ``optimizer.params`` block; ValueError naming the key for anything unknown or out of range.

    The ranges are PISA's own (checked by constructing PISA on dummy tensors), never re-implemented here.
    """
    params = dict(params or {})
    for key in params:
        if key not in PISA_KEYS and key not in GROUPING_KEYS:
            raise ValueError(
                f"pisa_zero.deepspeed: unknown key optimizer.params.{key!r}; "
                f"expected one of {sorted(PISA_KEYS + GROUPING_KEYS)}"
            )
    kwargs = {k: params[k] for k in PISA_KEYS if k in params}
    if "state_dtype" in kwargs and isinstance(kwargs["state_dtype"], str):
        name = kwargs["state_dtype"]
        if name not in _DTYPES:
            raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params.state_dtype={name!r}: expected {_DTYPES}")
        kwargs["state_dtype"] = _DTYPES[name]
    if "betas" in kwargs:
        betas = kwargs["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params.betas={betas!r}: expected [beta1, beta2]")
        kwargs["betas"] = tuple(betas)
    grouping = params.get("param_groups")
    if grouping == LEGACY_BY_ROLE:
        _warn_legacy_by_role()
        grouping = BY_ROLE
    if grouping not in (None, BY_ROLE):
        raise ValueError(
            f"pisa_zero.deepspeed: invalid optimizer.params.param_groups={grouping!r}: expected {BY_ROLE!r}"
        )
    auto = grouping == BY_ROLE
    for key in ("matrix_preconditioner", "other_preconditioner", "other_options"):
        if key in params and not auto:
            raise ValueError(f'pisa_zero.deepspeed: optimizer.params.{key} needs "param_groups": "{BY_ROLE}"')
    other_options = dict(params.get("other_options") or {})
    for key in other_options:
        if key not in GROUP_OPTION_KEYS:
            raise ValueError(
                f"pisa_zero.deepspeed: unknown key optimizer.params.other_options.{key!r}; "
                f"expected one of {list(GROUP_OPTION_KEYS)}"
            )
    if isinstance(other_options.get("betas"), list):  # anything else is PISA's to refuse, by name
        other_options["betas"] = tuple(other_options["betas"])
    other = params.get("other_preconditioner", "adamw")
    if other == "adamw":
        other_options.setdefault("lr", 3e-3)
        other_options.setdefault("weight_decay", 0.0)
    matrix = params.get("matrix_preconditioner", kwargs.get("preconditioner", "nsisa")) if auto else None
    agents = params.get("agents", 1)
    if isinstance(agents, bool) or not isinstance(agents, int) or agents < 1:
        raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params.agents={agents!r}: expected an integer >= 1")
    routing_bytes = params.get("routing_bytes")
    if routing_bytes is not None:
        check_routing_bytes(routing_bytes, "pisa_zero.deepspeed", "optimizer.params.routing_bytes")
    spec = PISASpec(kwargs, auto, matrix, other, other_options, agents, routing_bytes)
    _refuse_unread_keys(spec)
    if routing_bytes is not None and "nsisa" not in spec.preconditioners():
        raise ValueError(
            f"pisa_zero.deepspeed: optimizer.params.routing_bytes={routing_bytes!r} is read by no param group: only "
            f"nsisa groups route matrices, the groups here are {'/'.join(sorted(spec.preconditioners()))}; remove it"
        )
    # Validation by PISA itself, on dummies: the message names the key and the value. (local_steps > 1 needs agents:
    # a one-agent dummy topology here; initialize() checks that the run has agents.)
    dummy = {}
    if kwargs.get("local_steps", 1) != 1:
        from ...consensus import AgentTopology

        dummy["consensus"] = AgentTopology(None)
    try:
        if auto:
            PISA(
                [
                    {"params": [torch.zeros(2, 2)], "preconditioner": matrix},
                    {"params": [torch.zeros(2)], "preconditioner": other, **other_options},
                ],
                **kwargs,
                **dummy,
            )
        else:
            PISA([torch.zeros(2, 2)], **kwargs, **dummy)
    except HyperparameterError as e:  # the JSON path of the key, not PISA's dummy param group
        key = f"other_options.{e.key}" if auto and e.key in other_options else e.key
        message = f"pisa_zero.deepspeed: invalid optimizer.params.{key}={e.value!r}: expected {e.expected}"
        raise ValueError(message) from e
    except (ValueError, TypeError) as e:
        raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params: {e}") from e
    return spec


#: NVMe offload: DeepSpeed's swap buffers a sub-group needs at once with PISA (fp32 weights, two states, gradient)
NVME_BUFFERS = 4


def _zero_config(config: dict) -> dict:
    return config.get("zero_optimization") or {}


def zero_stage(config: dict) -> int:
    return int(_zero_config(config).get("stage", 0))


def offload_device(config: dict) -> str:
    """``zero_optimization.offload_optimizer.device``, lower-case; "none" without offload."""
    off = _zero_config(config).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() if isinstance(off, dict) else "none"


def _check_async_io() -> None:
    """NVMe offload reads and writes through DeepSpeed's async I/O op, which builds only against libaio."""
    from deepspeed.accelerator import get_accelerator

    if not get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False):
        raise ValueError(
            "pisa_zero.deepspeed: zero_optimization.offload_optimizer.device='nvme' needs DeepSpeed's async I/O op, "
            "which needs libaio: apt-get install libaio-dev (Debian/Ubuntu) or dnf install libaio-devel (Fedora/RHEL)"
        )


def prepare_config(config: dict, spec: PISASpec) -> dict:
    """Set the flags DeepSpeed needs for PISA unless the user set them; refuse what cannot work (before any
    process-group work)."""
    zero = _zero_config(config)
    stage = zero_stage(config)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"pisa_zero.deepspeed: invalid zero_optimization.stage={stage!r}")
    config.setdefault("zero_allow_untested_optimizer", True)
    offload = offload_device(config)
    if spec.kwargs.get("local_steps", 1) > 1 and stage in (1, 2) and offload == "none":
        # ZeRO-1/2 all-reduce a gradient norm every step over their "model-parallel" group, i.e. across agents in
        # mode B; with local steps nothing may cross agents between rounds (the norm only serves clipping, refused
        # in mode B). ZeRO-3 and offload keep that 4-byte all-reduce (docs/deepspeed.md).
        zero.setdefault("compute_grad_norm", False)
    if offload != "none":
        config.setdefault("zero_force_ds_cpu_optimizer", False)
        if zero.get("offload_optimizer", {}).get("ratio", 1.0) != 1.0:
            raise ValueError(
                "pisa_zero.deepspeed: zero_optimization.offload_optimizer.ratio != 1 (partial offload) needs "
                "DeepSpeedCPUAdam; PISA supports full offload only"
            )
    bf16 = config.get("bf16") or {}
    if isinstance(bf16, dict) and bf16.get("enabled") and stage in (1, 2):
        # Without it ZeRO-1/2 in bf16 does not skip a step on inf/NaN gradients; PISA's own (rank-local) skip would
        # then let ranks diverge. DeepSpeed's check is global.
        bf16.setdefault("check_grad_overflow", True)
    low_precision = any(isinstance(config.get(k), dict) and config[k].get("enabled") for k in ("bf16", "fp16"))
    if "nsisa" in spec.preconditioners() and stage == 0 and low_precision:
        raise ValueError(
            "pisa_zero.deepspeed: preconditioner 'nsisa' with bf16/fp16 at zero_optimization.stage=0 is not supported "
            "(DeepSpeed's FP16/BF16 optimizer wrappers flatten all parameters); use ZeRO stage 1, 2 or 3"
        )
    if spec.routing_bytes is not None and stage == 0:
        raise ValueError(
            "pisa_zero.deepspeed: optimizer.params.routing_bytes is read at zero_optimization.stage 1, 2 or 3 only "
            "(stage 0 keeps whole matrices on every rank: nothing is routed); remove it"
        )
    grad_accum = str((config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    if "nsisa" in spec.preconditioners() and stage == 1 and low_precision and grad_accum in ("fp32", "float32"):
        raise ValueError(
            "pisa_zero.deepspeed: preconditioner 'nsisa' at zero_optimization.stage=1 with "
            "data_types.grad_accum_dtype='fp32' selects DeepSpeed's BF16_Optimizer, whose partition layout pisa_zero "
            "does not read; use stage 2 or drop grad_accum_dtype"
        )
    if offload == "nvme":
        _check_async_io()
        buffers = (zero.get("offload_optimizer") or {}).get("buffer_count", NVME_BUFFERS)
        if isinstance(buffers, bool) or not isinstance(buffers, int) or buffers < NVME_BUFFERS:
            raise ValueError(
                f"pisa_zero.deepspeed: zero_optimization.offload_optimizer.buffer_count={buffers!r}: PISA swaps a "
                f"partition's fp32 weights, its two states and its gradient at once; expected an integer >= "
                f"{NVME_BUFFERS}"
            )
    if "nsisa" in spec.preconditioners() and stage in (1, 2, 3):
        for key in ("zero_hpz_partition_size", "mics_shard_size"):
            if int(zero.get(key, 1) if key != "mics_shard_size" else zero.get(key, -1)) > 1:
                raise ValueError(
                    f"pisa_zero.deepspeed: preconditioner 'nsisa' with zero_optimization.{key} > 1 is not supported"
                )
        check_deepspeed_version()
    return config
