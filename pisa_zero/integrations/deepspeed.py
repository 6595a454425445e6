"""PISA as a first-class DeepSpeed optimizer: ZeRO-1/2/3, bf16/fp16, CPU offload, NSISA on whole matrices.

Two entry points (see ``docs/deepspeed.md``):

- :func:`initialize` — a drop-in for ``deepspeed.initialize`` that reads ``"optimizer": {"type": "PISA", "params":
  {...}}`` from the JSON (path, dict or ``args.deepspeed_config``), validates it before any process-group work, sets
  the flags DeepSpeed needs for a client optimizer and builds PISA through a callable.
- :func:`register` — replaces the ``deepspeed.initialize`` attribute of the ``deepspeed`` module with a wrapper that
  routes configs whose optimizer type is ``PISA`` to :func:`initialize` and everything else to DeepSpeed unchanged,
  so an unchanged script that calls ``deepspeed.initialize(...)`` gets PISA.

NSISA (Newton–Schulz on whole matrices) under ZeRO: DeepSpeed hands the optimizer flat 1-D partitions that cut across
parameters. The nsisa momentum and everything after Newton–Schulz are elementwise, so they run on the flat partition;
only ``O = NS5(u)`` needs whole matrices. :class:`_PartitionOrthogonalizer` is installed as the optimizer's
``flat_partition_orthogonalizer``: inside ``step()`` it all-gathers the nsisa direction ``u`` of the partition over
the data-parallel group (same volume as ZeRO's own parameter all-gather), rebuilds each whole matrix from the
partition layout DeepSpeed recorded (ZeRO-1/2: ``round_robin_bit16_offsets``/``partition_size``; ZeRO-3: per-parameter
``ds_tensor`` partitions of a sub-group), orthogonalises them batched, and keeps this rank's slice. Nothing inside
DeepSpeed is patched; the attributes read are checked at install time (:func:`_check_deepspeed_internals`), so a
DeepSpeed upgrade that renames them fails loudly at ``initialize`` (and in ``tests/test_deepspeed.py``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import functional as F
from ..consensus import comm_device
from ..optimizer import PISA
from ..param_groups import param_groups as _auto_param_groups

logger = logging.getLogger(__name__)

#: DeepSpeed versions whose ZeRO internals the NSISA partition layout and the checkpoint conversion were checked on.
TESTED_DEEPSPEED = ((0, 19),)

#: PISA constructor keywords a JSON ``optimizer.params`` block may set.
PISA_KEYS = tuple(k for k in inspect.signature(PISA.__init__).parameters if k not in ("self", "params", "consensus"))
#: Keys of ``optimizer.params`` that select how parameters are grouped (ours, not PISA's constructor).
#: (``agents``: mode B with that many agents; see :class:`AgentMPU`.)
GROUPING_KEYS = ("param_groups", "matrix_preconditioner", "other_preconditioner", "other_options", "agents")
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
)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------- config
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
    if grouping not in (None, "auto"):
        raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params.param_groups={grouping!r}: expected 'auto'")
    auto = grouping == "auto"
    for key in ("matrix_preconditioner", "other_preconditioner", "other_options"):
        if key in params and not auto:
            raise ValueError(f'pisa_zero.deepspeed: optimizer.params.{key} needs "param_groups": "auto"')
    other_options = dict(params.get("other_options") or {})
    for key in other_options:
        if key not in GROUP_OPTION_KEYS:
            raise ValueError(
                f"pisa_zero.deepspeed: unknown key optimizer.params.other_options.{key!r}; "
                f"expected one of {list(GROUP_OPTION_KEYS)}"
            )
    if "betas" in other_options:
        other_options["betas"] = tuple(other_options["betas"])
    other = params.get("other_preconditioner", "adamw")
    if other == "adamw":
        other_options.setdefault("lr", 3e-3)
        other_options.setdefault("weight_decay", 0.0)
    matrix = params.get("matrix_preconditioner", kwargs.get("preconditioner", "nsisa")) if auto else None
    agents = params.get("agents", 1)
    if isinstance(agents, bool) or not isinstance(agents, int) or agents < 1:
        raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params.agents={agents!r}: expected an integer >= 1")
    spec = PISASpec(kwargs, auto, matrix, other, other_options, agents)
    # Validation by PISA itself, on dummies: the message names the key and the value.
    try:
        if auto:
            PISA(
                [
                    {"params": [torch.zeros(2, 2)], "preconditioner": matrix},
                    {"params": [torch.zeros(2)], "preconditioner": other, **other_options},
                ],
                **kwargs,
            )
        else:
            PISA([torch.zeros(2, 2)], **kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"pisa_zero.deepspeed: invalid optimizer.params: {e}") from e
    return spec


def _zero_config(config: dict) -> dict:
    return config.get("zero_optimization") or {}


def _offload_device(config: dict) -> str:
    off = _zero_config(config).get("offload_optimizer") or {}
    return str(off.get("device", "none")).lower() if isinstance(off, dict) else "none"


def prepare_config(config: dict, spec: PISASpec) -> dict:
    """Set the flags DeepSpeed needs for PISA unless the user set them; refuse what cannot work (before any
    process-group work)."""
    zero = _zero_config(config)
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"pisa_zero.deepspeed: invalid zero_optimization.stage={stage!r}")
    config.setdefault("zero_allow_untested_optimizer", True)
    offload = _offload_device(config)
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
    grad_accum = str((config.get("data_types") or {}).get("grad_accum_dtype", "")).lower()
    if "nsisa" in spec.preconditioners() and stage == 1 and low_precision and grad_accum in ("fp32", "float32"):
        raise ValueError(
            "pisa_zero.deepspeed: preconditioner 'nsisa' at zero_optimization.stage=1 with "
            "data_types.grad_accum_dtype='fp32' selects DeepSpeed's BF16_Optimizer, whose partition layout pisa_zero "
            "does not read; use stage 2 or drop grad_accum_dtype"
        )
    if "nsisa" in spec.preconditioners() and stage in (1, 2, 3):
        if offload == "nvme":
            raise ValueError(
                "pisa_zero.deepspeed: preconditioner 'nsisa' with zero_optimization.offload_optimizer.device='nvme' "
                "is not supported (use 'cpu' or a sisa/adamw preconditioner)"
            )
        for key in ("zero_hpz_partition_size", "mics_shard_size"):
            if int(zero.get(key, 1) if key != "mics_shard_size" else zero.get(key, -1)) > 1:
                raise ValueError(
                    f"pisa_zero.deepspeed: preconditioner 'nsisa' with zero_optimization.{key} > 1 is not supported"
                )
        _check_deepspeed_version()
    return config


def _check_deepspeed_version() -> None:
    import deepspeed

    major_minor = tuple(int(x) for x in deepspeed.__version__.split(".")[:2])
    if major_minor not in TESTED_DEEPSPEED:
        raise ValueError(
            f"pisa_zero.deepspeed: preconditioner 'nsisa' under ZeRO reads DeepSpeed's partition layout, checked on "
            f"DeepSpeed {TESTED_DEEPSPEED}; installed {deepspeed.__version__}. Run tests/test_deepspeed.py on this "
            "version and add it to pisa_zero.integrations.deepspeed.TESTED_DEEPSPEED, or use 'sisa'."
        )


# -------------------------------------------------------------------------------------------------- builders
def optimizer_factory(spec: PISASpec, model: torch.nn.Module | None, consensus=None) -> Callable:
    """The callable DeepSpeed calls with ``model_parameters`` to build PISA (``consensus``: mode B topology)."""

    def build(model_parameters):
        if spec.auto_groups:
            if model is None:
                raise ValueError('pisa_zero.deepspeed: "param_groups": "auto" needs the model')
            return PISA(spec.groups(model), consensus=consensus, **spec.kwargs)
        return PISA(model_parameters, consensus=consensus, **spec.kwargs)

    return build


def build_optimizer(model: torch.nn.Module, config: dict | str, model_parameters=None):
    """(PISA, scheduler or None) exactly as :func:`initialize` would build them, for a single-process run of the
    same config (reference runs, evaluation scripts). The scheduler is DeepSpeed's, from ``config["scheduler"]``."""
    config, _ = _load_config(None, config)
    if not is_pisa_config(config):
        raise ValueError('pisa_zero.deepspeed: config["optimizer"]["type"] is not "PISA"')
    spec = parse_pisa_params(config["optimizer"].get("params"))
    params = model_parameters if model_parameters is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(spec, model)(params)
    scheduler = None
    sched = config.get("scheduler")
    if sched:
        from deepspeed.runtime import lr_schedules

        scheduler = getattr(lr_schedules, sched["type"])(optimizer, **sched.get("params", {}))
    return optimizer, scheduler


