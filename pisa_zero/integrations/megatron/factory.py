"""``get_pisa_optimizer``: the factory with the shape of Megatron's ``get_megatron_optimizer``."""

from __future__ import annotations

import inspect
import logging
import math

import torch

from ...hyperparameters import validate_group
from ...optimizer import PISA
from ...routing import check_routing_bytes
from .distributed_optimizer import PISAChainedOptimizer, PISADistributedOptimizer, bound_pisa_class
from .groups import check_grouping, pisa_param_groups
from .nsisa import ShardOrthogonalizer, check_nsisa

logger = logging.getLogger(__name__)

#: megatron-core minor versions whose DistributedOptimizer internals this module was checked on (tests/test_megatron*).
TESTED_MEGATRON = ((0, 16),)
#: PISA constructor keywords the factory passes through (lr/weight_decay/betas come from the OptimizerConfig).
PISA_KEYS = (
    "sigma",
    "rho",
    "beta2",
    "momentum",
    "nesterov",
    "eps",
    "l2_lambda",
    "ns_steps",
    "ns_dtype",
    "implementation",
    "state_dtype",
)


def megatron_version() -> tuple[int, int]:
    import megatron.core

    return tuple(int(x) for x in megatron.core.__version__.split(".")[:2])


def check_megatron() -> None:
    """Fail at construction, naming what is missing, if this megatron-core lacks an internal the wrapper uses
    (the same names exist on upstream main as of 0.20.0-dev, where ``optimizer_state_keys`` was added)."""
    from megatron.core import optimizer as mopt
    from megatron.core.optimizer import optimizer as mopt_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    needed = [
        (mopt, "_get_param_groups"),
        (mopt_optimizer, "param_group_identifier_keys"),
        (ProcessGroupCollection, "setup_process_groups_for_optimizer"),
        *((DistributedOptimizer, name) for name in _DISTRIBUTED_OPTIMIZER_INTERNALS),
        *((mopt.ChainedOptimizer, name) for name in ("prepare_grads", "get_grad_norm", "step_with_ready_grads")),
    ]
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]
    version = megatron_version()
    if missing:
        raise RuntimeError(
            f"pisa_zero.megatron: megatron-core {version[0]}.{version[1]} lacks {missing}; tested on {TESTED_MEGATRON}"
        )
    if version not in TESTED_MEGATRON:
        logger.warning(
            "pisa_zero.megatron: megatron-core %s.%s is not among the tested versions %s; run tests/test_megatron*.py",
            *version,
            TESTED_MEGATRON,
        )


#: DistributedOptimizer methods PISADistributedOptimizer overrides or calls.
_DISTRIBUTED_OPTIMIZER_INTERNALS = (
    "_get_main_param_and_optimizer_states",
    "_set_main_param_and_optimizer_states",
    "load_parameter_state_from_dp_reshardable",
    "load_parameter_state_from_fully_reshardable",
    "_collect_main_grad_data_for_unscaling",
    "_get_model_param_range_map",
    "prepare_grads",
    "step_with_ready_grads",
)


def _validate(config, pisa_kwargs: dict) -> None:
    unknown = sorted(set(pisa_kwargs) - set(PISA_KEYS))
    if unknown:
        raise ValueError(
            f"get_pisa_optimizer: unknown PISA option(s) {unknown}; expected some of {PISA_KEYS} (lr, weight decay "
            "and AdamW betas/eps come from the OptimizerConfig)"
        )
    if not config.use_distributed_optimizer:
        raise ValueError(
            "get_pisa_optimizer: config.use_distributed_optimizer=False; PISA on Megatron runs inside the "
            "DistributedOptimizer (--use-distributed-optimizer), which shards its state"
        )
    if config.use_precision_aware_optimizer:
        raise ValueError("get_pisa_optimizer: use_precision_aware_optimizer=True is for TE's FusedAdam only")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"get_pisa_optimizer: invalid config.lr={config.lr!r}: PISA's reference lr must be > 0")
    if config.optimizer_cpu_offload and not 0.0 <= config.optimizer_offload_fraction <= 1.0:
        raise ValueError(f"get_pisa_optimizer: invalid optimizer_offload_fraction={config.optimizer_offload_fraction}")


