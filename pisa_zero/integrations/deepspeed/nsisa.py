"""Whole-matrix Newton–Schulz for NSISA on ZeRO partitions (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ... import functional as F
from ...consensus import comm_device
from .layout import PartitionLayout, Piece


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
