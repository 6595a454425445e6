"""Building the engine: :func:`initialize` (a drop-in for ``deepspeed.initialize``), :func:`register` (routes an
unchanged script's ``deepspeed.initialize`` here), :func:`build_optimizer` (the same PISA for a single process)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

from ...optimizer import PISA
from .config import (
    BY_ROLE,
    PISASpec,
    _load_config,
    is_pisa_config,
    offload_device,
    parse_pisa_params,
    prepare_config,
    zero_stage,
)
from .layout import partition_layouts
from .mpu import AgentMPU
from .nsisa import PartitionOrthogonalizer
from .nvme import wrap_load_checkpoint


def optimizer_factory(spec: PISASpec, model: torch.nn.Module | None, consensus=None, orthogonalizer=None) -> Callable:
    """The callable DeepSpeed calls with ``model_parameters`` to build PISA (``consensus``: mode B topology;
    ``orthogonalizer``: nsisa's whole-matrix strategy, None for PISA's default)."""

    def build(model_parameters):
        kw = dict(consensus=consensus, orthogonalizer=orthogonalizer, **spec.kwargs)
        if spec.auto_groups:
            if model is None:
                raise ValueError(f'pisa_zero.deepspeed: "param_groups": "{BY_ROLE}" needs the model')
            return PISA(spec.groups(model), **kw)
        return PISA(model_parameters, **kw)

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
    local_steps = spec.kwargs.get("local_steps", 1)
    if local_steps > 1 and topology is None and spec.agents == 1:
        raise ValueError(
            f"pisa_zero.deepspeed: optimizer.params.local_steps={local_steps} needs agents (mode B): set "
            "optimizer.params.agents > 1 or pass topology="
        )
    if topology is not None or spec.agents > 1:
        if kwargs.get("mpu") is not None:
            raise ValueError("pisa_zero.deepspeed: mode B (topology= / optimizer.params.agents) replaces mpu=")
        if float(cfg.get("gradient_clipping", 0.0) or 0.0) > 0:
            raise ValueError(
                "pisa_zero.deepspeed: gradient_clipping > 0 is not supported in mode B: DeepSpeed would clip every "
                "agent with agent 0's gradient norm (it takes the agent dimension for tensor parallelism)"
            )
        if topology is None:
            from ...consensus import AgentTopology

            if not dist.is_initialized():
                from deepspeed.accelerator import get_accelerator

                deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
            topology = AgentTopology.build(spec.agents)
        elif spec.agents not in (1, topology.agents):
            raise ValueError(f"pisa_zero.deepspeed: optimizer.params.agents={spec.agents} != topology.agents")
        kwargs["mpu"] = AgentMPU(topology)
    # ZeRO hands PISA flat partitions: nsisa routes their matrices' pieces (bound to the layout once it exists)
    partitioned = "nsisa" in spec.preconditioners() and zero_stage(cfg) != 0
    budget = {} if spec.routing_bytes is None else {"max_bytes_in_flight": spec.routing_bytes}
    orthogonalizer = PartitionOrthogonalizer(**budget) if partitioned else None
    result = _original_initialize()(
        args=ds_args,
        model=model,
        optimizer=optimizer_factory(spec, model, consensus=topology, orthogonalizer=orthogonalizer),
        model_parameters=model_parameters,
        config=cfg,
        **kwargs,
    )
    if partitioned:
        engine = result[0]
        if not isinstance(getattr(engine, "basic_optimizer", None), PISA):
            raise ValueError("pisa_zero.deepspeed: the engine's optimizer is not PISA")
        orthogonalizer.bind(partition_layouts(engine))
    if offload_device(cfg) == "nvme" and zero_stage(cfg) == 3:  # PISA's swapped state must be read back on load
        wrap_load_checkpoint(result[0])
    release_cpu_allreduce_buffer()
    return result


def release_cpu_allreduce_buffer() -> None:
    """Unlink this rank's ``/dev/shm/deepspeed_allreduce_buffer_*`` once every rank has mapped it (CPU only).

    With ranks on one host, DeepSpeed's CPU communication creates one 67 MB named shared-memory buffer per rank
    (csrc/cpu/comm/shm.cpp, ``shm_initialize``) and never unlinks it, so each run leaves its buffers in /dev/shm (RAM)
    until reboot (DeepSpeed PR #4115 says as much); 174 of them once held 11.6 GB of a 24 GB machine here. Every rank
    maps its peers' buffers during ``init_distributed``, so after a barrier the names are no longer needed: unlinking
    frees the memory when the last process holding the mapping exits, however it exits (``os._exit``, a signal)."""
    if not dist.is_initialized():
        return
    env = os.environ
    name = "_".join(
        ["deepspeed_allreduce_buffer", str(os.getuid()), env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")]
    )
    dist.barrier()  # every peer has opened this rank's buffer (on every rank: initialize is collective anyway)
    try:
        os.unlink(f"/dev/shm/{name}_{dist.get_rank()}")
    except FileNotFoundError:  # another accelerator, ranks on several hosts, or released already
        pass


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