def _build(
    config,
    model_chunks: list,
    groups: list[dict],
    buffers: dict,
    pisa_options: dict,
    *,
    dp_group,
    dp_group_gloo,
    dp_group_idx: int,
    stats_group,
    instance_id: int,
    tp_group,
    routing_bytes: int | None = None,
):
    """One PISADistributedOptimizer over ``groups`` (the dense or the expert-parallel ones), as Megatron's
    ``_get_megatron_optimizer_based_on_param_groups`` builds one Adam DistributedOptimizer."""
    from megatron.core.optimizer import ConstantGradScaler, DynamicGradScaler
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    grad_scaler = None
    if config.loss_scale:
        grad_scaler = ConstantGradScaler(config.loss_scale)
    elif config.fp16:
        grad_scaler = DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
        )
    options = {**pisa_options, "skip_nonfinite": False}  # the skip is agreed across ranks in prepare_grads
    if not groups:
        inner = None
    elif config.optimizer_cpu_offload:
        cls = bound_pisa_class(options)
        inner = HybridDeviceOptimizer(
            groups,
            offload_fraction=config.optimizer_offload_fraction,
            cpu_optimizer_cls=cls,
            gpu_optimizer_cls=cls,
            overlap_cpu_optimizer_d2h_h2d=config.overlap_cpu_optimizer_d2h_h2d,
            pin_cpu_grads=config.pin_cpu_grads,
            pin_cpu_params=config.pin_cpu_params,
            param_update_in_fp32=True,
            lr=config.lr,
        )
    else:
        # the nsisa group with matrices (model params: the same on every DP rank, before Megatron shards them)
        nsisa = [i for i, g in enumerate(groups) if g["preconditioner"] == "nsisa" and g["params"]]
        budget = {} if routing_bytes is None else {"max_bytes_in_flight": routing_bytes}
        orthogonalizer = ShardOrthogonalizer(**budget) if nsisa else None
        pisa = PISA(groups, orthogonalizer=orthogonalizer, **options)  # validates the groups on the model params
        # A state-less AdamW carries the groups' parameter lists through DistributedOptimizer.__init__, which
        # accepts only Adam-family inner optimizers in Megatron 0.16.
        inner = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=config.lr)
    optimizer = PISADistributedOptimizer(
        inner,
        config,
        grad_scaler,
        lambda opt, config=None: opt.init_state(),
        model_chunks=model_chunks,
        per_model_buffers=buffers,
        data_parallel_group=dp_group,
        data_parallel_group_gloo=dp_group_gloo,
        data_parallel_group_idx=dp_group_idx,
        distributed_optimizer_instance_id=instance_id,
    )
    if inner is not None and not config.optimizer_cpu_offload:
        # Re-point PISA's groups at this rank's fp32 main-param shards exactly as DistributedOptimizer re-points
        # its inner optimizer's (fp32 model params give non-leaf views, which add_param_group would refuse).
        for group, carried in zip(pisa.param_groups, inner.param_groups):
            group["params"] = carried["params"]
        pisa.load_state_dict(pisa.state_dict())
        optimizer.optimizer = pisa
        if orthogonalizer is not None:
            names = {id(p): f"{i}.{n}" for i, chunk in enumerate(model_chunks) for n, p in chunk.named_parameters()}
            orthogonalizer.bind(optimizer, nsisa[0], names)
            optimizer.nsisa_orthogonalizer = orthogonalizer
    optimizer.grad_stats_parallel_group = stats_group
    optimizer.tp_group = tp_group
    return optimizer


