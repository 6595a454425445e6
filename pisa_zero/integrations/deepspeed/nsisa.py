"""NSISA under ZeRO: the orthogonalizer for DeepSpeed's flat partitions (see `pisa_zero.orthogonalizer`).

Each flat fp32 partition (a ZeRO-1/2 param group or a ZeRO-3 sub-group) holds pieces of several parameters; its
:class:`~.layout.PartitionLayout` says which, on every rank. The pieces of its matrices go through one
`pisa_zero.routing.MatrixRouter` per partition, in rounds of at most ``max_bytes_in_flight`` of routing buffers per
rank (the JSON's ``optimizer.params.routing_bytes``); tensors that are not matrices keep ``u``.
"""

from __future__ import annotations

import torch

from ...routing import ROUTING_BYTES, MatrixRouter, Piece, check_routing_bytes
from .layout import PartitionLayout


class PartitionOrthogonalizer:
    """``PISA(orthogonalizer=...)`` for ZeRO partitions. Built with the optimizer (before DeepSpeed has partitioned
    anything) and bound to the engine's layouts by :meth:`bind` once ``deepspeed.initialize`` has built them."""

    def __init__(self, max_bytes_in_flight: int | None = ROUTING_BYTES):
        if max_bytes_in_flight is not None:
            check_routing_bytes(max_bytes_in_flight, "PartitionOrthogonalizer")
        self.max_bytes_in_flight = max_bytes_in_flight
        self.layouts: dict[int, PartitionLayout] | None = None
        self._routes: dict[int, tuple[MatrixRouter, list]] = {}

    def bind(self, layouts: dict[int, PartitionLayout]) -> None:
        self.layouts = layouts
        self._routes = {}

    def __call__(self, params, directions, ns_steps: int, compute_dtype: torch.dtype) -> list[torch.Tensor]:
        if self.layouts is None:
            raise ValueError("PISA: nsisa's DeepSpeed orthogonalizer was never bound to an engine's partition layout")
        out = []
        for p, u in zip(params, directions):
            layout = self.layouts.get(id(p))
            if layout is None:
                raise ValueError(
                    f"PISA: nsisa got a flat partition of shape {tuple(p.shape)} that pisa_zero's DeepSpeed layout "
                    "does not know (was the engine built by pisa_zero.deepspeed.initialize?)"
                )
            router, mine = self._route(layout)
            u = u.float()
            result = u.clone()
            # each round writes its pieces of O straight into the result, so no list of them outlives a round
            local = [u[pc.local_start : pc.local_start + pc.numel] for pc in mine]
            into = [result[pc.local_start : pc.local_start + pc.numel] for pc in mine]
            router.orthogonalize(local, ns_steps, compute_dtype, dtype=u.dtype, device=u.device, out=into)
            out.append(result)
        return out

    def _route(self, layout: PartitionLayout) -> tuple[MatrixRouter, list]:
        """The partition's router (its matrices' pieces on every rank) and this rank's matrix pieces."""
        if id(layout) not in self._routes:
            matrices = [[pc for pc in rank_pieces if len(pc.shape) == 2] for rank_pieces in layout.pieces]
            pieces = [[Piece(pc.name, pc.shape, pc.param_start, pc.numel) for pc in lst] for lst in matrices]
            router = MatrixRouter(pieces, layout.group, max_bytes_in_flight=self.max_bytes_in_flight)
            self._routes[id(layout)] = (router, matrices[layout.rank])
        return self._routes[id(layout)]