def initialize(args=None, model=None, optimizer=None, model_parameters=None, config=None, *, topology=None, **kwargs):
    """Drop-in for ``deepspeed.initialize`` that builds PISA from ``"optimizer": {"type": "PISA", "params": ...}``.

    Returns what ``deepspeed.initialize`` returns: ``(engine, optimizer, training_dataloader, lr_scheduler)``.
    A config whose optimizer is not PISA, or an explicit ``optimizer=``, is passed to DeepSpeed unchanged.

    Mode B (agents): pass ``topology=`` (a `pisa_zero.consensus.AgentTopology`) or set ``"agents": m`` in
    ``optimizer.params``; DeepSpeed then shards and averages inside each agent only (through :class:`AgentMPU`) and
    PISA runs the consensus across agents. Batch sizes in the config are per agent.
    """
    import deepspeed

    if "config_params" in kwargs and config is None:
        config = kwargs.pop("config_params")
    cfg, ds_args = _load_config(args, config)
    if optimizer is not None or not is_pisa_config(cfg):
        return _original_initialize()(
            args=ds_args, model=model, optimizer=optimizer, model_parameters=model_parameters, config=cfg, **kwargs
        )
    if model is None:
        raise ValueError("pisa_zero.deepspeed: initialize requires a model")
    spec = parse_pisa_params(cfg["optimizer"].get("params"))
    cfg = prepare_config(cfg, spec)
    if topology is not None or spec.agents > 1:
        if kwargs.get("mpu") is not None:
            raise ValueError("pisa_zero.deepspeed: mode B (topology= / optimizer.params.agents) replaces mpu=")
        if float(cfg.get("gradient_clipping", 0.0) or 0.0) > 0:
            raise ValueError(
                "pisa_zero.deepspeed: gradient_clipping > 0 is not supported in mode B: DeepSpeed would clip every "
                "agent with agent 0's gradient norm (it takes the agent dimension for tensor parallelism)"
            )
        if topology is None:
            from ..consensus import AgentTopology

            if not dist.is_initialized():
                from deepspeed.accelerator import get_accelerator

                deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
            topology = AgentTopology.build(spec.agents)
        elif spec.agents not in (1, topology.agents):
            raise ValueError(f"pisa_zero.deepspeed: optimizer.params.agents={spec.agents} != topology.agents")
        kwargs["mpu"] = AgentMPU(topology)
    result = _original_initialize()(
        args=ds_args,
        model=model,
        optimizer=optimizer_factory(spec, model, consensus=topology),
        model_parameters=model_parameters,
        config=cfg,
        **kwargs,
    )
    engine = result[0]
    if "nsisa" in spec.preconditioners():
        install_nsisa(engine)
    return result


