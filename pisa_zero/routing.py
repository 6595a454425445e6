"""Whole-matrix Newton–Schulz for sharded hosts: route every matrix's pieces to one owner rank and back.

Newton–Schulz (NSISA's ``O = NS5(u)``) needs whole matrices, but a sharded host gives each rank only *pieces* of them:
FSDP2's Shard(0) DTensors a block of rows, DeepSpeed ZeRO a run of a flat partition that cuts across parameters,
Megatron's distributed optimizer a 1-D slice of some parameters' main params. In every case a piece is a contiguous
run of the matrix's row-major (flattened) elements, described by a :class:`Piece`, and one :class:`MatrixRouter`
does the rest:

1. each matrix gets one **owner** rank, balancing the Newton–Schulz cost rows·cols·min(rows, cols) (largest first,
   to the least-loaded rank; :func:`balance_owners`), the same on every rank;
2. the matrices are split into **rounds** (:func:`plan_rounds`: same-shape matrices together, whole Newton–Schulz
   batches, at most ``max_bytes_in_flight`` of routing buffers per rank), the same plan on every rank; per round:
3. one ``all_to_all_single`` over the group sends the round's pieces of ``u`` to their matrices' owners;
4. each owner assembles the round's whole matrices and orthogonalises them in same-shape batches
   (`F.orthogonalize_batched`), the very batches of a single round, so the result is bit-identical to it;
5. a second ``all_to_all_single`` returns each rank its pieces of ``O``, and the round's buffers are freed.

Bytes: each rank sends and receives about its pieces' size twice per step (in the routing dtype, fp32), and runs
1/world of the Newton–Schulz work; it holds one round's buffers at a time (:data:`ROUTING_BYTES` by default), not
all of its matrices' at once. :func:`orthogonalize_sharded` is the DTensor host (FSDP2); the DeepSpeed host is
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


#: Default bound on a rank's routing buffers per round, in bytes (``max_bytes_in_flight``): what it sends, receives
#: and assembles in one round. 256 MiB matches the Newton–Schulz batch bound (`F.NS_BATCH_ELEMENTS` fp32), so routing
#: adds about as much as the iteration's own temporaries; it is small beside the 12 bytes/param of fp32 state of any
#: model where memory matters (1B params: 12 GB), and large enough that each all-to-all moves tens of MiB, which
#: keeps the per-round latency of the two collectives negligible.
ROUTING_BYTES = 256 * 2**20


def check_routing_bytes(value, owner: str, key: str = "max_bytes_in_flight"):
    """``value`` if it is a byte budget (an integer > 0), else ValueError naming ``owner`` and ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: invalid {key}={value!r}: expected an integer number of bytes > 0")
    return value


