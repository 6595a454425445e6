"""How NSISA gets ``O = NS5(u)`` for whole matrices: one strategy per host layout, chosen when PISA is built (as
Distributed Shampoo chooses a distributor), never switched inside ``step()``.

A strategy is called as ``strategy(params, directions, ns_steps, compute_dtype) -> list[Tensor]``: ``params`` are
the optimizer's tensors of one nsisa group, ``directions`` this rank's ``u = g + μb`` for each (local shards for
DTensors), ``compute_dtype`` the Newton–Schulz matmuls' dtype (PISA picks it from the group's ``ns_dtype``), and it
returns, per tensor, this rank's part of O (u itself where the tensor is not a matrix). Three exist:

- :class:`LocalOrthogonalizer` — whole tensors on this rank (single process, DDP, mode B with k = 1);
- :class:`DTensorOrthogonalizer` — FSDP2's Shard(0) DTensors, whole matrices routed to owner ranks
  (`pisa_zero.routing`); chosen automatically when the optimizer holds a DTensor;
- ``PartitionOrthogonalizer`` (`pisa_zero.integrations.deepspeed.nsisa`) — DeepSpeed ZeRO's flat partitions, passed
  as ``PISA(orthogonalizer=...)`` by the DeepSpeed integration.
"""

from __future__ import annotations

from torch import Tensor

from . import functional as F
from ._utils import DTensor
from .routing import ROUTING_BYTES, check_routing_bytes, orthogonalize_sharded


def _is_matrix_partition(t: Tensor) -> bool:
    """A tensor that stands for part of a matrix: a DeepSpeed ZeRO-3 partition (``ds_shape``) of a 2-D param."""
    return len(getattr(t, "ds_shape", ())) >= 2


class LocalOrthogonalizer:
    """Whole matrices on this rank, batched by shape. Refuses the flat 1-D partitions a host such as DeepSpeed ZeRO
    swaps in for the optimizer's parameters (``known_params``: ids of the tensors PISA was given, kept by PISA)."""

    def __init__(self, known_params: set[int]):
        self.known_params = known_params

    def __call__(self, params: list[Tensor], directions: list[Tensor], ns_steps: int, compute_dtype) -> list[Tensor]:
        for p in params:
            if _is_matrix_partition(p) or (p.ndim == 1 and id(p) not in self.known_params):
                raise ValueError(
                    "PISA: preconditioner='nsisa' was handed a flat 1-D partition "
                    f"(shape {tuple(p.shape)}, ds_shape {tuple(getattr(p, 'ds_shape', ()))}) instead of whole "
                    "matrices; Newton–Schulz cannot run on a slice. Use pisa_zero's DeepSpeed integration, which "
                    "routes whole matrices, or put this group on an elementwise preconditioner ('sisa')."
                )
        return F.orthogonalize_batched(directions, ns_steps, compute_dtype)


class DTensorOrthogonalizer:
    """FSDP2: Shard(0) DTensors' row blocks routed to owner ranks, whole matrices orthogonalised there, row blocks
    returned (`pisa_zero.routing.orthogonalize_sharded`; routers cached per mesh and shapes). ``max_bytes_in_flight``:
    the routing buffers a rank holds per round (`pisa_zero.routing.MatrixRouter`); a host option, not PISA's math."""

    def __init__(self, max_bytes_in_flight: int | None = ROUTING_BYTES):
        if max_bytes_in_flight is not None:
            check_routing_bytes(max_bytes_in_flight, "DTensorOrthogonalizer")
        self.max_bytes_in_flight = max_bytes_in_flight
        self._routers: dict = {}

    def __call__(self, params: list[Tensor], directions: list[Tensor], ns_steps: int, compute_dtype) -> list[Tensor]:
        budget = self.max_bytes_in_flight
        return orthogonalize_sharded(params, directions, ns_steps, compute_dtype, self._routers, budget)


def default_orthogonalizer(param_groups: list[dict], known_params: set[int]):
    """DTensor-routed when any parameter is a DTensor (FSDP2), else local."""
    if any(isinstance(p, DTensor) for group in param_groups for p in group["params"]):
        return DTensorOrthogonalizer()
    return LocalOrthogonalizer(known_params)