# -------------------------------------------------------------------------------------------------- register
_ORIGINAL_INITIALIZE: Callable | None = None


def _original_initialize() -> Callable:
    import deepspeed

    return _ORIGINAL_INITIALIZE or deepspeed.initialize


def register() -> None:
    """Make ``deepspeed.initialize(...)`` build PISA for configs with ``"optimizer": {"type": "PISA"}``.

    Mechanism: the ``initialize`` attribute of the ``deepspeed`` module is replaced by :func:`_registered_initialize`,
    which routes PISA configs to :func:`initialize` and calls the original for everything else (idempotent;
    :func:`unregister` restores it). Scripts must look ``deepspeed.initialize`` up after ``register()`` — the usual
    ``import deepspeed; deepspeed.initialize(...)`` does; a ``from deepspeed import initialize`` executed *before*
    ``register()`` keeps the original function.
    """
    global _ORIGINAL_INITIALIZE
    import deepspeed

    if _ORIGINAL_INITIALIZE is None:
        _ORIGINAL_INITIALIZE = deepspeed.initialize
    deepspeed.initialize = _registered_initialize


def unregister() -> None:
    global _ORIGINAL_INITIALIZE
    import deepspeed

    if _ORIGINAL_INITIALIZE is not None:
        deepspeed.initialize = _ORIGINAL_INITIALIZE
        _ORIGINAL_INITIALIZE = None