def ns_units(shapes: Sequence[tuple[int, int]], owner: Sequence[int]) -> list[list[int]]:
    """The Newton–Schulz batches of every owner, as `F.orthogonalize_batched` forms them on that owner's matrices
    (same shape, index order, ``NS_BATCH_ELEMENTS`` at most), listed same shape together (shapes in order of first
    appearance, then owner). A round holds whole units, so its batches are those of a single round, bit for bit."""
    first: dict[tuple[int, int], int] = {}
    by: dict[tuple, list[int]] = {}
    for j, shape in enumerate(shapes):
        first.setdefault(shape, j)
        by.setdefault((shape, owner[j]), []).append(j)
    units = []
    for shape, o in sorted(by, key=lambda k: (first[k[0]], k[1])):
        js = by[shape, o]
        per = max(1, F.NS_BATCH_ELEMENTS // max(1, shape[0] * shape[1]))
        units += [js[i : i + per] for i in range(0, len(js), per)]
    return units


def plan_rounds(shapes, owner, held, budget: int | None) -> list[list[int]]:
    """Rounds of matrix indices: whole :func:`ns_units` in order, packed while every rank's elements in flight
    (its pieces sent + the pieces it receives as owner + the matrices it assembles) stay within ``budget``; a round
    holds at least one unit. ``held[j][r]``: elements of matrix ``j`` on rank ``r``. Depends only on the layout, so
    every rank plans the same rounds without a collective. ``budget`` None: one round."""
    world = len(held[0]) if held else 1
    rounds: list[list[int]] = []
    current: list[int] = []
    load = [0] * world
    for unit in ns_units(shapes, owner):
        add = [sum(held[j][r] for j in unit) for r in range(world)]
        for j in unit:
            add[owner[j]] += 2 * shapes[j][0] * shapes[j][1]  # received, then assembled
        if current and budget is not None and any(a + b > budget for a, b in zip(load, add)):
            rounds.append(current)
            current, load = [], [0] * world
        current += unit
        load = [a + b for a, b in zip(load, add)]
    if current:
        rounds.append(current)
    return rounds


@dataclass
class _Round:
    """One round's exchange plan on this rank (see :class:`MatrixRouter`)."""

    to_owner: list  # [d]: positions (in this rank's list) of the pieces it sends rank d, in list order
    from_rank: list  # [s]: (matrix, piece) pairs rank s sends here, in rank s's list order
    units: list  # this rank's Newton–Schulz batches (matrix indices) of the round
    send_sizes: list
    recv_sizes: list


class MatrixRouter:
    """Whole-matrix Newton–Schulz over one process group, for a fixed layout of pieces.

    ``pieces[r]`` lists the pieces rank ``r`` holds, in the order that rank passes their data to :meth:`orthogonalize`
    (every rank must pass the same ``pieces``: build it from the host's layout, or from this rank's own pieces with
    :meth:`from_local_pieces`). A matrix's pieces together must cover it; pieces of one matrix never overlap.
    Build once per layout and reuse: the owners and the exchange plan are computed here, not per step.

    The matrices go in rounds (:func:`plan_rounds`): per round a rank holds at most ``max_bytes_in_flight`` bytes of
    routing buffers (sent + received + assembled; the return trip holds the same sizes), or one Newton–Schulz batch
    where that alone is larger, and frees them before the next round. ``None``: every matrix in one round.
    """

    #: test hook: called as ``buffer_hook(round, name, tensor)`` for every routing buffer allocated
    buffer_hook = None

    def __init__(
        self, pieces: Sequence[Sequence[Piece]], group=None, *, max_bytes_in_flight: int | None = ROUTING_BYTES
    ):
        if max_bytes_in_flight is not None:
            check_routing_bytes(max_bytes_in_flight, "MatrixRouter")
        self.group = group
        self.world = len(pieces)
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        self.max_bytes_in_flight = max_bytes_in_flight
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
        self._pieces = [[(index[pc.key], pc) for pc in rank_pieces] for rank_pieces in pieces]
        self._held = [[0] * self.world for _ in shapes]
        for r, lst in enumerate(self._pieces):
            for j, pc in lst:
                self._held[j][r] += pc.numel
        self._numel = tuple(pc.numel for pc in pieces[self.rank])
        self._plans: dict[int, list[_Round]] = {}

    @classmethod
    def from_local_pieces(
        cls, mine: Sequence[Piece], group=None, *, max_bytes_in_flight: int | None = ROUTING_BYTES
    ) -> MatrixRouter:
        """For a host whose ranks know only their own pieces: one ``all_gather_object`` (at build time) shares them."""
        world = dist.get_world_size(group) if dist_on() else 1
        everyone: list = [None] * world
        if world > 1:
            dist.all_gather_object(everyone, list(mine), group=group)
        else:
            everyone = [list(mine)]
        return cls(everyone, group, max_bytes_in_flight=max_bytes_in_flight)

    def rounds(self, itemsize: int = 4) -> list[list[int]]:
        """The matrix indices of each round for a routing dtype of ``itemsize`` bytes (the same on every rank)."""
        budget = None if self.max_bytes_in_flight is None else max(1, self.max_bytes_in_flight // itemsize)
        return plan_rounds(self.shapes, self.owner, self._held, budget)

    def _plan(self, itemsize: int) -> list[_Round]:
        if itemsize not in self._plans:
            me, plan = self.rank, []
            units = ns_units(self.shapes, self.owner)
            for matrices in self.rounds(itemsize):
                inside = set(matrices)
                to_owner = [[] for _ in range(self.world)]
                for i, (j, _) in enumerate(self._pieces[me]):
                    if j in inside:
                        to_owner[self.owner[j]].append(i)
                from_rank = [[(j, pc) for j, pc in lst if j in inside and self.owner[j] == me] for lst in self._pieces]
                mine = [u for u in units if u[0] in inside and self.owner[u[0]] == me]
                send = [sum(self._pieces[me][i][1].numel for i in lst) for lst in to_owner]
                recv = [sum(pc.numel for _, pc in lst) for lst in from_rank]
                plan.append(_Round(to_owner, from_rank, mine, send, recv))
            self._plans[itemsize] = plan
        return self._plans[itemsize]

    def orthogonalize(
        self, local: Sequence[Tensor], ns_steps: int, compute_dtype: torch.dtype, *, dtype=None, device=None, out=None
    ) -> list[Tensor]:
        """O for this rank's pieces: ``local[i]`` holds the data of this rank's i-th piece (any shape with that
        numel, all of one dtype and device); returns the pieces of O in the same shapes, dtype and device. ``out``:
        tensors to write them into instead (each round's buffers are then all freed before the next).

        Collective: every rank of the group calls it, also one without pieces (then give ``dtype`` and ``device``,
        which otherwise come from ``local[0]``).
        """
        if len(local) != len(self._numel) or any(t.numel() != n for t, n in zip(local, self._numel)):
            got = [t.numel() for t in local]
            raise ValueError(f"MatrixRouter: pieces of {got} elements, the layout says {list(self._numel)}")
        result = list(local) if out is None else list(out)
        if not self.shapes:
            for o, t in zip(result, local):
                if o is not t:
                    o.copy_(t)
            return result
        dtype = dtype or local[0].dtype
        home = device or local[0].device
        device = comm_device(home, self.group) if self.world > 1 else home
        flat = [t.reshape(-1) for t in local]
        itemsize = torch.empty(0, dtype=dtype).element_size()
        for r, rnd in enumerate(self._plan(itemsize)):
            self._round(r, rnd, flat, local, result, out is not None, ns_steps, compute_dtype, dtype, device, home)
        return result

    def _round(self, r, rnd: _Round, flat, local, result, write, ns_steps, compute_dtype, dtype, device, home) -> None:
        """One round: pieces to owners, Newton–Schulz there, pieces of O back; its buffers die with this frame."""
        hook = self._hook
        empty = [torch.zeros(0, dtype=dtype, device=device)]
        send = torch.cat([flat[i] for lst in rnd.to_owner for i in lst] or empty).to(device)
        hook(r, "send", send)
        received = [self._exchange(send, rnd.recv_sizes, rnd.send_sizes, dtype, device)]
        hook(r, "recv", received[0])
        del send
        # handed over in a list that _owner_step empties, so the received pieces are freed once assembled
        ortho = self._owner_step(r, rnd, received, ns_steps, compute_dtype)
        back = torch.cat([ortho[j][pc.start : pc.start + pc.numel].to(dtype) for lst in rnd.from_rank for j, pc in lst]
                         or empty)  # fmt: skip
        hook(r, "back", back)
        del ortho
        got = self._exchange(back, rnd.send_sizes, rnd.recv_sizes, dtype, device)
        hook(r, "got", got)
        del back
        offset = 0
        for lst in rnd.to_owner:
            for i in lst:
                piece = got[offset : offset + flat[i].numel()].view_as(local[i])
                if write:
                    result[i].copy_(piece)
                else:
                    result[i] = piece.to(home)
                offset += flat[i].numel()

    def _owner_step(self, r: int, rnd: _Round, received: list, ns_steps: int, compute_dtype) -> dict[int, Tensor]:
        """Assemble the round's owned matrices from the received pieces, orthogonalise them batch by batch (the
        batches of a single round); matrix -> flattened O."""
        recv = received.pop()
        whole = {j: recv.new_zeros(self.shapes[j][0] * self.shapes[j][1]) for u in rnd.units for j in u}
        for t in whole.values():
            self._hook(r, "assembled", t)
        offset = 0
        for lst in rnd.from_rank:
            for j, pc in lst:
                whole[j][pc.start : pc.start + pc.numel] = recv[offset : offset + pc.numel]
                offset += pc.numel
        del recv  # assembled: the matrices' bytes are held once, not twice, during Newton–Schulz
        out = {}
        for unit in rnd.units:
            ortho = F.orthogonalize_batched([whole.pop(j).view(self.shapes[j]) for j in unit], ns_steps, compute_dtype)
            out.update((j, o.reshape(-1)) for j, o in zip(unit, ortho))
        return out

    def _hook(self, r: int, name: str, t: Tensor) -> None:
        if self.buffer_hook is not None:
            self.buffer_hook(r, name, t)

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
    params: list[Tensor],
    local_us: list[Tensor],
    steps: int,
    compute_dtype,
    routers: dict | None = None,
    max_bytes_in_flight: int | None = ROUTING_BYTES,
) -> list[Tensor]:
    """O for each 2-D param from its local part of u (a DTensor's local shard); 1-D tensors pass through unchanged.

    Shard(0) DTensors on a 1-D mesh go through a :class:`MatrixRouter` per mesh, their row blocks being the pieces
    (``routers``: a cache, keyed by mesh and shapes, that the caller keeps across steps). Other DTensor layouts fall
    back to gathering the full matrix on every rank; plain matrices are orthogonalised here. ``max_bytes_in_flight``:
    the routers' budget per round (:class:`MatrixRouter`).
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
            pieces = row_block_pieces(shapes, mesh.size())
            routers[mesh, shapes] = MatrixRouter(pieces, mesh.get_group(), max_bytes_in_flight=max_bytes_in_flight)
        us = [local_us[i].to(F.arithmetic_dtype(local_us[i])) for i in indices]
        for i, o in zip(indices, routers[mesh, shapes].orthogonalize(us, steps, compute_dtype)):
            out[i] = o
    return out
