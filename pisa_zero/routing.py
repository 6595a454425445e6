"""Whole-matrix Newton–Schulz for sharded hosts: route every matrix's pieces to one owner rank and back.

Newton–Schulz (NSISA's ``O = NS5(u)``) needs whole matrices, but a sharded host gives each rank only *pieces* of them:
FSDP2's Shard(0) DTensors a block of rows, DeepSpeed ZeRO a run of a flat partition that cuts across parameters,
Megatron's distributed optimizer a 1-D slice of some parameters' main params. In every case a piece is a contiguous
run of the matrix's row-major (flattened) elements, described by a :class:`Piece`, and one :class:`MatrixRouter`
does the rest:

1. each matrix gets one **owner** rank, balancing the Newton–Schulz cost rows·cols·min(rows, cols) (largest first,
   to the least-loaded rank; :func:`balance_owners`), the same on every rank;
2. one ``all_to_all_single`` over the group sends every piece of ``u`` to its matrix's owner;
3. the owner assembles its whole matrices and orthogonalises them in same-shape batches (`F.orthogonalize_batched`);
4. a second ``all_to_all_single`` returns each rank its pieces of ``O``.

Bytes: each rank sends and receives about its pieces' size twice per step (in the routing dtype, fp32), and runs
1/world of the Newton–Schulz work. :func:`orthogonalize_sharded` is the DTensor host (FSDP2); the DeepSpeed host is
`pisa_zero.integrations.deepspeed.nsisa`.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from ._utils import DTensor, comm_device, dist_on


@dataclass(frozen=True)
class Piece:
    """One rank's contiguous run of a matrix: elements ``[start, start + numel)`` of the row-major flattened matrix
    ``key`` (any hashable name, the same on every rank) of shape ``shape`` (2-D)."""

    key: Hashable
    shape: tuple[int, int]
    start: int
    numel: int


def balance_owners(shapes: Sequence[tuple[int, int]], world: int) -> list[int]:
    """Owner rank of each matrix: Newton–Schulz cost ≈ rows·cols·min(rows, cols), largest first, each to the
    least-loaded rank (ties: lowest index, lowest rank), so every rank computes the same owners."""
    load = [0.0] * world
    owner = [0] * len(shapes)
    cost = [float(a * b * min(a, b)) for a, b in shapes]
    for j in sorted(range(len(shapes)), key=lambda j: (-cost[j], j)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[j] = r
        load[r] += cost[j]
    return owner


class MatrixRouter:
    """Whole-matrix Newton–Schulz over one process group, for a fixed layout of pieces.

    ``pieces[r]`` lists the pieces rank ``r`` holds, in the order that rank passes their data to :meth:`orthogonalize`
    (every rank must pass the same ``pieces``: build it from the host's layout, or from this rank's own pieces with
    :meth:`from_local_pieces`). A matrix's pieces together must cover it; pieces of one matrix never overlap.
    Build once per layout and reuse: the owners and the exchange plan are computed here, not per step.
    """

    def __init__(self, pieces: Sequence[Sequence[Piece]], group=None):
        self.group = group
        self.world = len(pieces)
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        index: dict[Hashable, int] = {}
        shapes: list[tuple[int, int]] = []
        for rank_pieces in pieces:
            for pc in rank_pieces:
                if len(pc.shape) != 2:
                    raise ValueError(f"MatrixRouter: piece of {pc.key!r} has shape {pc.shape}; only matrices route")
                if pc.key not in index:
                    index[pc.key] = len(index)
                    shapes.append(tuple(pc.shape))
        self.shapes = tuple(shapes)
        self.owner = tuple(balance_owners(shapes, self.world))
        owner_of = [[self.owner[index[pc.key]] for pc in rank_pieces] for rank_pieces in pieces]
        me = self.rank
        # to_owner[d]: positions (in this rank's list) of the pieces it sends to rank d, in list order
        self._to_owner = [[i for i, o in enumerate(owner_of[me]) if o == d] for d in range(self.world)]
        # from_rank[s]: (matrix, piece) pairs rank s sends here, in rank s's list order
        self._from_rank = [
            [(index[pc.key], pc) for pc, o in zip(pieces[s], owner_of[s]) if o == me] for s in range(self.world)
        ]
        self._owned = [j for j, o in enumerate(self.owner) if o == me]
        self._send_sizes = [sum(pieces[me][i].numel for i in lst) for lst in self._to_owner]
        self._recv_sizes = [sum(pc.numel for _, pc in lst) for lst in self._from_rank]
        self._numel = tuple(pc.numel for pc in pieces[me])

    @classmethod
    def from_local_pieces(cls, mine: Sequence[Piece], group=None) -> MatrixRouter:
        """For a host whose ranks know only their own pieces: one ``all_gather_object`` (at build time) shares them."""
        world = dist.get_world_size(group) if dist_on() else 1
        everyone: list = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, list(mine), group=group)
        else:
            everyone = [list(mine)]
        return cls(everyone, group)

    def orthogonalize(
        self, local: Sequence[Tensor], ns_steps: int, compute_dtype: torch.dtype, *, dtype=None, device=None
    ) -> list[Tensor]:
        """O for this rank's pieces: ``local[i]`` holds the data of this rank's i-th piece (any shape with that
        numel, all of one dtype and device); returns the pieces of O in the same shapes, dtype and device.

        Collective: every rank of the group calls it, also one without pieces (then give ``dtype`` and ``device``,
        which otherwise come from ``local[0]``).
        """
        if len(local) != len(self._numel) or any(t.numel() != n for t, n in zip(local, self._numel)):
            got = [t.numel() for t in local]
            raise ValueError(f"MatrixRouter: pieces of {got} elements, the layout says {list(self._numel)}")
        if not self.shapes:
            return list(local)
        dtype = dtype or local[0].dtype
        home = device or local[0].device
        device = comm_device(home, self.group) if self.world > 1 else home
        flat = [t.reshape(-1) for t in local]
        send = torch.cat([flat[i] for lst in self._to_owner for i in lst] or [torch.zeros(0, dtype=dtype, device=home)])
        # the received pieces are handed over without a name here, so _owner_step frees them once assembled
        ortho = self._owner_step(self._exchange(send.to(device), self._recv_sizes, self._send_sizes, dtype, device),
                                 ns_steps, compute_dtype)  # fmt: skip
        del send
        back = torch.cat(
            [ortho[j][pc.start : pc.start + pc.numel].to(dtype) for lst in self._from_rank for j, pc in lst]
            or [torch.zeros(0, dtype=dtype, device=device)]
        )
        got = self._exchange(back, self._send_sizes, self._recv_sizes, dtype, device)
        out, offset = list(local), 0
        for lst in self._to_owner:
            for i in lst:
                out[i] = got[offset : offset + flat[i].numel()].view_as(local[i]).to(home)
                offset += flat[i].numel()
        return out

    def _owner_step(self, recv: Tensor, ns_steps: int, compute_dtype: torch.dtype) -> dict[int, Tensor]:
        """Assemble the owned matrices from the received pieces, orthogonalise them; matrix -> flattened O."""
        whole = {j: recv.new_zeros(self.shapes[j][0] * self.shapes[j][1]) for j in self._owned}
        offset = 0
        for lst in self._from_rank:
            for j, pc in lst:
                whole[j][pc.start : pc.start + pc.numel] = recv[offset : offset + pc.numel]
                offset += pc.numel
        del recv  # assembled: the matrices' bytes are held once, not twice, during Newton–Schulz
        ortho = F.orthogonalize_batched([whole[j].view(self.shapes[j]) for j in self._owned], ns_steps, compute_dtype)
        return {j: o.reshape(-1) for j, o in zip(self._owned, ortho)}

    def _exchange(self, send: Tensor, recv_sizes, send_sizes, dtype, device) -> Tensor:
        if self.world == 1:
            return send
        recv = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        dist.all_to_all_single(recv, send, recv_sizes, send_sizes, group=self.group)
        return recv


# -------------------------------------------------------------------------------------------------------------
# The DTensor host (FSDP2): a Shard(0) row block is a piece
# -------------------------------------------------------------------------------------------------------------


def _routable(p) -> bool:
    from torch.distributed.tensor import Shard

    return (
        isinstance(p, DTensor)
        and p.ndim == 2
        and p.device_mesh.ndim == 1
        and len(p.placements) == 1
        and isinstance(p.placements[0], Shard)
        and p.placements[0].dim == 0
    )


def _chunk_rows(rows: int, k: int) -> list[int]:
    """Rows per rank of a Shard(0) dimension (torch.chunk semantics, as FSDP2 and DTensor use)."""
    c = -(-rows // k)
    return [max(0, min(c, rows - r * c)) for r in range(k)]


def row_block_pieces(shapes: Sequence[tuple[int, int]], world: int) -> list[list[Piece]]:
    """``pieces[rank]`` of Shard(0) matrices (key = index in ``shapes``): each rank's row block, one piece."""
    out: list[list[Piece]] = [[] for _ in range(world)]
    for j, (rows, cols) in enumerate(shapes):
        start = 0
        for r, n in enumerate(_chunk_rows(rows, world)):
            out[r].append(Piece(j, (rows, cols), start * cols, n * cols))
            start += n
    return out