@functools.wraps(initialize)
def _registered_initialize(args=None, model=None, optimizer=None, model_parameters=None, *rest, **kwargs):
    if rest:
        names = (
            "training_data",
            "lr_scheduler",
            "distributed_port",
            "mpu",
            "dist_init_required",
            "collate_fn",
            "config",
            "mesh_param",
            "config_params",
        )
        kwargs.update(zip(names, rest))
    return initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters, **kwargs)


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``deepspeed.add_config_arguments`` (``--deepspeed``, ``--deepspeed_config``) for scripts that use ours."""
    import deepspeed

    return deepspeed.add_config_arguments(parser)


# ------------------------------------------------------------------------------------- partition layouts
@dataclass(frozen=True)
class Piece:
    """The part of one parameter that lies in one rank's flat partition."""

    name: str
    shape: tuple[int, ...]
    local_start: int  # offset in the rank's flat partition
    param_start: int  # offset in the flattened parameter
    numel: int


@dataclass(frozen=True)
class PartitionLayout:
    """How one flat fp32 partition (one ZeRO-1/2 param group or one ZeRO-3 sub-group) maps onto parameters, for
    every rank of its data-parallel group (partitions have the same numel on every rank)."""

    pieces: tuple[tuple[Piece, ...], ...]  # pieces[rank]
    numel: int  # numel of each rank's partition
    rank: int
    group: object  # the data-parallel process group
    param_group: int

    @property
    def world(self) -> int:
        return len(self.pieces)


def _zero12_pieces(names, shapes, offsets, partition_size: int, rank: int) -> tuple[Piece, ...]:
    lo, hi = rank * partition_size, (rank + 1) * partition_size
    out = []
    for name, shape, off in zip(names, shapes, offsets):
        numel = int(torch.Size(shape).numel())
        start, end = max(off, lo), min(off + numel, hi)
        if start < end:
            out.append(Piece(name, tuple(shape), start - lo, start - off, end - start))
    return tuple(out)


