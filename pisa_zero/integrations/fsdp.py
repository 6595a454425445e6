"""PISA on PyTorch FSDP2 (``fully_shard``): mode A over all ranks, mode B over an (agent × shard) mesh.

    model, optimizer = prepare(model)                                   # mode A: FSDP over every rank
    model, optimizer = prepare(model, AgentTopology.build(agents=2))    # mode B: FSDP inside each agent

Each transformer block (every child of an ``nn.ModuleList``) is wrapped with ``fully_shard``, then the root, on the
topology's shard sub-mesh (mode B: FSDP averages gradients only inside an agent; the optimizer's consensus joins the
agents) or on all ranks (mode A). ``param_dtype=torch.bfloat16`` sets ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32)``: the fp32 sharded parameters are the masters PISA updates. ``cpu_offload=True`` adds
``CPUOffloadPolicy``. ``groups`` are param groups built on the unsharded model (e.g. ``pisa_zero.param_groups``);
they are re-pointed at the sharded parameters by name.

Even in mode A the optimizer gets a one-agent topology, so the non-finite skip is agreed by all ranks (one 4-byte
all-reduce, what ``grads_are_finite`` costs) and NSISA's owner routing never sees ranks that disagree.
"""

from __future__ import annotations

import torch
from torch import nn

from .._utils import dist_on
from ..consensus import AgentTopology
from ..optimizer import PISA
from ..orthogonalizer import DTensorOrthogonalizer
from ..routing import check_routing_bytes

_PARAM_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 wraps one by one: every child of every ``nn.ModuleList`` (outermost lists only)."""
    blocks, seen = [], set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and id(module) not in seen:
            for child in module:
                blocks.append(child)
            for sub in module.modules():
                seen.add(id(sub))
    return blocks


def prepare(
    model: nn.Module,
    topology: AgentTopology | None = None,
    *,
    param_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
    groups: list[dict] | None = None,
    reshard_after_forward: bool | None = None,
    routing_bytes: int | None = None,
    **pisa_kwargs,
):
    """Shard ``model`` with FSDP2 and build its PISA optimizer; returns ``(model, optimizer)``.

    ``routing_bytes``: nsisa's whole-matrix routing buffers per rank and round (None:
    `pisa_zero.routing.ROUTING_BYTES`); a host option, so it is the orthogonalizer's, not a PISA hyper-parameter.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if param_dtype not in _PARAM_DTYPES:
        raise ValueError(f"prepare: invalid param_dtype={param_dtype!r}: expected one of {_PARAM_DTYPES}")
    if "consensus" in pisa_kwargs:
        raise ValueError("prepare: pass the agent topology as `topology`, not `consensus`")
    if routing_bytes is not None:
        check_routing_bytes(routing_bytes, "prepare", "routing_bytes")
        if pisa_kwargs.get("orthogonalizer") is not None:
            raise ValueError(
                "prepare: routing_bytes sets the DTensor orthogonalizer; it cannot go with orthogonalizer="
            )
        pisa_kwargs["orthogonalizer"] = DTensorOrthogonalizer(routing_bytes)
    if not dist_on():
        raise ValueError("prepare: torch.distributed must be initialised (FSDP2 needs a process group)")
    if topology is None:
        topology = AgentTopology.build(agents=1)
    elif not isinstance(topology, AgentTopology):
        raise ValueError(f"prepare: invalid topology={topology!r}: expected a pisa_zero.consensus.AgentTopology")
    if any(p.dtype != torch.float32 for p in model.parameters()):
        raise ValueError("prepare: the model's parameters must be fp32 (they become the masters); use param_dtype")
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = None
    if groups is not None:
        group_names = []
        for i, g in enumerate(groups):
            if not isinstance(g, dict) or "params" not in g:
                raise ValueError(f"prepare: invalid groups[{i}]: expected a dict with 'params'")
            missing = [tuple(p.shape) for p in g["params"] if id(p) not in names]
            if missing:
                raise ValueError(f"prepare: groups[{i}] holds parameters not in the model (shapes {missing})")
            group_names.append([names[id(p)] for p in g["params"]])

    mesh = topology.shard_mesh
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        if param_dtype is not None
        else MixedPrecisionPolicy()
    )
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
    kw = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    if reshard_after_forward is not None:  # None: FSDP2's default (blocks reshard, the root keeps its params)
        kw["reshard_after_forward"] = reshard_after_forward
    for block in transformer_blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)

    sharded = dict(model.named_parameters())
    if group_names is None:
        param_spec = [p for p in model.parameters() if p.requires_grad]
    else:
        param_spec = [{**g, "params": [sharded[n] for n in ns]} for g, ns in zip(groups, group_names)]
    optimizer = PISA(param_spec, consensus=topology, **pisa_kwargs)
    return model, optimizer