def orthogonalize_sharded(
    params: list[Tensor], local_us: list[Tensor], steps: int, compute_dtype, routers: dict | None = None
) -> list[Tensor]:
    """O for each 2-D param from its local part of u (a DTensor's local shard); 1-D tensors pass through unchanged.

    Shard(0) DTensors on a 1-D mesh go through a :class:`MatrixRouter` per mesh, their row blocks being the pieces
    (``routers``: a cache, keyed by mesh and shapes, that the caller keeps across steps). Other DTensor layouts fall
    back to gathering the full matrix on every rank; plain matrices are orthogonalised here.
    """
    from torch.distributed.tensor import distribute_tensor

    routers = {} if routers is None else routers
    out = list(local_us)
    routed: dict = {}
    plain = [i for i, p in enumerate(params) if not isinstance(p, DTensor) and p.ndim == 2]
    for i, o in zip(plain, F.orthogonalize_batched([local_us[i] for i in plain], steps, compute_dtype)):
        out[i] = o
    for i, p in enumerate(params):
        if not isinstance(p, DTensor) or p.ndim != 2:
            continue
        if _routable(p):
            routed.setdefault(p.device_mesh, []).append(i)
        else:
            u = DTensor.from_local(local_us[i], p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            ortho = F.orthogonalize(u.full_tensor(), steps, compute_dtype)
            out[i] = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
    for mesh, indices in routed.items():
        shapes = tuple(tuple(params[i].shape) for i in indices)
        if (mesh, shapes) not in routers:
            routers[mesh, shapes] = MatrixRouter(row_block_pieces(shapes, mesh.size()), mesh.get_group())
        us = [local_us[i].to(F.arithmetic_dtype(local_us[i])) for i in indices]
        for i, o in zip(indices, routers[mesh, shapes].orthogonalize(us, steps, compute_dtype)):
            out[i] = o
    return out