def get_pisa_optimizer(
    config,
    model_chunks: list,
    config_overrides: dict | None = None,
    use_gloo_process_groups: bool = True,
    pg_collection=None,
    *,
    preconditioner: str = "sisa",
    other_preconditioner: str | None = None,
    other_options: dict | None = None,
    routing_bytes: int | None = None,
    **pisa_kwargs,
):
    """PISA in Megatron's DistributedOptimizer, chained for dense and expert-parallel parameters.

    Args:
        config: ``megatron.core.optimizer.OptimizerConfig`` with ``use_distributed_optimizer=True``; its ``lr``,
            ``min_lr``, ``weight_decay``, ``clip_grad``, ``bf16``/``fp16``, loss-scale fields, ``adam_beta1/2`` and
            ``adam_eps`` (for ``adamw`` groups) and ``optimizer_cpu_offload``/``optimizer_offload_fraction`` are
            used as Megatron uses them. ``config.optimizer`` is not read.
        model_chunks: Megatron ``DistributedDataParallel`` model chunks (``use_distributed_optimizer=True``).
        config_overrides, use_gloo_process_groups, pg_collection: as for ``get_megatron_optimizer``.
        preconditioner: PISA preconditioner of the transformer block matrices ('sisa', 'adagrad', 'identity', or
            'nsisa': Newton–Schulz on whole matrices routed over the DP group; needs TP=1, no offload).
        other_preconditioner: of embeddings, output layer, norms and biases ('adamw' for the auxiliary AdamW);
            None: the same as ``preconditioner``.
        other_options: per-group overrides for those ('lr', 'betas', 'eps', 'sigma', 'rho', 'beta2', 'l2_lambda');
            'lr' becomes the groups' peak lr (``max_lr``, with ``min_lr`` scaled alike) for Megatron's scheduler.
        routing_bytes: nsisa only: the whole-matrix routing buffers a DP rank holds per round, in bytes (None:
            `pisa_zero.routing.ROUTING_BYTES`); a host option, not one of PISA's hyper-parameters.
        **pisa_kwargs: PISA options (:data:`PISA_KEYS`: sigma, rho, beta2, eps, l2_lambda, implementation, ...).
    """
    from megatron.core.utils import get_pg_rank

    check_megatron()
    _validate(config, pisa_kwargs)
    check_grouping(preconditioner, other_preconditioner, other_options)
    if routing_bytes is not None:
        check_routing_bytes(routing_bytes, "get_pisa_optimizer", "routing_bytes")
        if preconditioner != "nsisa":
            raise ValueError(
                f"get_pisa_optimizer: routing_bytes={routing_bytes} is read by nsisa only (it bounds the whole-matrix "
                f"routing), not preconditioner={preconditioner!r}; remove it"
            )
    if config.overlap_param_gather_with_optimizer_step:
        raise ValueError("get_pisa_optimizer: overlap_param_gather_with_optimizer_step is not supported")
    if model_chunks[0].ddp_config.use_megatron_fsdp:
        raise ValueError("get_pisa_optimizer: Megatron-FSDP is not supported; use Megatron DDP")
    pgs, instance_id, tp_group = _process_groups(model_chunks, use_gloo_process_groups, pg_collection)
    groups = pisa_param_groups(
        model_chunks,
        config,
        config_overrides,
        preconditioner=preconditioner,
        other_preconditioner=other_preconditioner,
        other_options=other_options,
    )
    for group in groups:  # PISA validates every group (σ, ρ, β₂, ...) now, before any Megatron work
        validate_group({**_PISA_DEFAULTS, **pisa_kwargs, **group})
    options = dict(pisa_kwargs)
    dense = [g for g in groups if not g["is_expert_parallel"]]
    expert = [g for g in groups if g["is_expert_parallel"]]
    if preconditioner == "nsisa":
        check_nsisa(config, tp_group, dense, expert)

    def buffers(name: str) -> dict:
        return {i: getattr(c, name) for i, c in enumerate(model_chunks) if hasattr(c, name)}

    common = dict(stats_group=pgs["intra_dist_opt_group"], instance_id=instance_id, tp_group=tp_group)
    common["routing_bytes"] = routing_bytes
    optimizers = [
        _build(
            config,
            model_chunks,
            dense,
            buffers("buffers"),
            options,
            dp_group=pgs["intra_dp_cp_group"],
            dp_group_gloo=pgs["intra_dp_cp_group_gloo"],
            dp_group_idx=get_pg_rank(pgs["mp_group"]),
            **common,
        )
    ]
    if expert:
        optimizers.append(
            _build(
                config,
                model_chunks,
                expert,
                buffers("expert_parallel_buffers"),
                options,
                dp_group=pgs["intra_expt_dp_group"],
                dp_group_gloo=pgs["intra_expt_dp_group_gloo"] if use_gloo_process_groups else None,
                dp_group_idx=get_pg_rank(pgs["expt_tp_pp_group"]),
                **common,
            )
        )
    return PISAChainedOptimizer(optimizers)


def _process_groups(model_chunks: list, use_gloo_process_groups: bool, pg_collection):
    """The optimizer's process groups, its distributed-optimizer instance id and the TP group, as Megatron's own
    ``get_megatron_optimizer`` sets them up."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_pg_rank, get_pg_size

    pgs = ProcessGroupCollection.setup_process_groups_for_optimizer(
        pg_collection, model_chunks, use_gloo_process_groups
    )
    if get_pg_size(pgs["dp_cp_group"]) > get_pg_size(pgs["intra_dp_cp_group"]):
        instance_id = get_pg_rank(pgs["inter_dist_opt_group"])
    else:
        instance_id = 0
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        tp_group = pg_collection.tp
    else:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    return pgs, instance_id, tp_group


_PISA_DEFAULTS = {
    k: p.default for k, p in inspect.signature(PISA.__init__).parameters.items() if p.default is not p.empty
}


def optimizer_summary(optimizer) -> list[dict]:
    """One dict per PISA param group of a (chained) Megatron PISA optimizer: what a log line or test needs."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            out.append(
                {
                    "preconditioner": group["preconditioner"],
                    "numel": sum(p.numel() for p in group["params"]),
                    "wd_mult": group.get("wd_mult"),
                    "is_expert_parallel": group.get("is_expert_parallel"),
                    "lr": group["lr"],
                }
            )
    return out
