"""NSISA on Megatron's DistributedOptimizer: whole-matrix Newton–Schulz for the nsisa group's 1-D main-param
shards through `pisa_zero.routing` (see :class:`ShardOrthogonalizer`)."""

from __future__ import annotations

import torch

from ... import functional as F
from ...routing import ROUTING_BYTES, MatrixRouter, Piece, check_routing_bytes


class ShardOrthogonalizer:
    """``PISA(orthogonalizer=...)`` for the nsisa group of a Megatron DistributedOptimizer.

    Each PISA tensor of that group is one fp32 main-param shard: elements ``[start, end)`` of one block matrix's
    row-major flattening on this DP rank, i.e. one `pisa_zero.routing.Piece`. One `MatrixRouter` over the DP group
    sends every piece of u = g + μb to its matrix's owner rank (cost-balanced), which runs Newton–Schulz on the whole
    matrix and sends each rank its pieces of O back: two all-to-alls of the shards' size per step and 1/DP of the
    Newton–Schulz work per rank. Never NS on a slice.

    The router is collective: a DP rank whose range holds no piece of the group still takes part
    (:meth:`join_if_empty`, called by the distributed optimizer before PISA's step, in which such a rank has no
    nsisa work and would otherwise not call the router).

    ``max_bytes_in_flight``: the router's routing buffers per rank and round (`pisa_zero.routing.MatrixRouter`).
    """

    def __init__(self, max_bytes_in_flight: int | None = ROUTING_BYTES):
        if max_bytes_in_flight is not None:
            check_routing_bytes(max_bytes_in_flight, "ShardOrthogonalizer")
        self.max_bytes_in_flight = max_bytes_in_flight
        self.router = None
        self.group_index = None
        self._ids: list[int] = []
        self._device = None

    def bind(self, dist_opt, group_index: int, names: dict[int, str]) -> None:
        """Build the router from ``dist_opt``'s shard layout of param group ``group_index`` (collective: one
        ``all_gather_object`` over the DP group)."""
        by_order = {
            order: model_param
            for model_param, (index, order) in dist_opt.model_param_group_index_map.items()
            if index == group_index
        }
        shards = dist_opt.optimizer.param_groups[group_index]["params"]
        if sorted(by_order) != list(range(len(shards))):
            raise RuntimeError("PISA (Megatron): nsisa shards and DistributedOptimizer's group index map disagree")
        pieces = []
        for order in range(len(shards)):
            model_param = by_order[order]
            if model_param.dim() != 2:
                raise ValueError(f"PISA (Megatron): nsisa group holds {names[id(model_param)]}, which is not a matrix")
            span = dist_opt._get_model_param_range_map(model_param)["param"]
            pieces.append(Piece(names[id(model_param)], tuple(model_param.shape), span.start, span.size))
        group, budget = dist_opt.data_parallel_group, self.max_bytes_in_flight
        self.router = MatrixRouter.from_local_pieces(pieces, group, max_bytes_in_flight=budget)
        self.group_index = group_index
        self._ids = [id(p) for p in shards]
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

    def __call__(self, params, directions, ns_steps: int, compute_dtype: torch.dtype) -> list[torch.Tensor]:
        if self.router is None or [id(p) for p in params] != self._ids:
            raise ValueError(
                "PISA (Megatron): nsisa was handed tensors that are not the DistributedOptimizer's shards it was "
                "bound to (build the optimizer with pisa_zero.integrations.megatron.get_pisa_optimizer)"
            )
        return self.router.orthogonalize(directions, ns_steps, compute_dtype)

    def join_if_empty(self, param_groups: list[dict]) -> None:
        group = param_groups[self.group_index]
        if group["params"] or group["lr"] == 0:  # PISA calls the router itself / every rank skips the group
            return
        device = self._device or torch.device("cpu")
        dtype = torch.float32
        compute_dtype = F.ns_compute_dtype(device, dtype, group.get("ns_dtype", "auto"))
        self.router.orthogonalize([], group["ns_steps"], compute_dtype, dtype=dtype, device=device)


def check_nsisa(config, tp_group, dense: list[dict], expert: list[dict]) -> None:
    if config.optimizer_cpu_offload:
        raise ValueError(
            "get_pisa_optimizer: preconditioner='nsisa' with optimizer_cpu_offload: HybridDeviceOptimizer splits the "
            "shards over several sub-optimizers, so whole-matrix routing cannot run; use 'sisa' or no offload"
        )
    if tp_group is not None and tp_group.size() > 1:
        raise ValueError(
            "get_pisa_optimizer: preconditioner='nsisa' with tensor parallelism: each TP rank holds a block of every "
            "matrix and Newton–Schulz would run on a slice; use TP=1 (DP and EP are fine) or 'sisa'"
        )
    for kind, groups in (("dense", dense), ("expert-parallel", expert)):
        count = sum(g["preconditioner"] == "nsisa" and bool(g["params"]) for g in groups)
        if count > 1:
            raise ValueError(
                f"get_pisa_optimizer: preconditioner='nsisa' needs the {kind} block matrices in one param group; "
                f"config_overrides split them into {count} (their Newton–Schulz exchange is one collective per step)"
            )