def _zero3_pieces(names, shapes, rank: int, world: int) -> tuple[tuple[Piece, ...], int]:
    out, local = [], 0
    for name, shape in zip(names, shapes):
        numel = int(torch.Size(shape).numel())
        pn = -(-numel // world)
        start, end = rank * pn, min((rank + 1) * pn, numel)
        if start < end:
            out.append(Piece(name, tuple(shape), local, start, end - start))
        local += pn
    return tuple(out), local


def _check_deepspeed_internals(zero_opt, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(zero_opt, n)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"pisa_zero.deepspeed: DeepSpeed {deepspeed.__version__} {type(zero_opt).__name__} lacks {missing}; "
            "the partition layout pisa_zero reads has changed (update pisa_zero/integrations/deepspeed.py)"
        )


ZERO12_INTERNALS = (
    "round_robin_bit16_groups",
    "round_robin_bit16_offsets",
    "partition_size",
    "single_partition_of_fp32_groups",
    "real_dp_process_group",
    "bit16_groups_flat",
    "parallel_partitioned_bit16_groups",
)
ZERO3_INTERNALS = ("fp16_groups", "fp32_partitioned_groups_flat", "sub_group_to_group_id", "dp_process_group")


def partition_layouts(engine) -> dict[int, PartitionLayout]:
    """``id(flat fp32 partition) -> PartitionLayout`` for every partition the engine's ZeRO optimizer owns."""
    zero_opt = engine.optimizer
    names = engine.param_names
    stage = engine.zero_optimization_stage()
    layouts: dict[int, PartitionLayout] = {}
    if stage in (1, 2):
        if type(zero_opt).__name__ != "DeepSpeedZeroOptimizer":
            raise ValueError(
                f"pisa_zero.deepspeed: ZeRO stage {stage} wrapped the optimizer in {type(zero_opt).__name__} "
                "(bf16 at stage 1 with fp32 gradient accumulation selects BF16_Optimizer); "
                "nsisa and resharding support DeepSpeedZeroOptimizer only — use stage 2 or a bf16 grad_accum_dtype"
            )
        _check_deepspeed_internals(zero_opt, ZERO12_INTERNALS)
        for i, group in enumerate(zero_opt.round_robin_bit16_groups):
            pg = zero_opt.real_dp_process_group[i]
            world, rank = dist.get_world_size(pg), dist.get_rank(pg)
            shapes = (
                [tuple(m.shape) for m in zero_opt.round_robin_bit16_meta[i]]
                if hasattr(zero_opt, "round_robin_bit16_meta")
                else [tuple(p.shape) for p in group]
            )
            pnames = [names[p] for p in group]
            ps = int(zero_opt.partition_size[i])
            pieces = tuple(
                _zero12_pieces(pnames, shapes, zero_opt.round_robin_bit16_offsets[i], ps, r) for r in range(world)
            )
            flat = zero_opt.single_partition_of_fp32_groups[i]
            if flat.numel() != ps:
                raise RuntimeError(f"pisa_zero.deepspeed: partition numel {flat.numel()} != partition_size {ps}")
            layouts[id(flat)] = PartitionLayout(pieces, ps, rank, pg, i)
    elif stage == 3:
        _check_deepspeed_internals(zero_opt, ZERO3_INTERNALS)
        for sg, params in enumerate(zero_opt.fp16_groups):
            pg = (
                zero_opt.sub_group_process_groups[sg]
                if hasattr(zero_opt, "sub_group_process_groups")
                else (zero_opt.dp_process_group)
            )
            world, rank = dist.get_world_size(pg), dist.get_rank(pg)
            pnames = [names[p] for p in params]
            shapes = [tuple(p.ds_shape) for p in params]
            per_rank = [_zero3_pieces(pnames, shapes, r, world) for r in range(world)]
            numel = per_rank[0][1]
            flat = zero_opt.fp32_partitioned_groups_flat[sg]
            if flat.numel() != numel:
                raise RuntimeError(f"pisa_zero.deepspeed: sub-group numel {flat.numel()} != layout {numel}")
            layouts[id(flat)] = PartitionLayout(
                tuple(p for p, _ in per_rank), numel, rank, pg, zero_opt.sub_group_to_group_id[sg]
            )
    return layouts


def gather_full(layout: PartitionLayout, local: torch.Tensor) -> dict[str, torch.Tensor]:
    """All-gather a flat partition over the layout's group; returns ``name -> whole tensor`` for every parameter
    that has a piece in it (in the parameter's shape)."""
    device = comm_device(local.device, layout.group)
    src = local.detach().to(device)
    chunks = [torch.empty_like(src) for _ in range(layout.world)]
    dist.all_gather(chunks, src.contiguous(), group=layout.group)
    full: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for r, pieces in enumerate(layout.pieces):
        for pc in pieces:
            if pc.name not in full:
                full[pc.name] = torch.zeros(torch.Size(pc.shape).numel(), dtype=local.dtype, device=local.device)
                shapes[pc.name] = pc.shape
            full[pc.name][pc.param_start : pc.param_start + pc.numel] = chunks[r][
                pc.local_start : pc.local_start + pc.numel
            ].to(local.device)
    return {n: t.view(shapes[n]) for n, t in full.items()}


@dataclass(frozen=True)
class _Routing:
    """Whole-matrix routing of one partition layout: which rank owns (orthogonalises) each matrix, and which piece
    of it each rank holds."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    owner: tuple[int, ...]
    pieces: tuple[tuple[Piece | None, ...], ...]  # pieces[rank][matrix]

    @staticmethod
    def build(layout: PartitionLayout) -> _Routing:
        index: dict[str, int] = {}
        shapes: list[tuple[int, ...]] = []
        for rank_pieces in layout.pieces:
            for pc in rank_pieces:
                if len(pc.shape) == 2 and pc.name not in index:
                    index[pc.name] = len(index)
                    shapes.append(pc.shape)
        pieces = [[None] * len(index) for _ in range(layout.world)]
        for r, rank_pieces in enumerate(layout.pieces):
            for pc in rank_pieces:
                if pc.name in index:
                    pieces[r][index[pc.name]] = pc
        # Balance Newton–Schulz work (≈ rows·cols·min(rows, cols)): largest first, to the least-loaded rank.
        load = [0.0] * layout.world
        owner = [0] * len(index)
        cost = [float(a * b * min(a, b)) for a, b in shapes]
        for j in sorted(range(len(index)), key=lambda j: (-cost[j], j)):
            r = min(range(layout.world), key=lambda r: (load[r], r))
            owner[j] = r
            load[r] += cost[j]
        return _Routing(tuple(index), tuple(shapes), tuple(owner), tuple(tuple(p) for p in pieces))


class _PartitionOrthogonalizer:
    """``PISA.flat_partition_orthogonalizer`` for ZeRO partitions: whole-matrix Newton–Schulz (see module doc).

    Each matrix of a partition group has one owner rank (balanced by Newton–Schulz cost). One all-to-all sends every
    piece of ``u`` to its matrix's owner, the owner orthogonalises its whole matrices (batched by shape), and a second
    all-to-all returns the pieces: each rank sends and receives about its partition's size twice, and runs 1/world of
    the Newton–Schulz work. Non-matrix tensors keep ``u``.
    """

    def __init__(self, layouts: dict[int, PartitionLayout]):
        self.layouts = layouts
        self._routing: dict[int, _Routing] = {}

    def __call__(self, params, directions, group):
        out = []
        for p, u in zip(params, directions):
            layout = self.layouts.get(id(p))
            if layout is None:
                raise ValueError(
                    f"PISA: nsisa got a flat partition of shape {tuple(p.shape)} that pisa_zero's DeepSpeed layout "
                    "does not know (was the engine built by pisa_zero.deepspeed.initialize?)"
                )
            if id(layout) not in self._routing:
                self._routing[id(layout)] = _Routing.build(layout)
            out.append(self._orthogonalize(layout, self._routing[id(layout)], u, group))
        return out

    @staticmethod
    def _orthogonalize(layout: PartitionLayout, routing: _Routing, u: torch.Tensor, group: dict) -> torch.Tensor:
        u = u.float()
        me, world = layout.rank, layout.world
        result = u.clone()
        if not routing.names:
            return result
        device = comm_device(u.device, layout.group)
        mats = range(len(routing.names))
        mine = routing.pieces[me]
        owned = [j for j in mats if routing.owner[j] == me]
        # 1. pieces of u → owners
        send = [[mine[j] for j in mats if routing.owner[j] == d and mine[j] is not None] for d in range(world)]
        recv = [[routing.pieces[s][j] for j in owned if routing.pieces[s][j] is not None] for s in range(world)]
        send_buf = torch.cat(
            [u[pc.local_start : pc.local_start + pc.numel] for d in range(world) for pc in send[d]] or [u.new_zeros(0)]
        ).to(device)
        recv_buf = torch.empty(sum(pc.numel for lst in recv for pc in lst), dtype=u.dtype, device=device)
        send_sizes = [sum(pc.numel for pc in lst) for lst in send]
        recv_sizes = [sum(pc.numel for pc in lst) for lst in recv]
        dist.all_to_all_single(recv_buf, send_buf, recv_sizes, send_sizes, group=layout.group)
        # 2. owners assemble whole matrices and orthogonalise them
        full = {j: torch.zeros(torch.Size(routing.shapes[j]).numel(), dtype=u.dtype, device=device) for j in owned}
        offset = 0
        for s in range(world):
            for j in owned:
                pc = routing.pieces[s][j]
                if pc is not None:
                    full[j][pc.param_start : pc.param_start + pc.numel] = recv_buf[offset : offset + pc.numel]
                    offset += pc.numel
        ortho = F.orthogonalize_batched(
            [full[j].view(routing.shapes[j]) for j in owned], group["ns_steps"], F.ns_compute_dtype(u.device)
        )
        o_flat = {j: o.reshape(-1) for j, o in zip(owned, ortho)}
        # 3. pieces of O → back to the ranks that hold them
        back = torch.cat(
            [o_flat[j][pc.param_start : pc.param_start + pc.numel].to(u.dtype) for s in range(world)
             for j in owned if (pc := routing.pieces[s][j]) is not None]
            or [u.new_zeros(0, device=device)]
        )  # fmt: skip
        got = torch.empty(sum(send_sizes), dtype=u.dtype, device=device)
        dist.all_to_all_single(got, back.to(device), send_sizes, recv_sizes, group=layout.group)
        offset = 0
        for d in range(world):
            for pc in send[d]:
                result[pc.local_start : pc.local_start + pc.numel] = got[offset : offset + pc.numel].to(result.device)
                offset += pc.numel
        return result


def install_nsisa(engine) -> None:
    """Give the engine's PISA the whole-matrix Newton–Schulz hook for its ZeRO partitions (no-op without ZeRO)."""
    pisa = engine.basic_optimizer if hasattr(engine, "basic_optimizer") else None
    if not isinstance(pisa, PISA):
        raise ValueError("pisa_zero.deepspeed: the engine's optimizer is not PISA")
    if engine.zero_optimization_stage() == 0:
        return
    pisa.flat_partition_orthogonalizer = _PartitionOrthogonalizer(partition_layouts(engine))


# ----------------------------------------------------------------------------------------------- mode B
class AgentMPU:
    """A DeepSpeed ``mpu`` that makes an agent (``topology.shard_group``) DeepSpeed's data-parallel group, so ZeRO
    shards and averages only inside an agent, and the ranks holding the same shard in different agents
    (``topology.agent_group``) its "model-parallel" group, where PISA's consensus runs (mode B).

    Experimental (see docs/deepspeed.md "Mode B"): DeepSpeed believes the agent dimension is tensor parallelism.
    """

    def __init__(self, topology):
        self.topology = topology

    # data parallel = inside one agent
    def get_data_parallel_group(self):
        return self.topology.shard_group

    def get_data_parallel_world_size(self):
        return self.topology.shard_size

    def get_data_parallel_rank(self):
        return self.topology.shard_index

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.topology.shard_group)

    # "model parallel" = across agents
    def get_model_parallel_group(self):
        return self.topology.agent_group

    def get_model_parallel_world_size(self):
        return self.topology.agents

    def get_model_parallel_rank(self):
        return self.topology.agent_index

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_process_group_ranks(self.topology.agent_group)[0]

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0
