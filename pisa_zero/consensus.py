"""Agents × shards: the consensus collectives of PISA's distributed algorithm (mode B, ALGORITHM.md §2).

World = m agents × k shard ranks, laid out like HSDP: rank = agent·k + shard. Inside an agent the host (FSDP2 on the
shard sub-mesh) averages gradients over its k ranks and shards parameters and state; across agents nothing but the
consensus is communicated. Each step, on every shard rank:

1. one control all-reduce over the world of one float: this rank's sample count n (``set_local_batch_size``), or +inf
   when its gradients are not finite. The sum N gives α_i = k·n/N, and an inf sum makes *every* rank skip the step
   (the non-finite skip is agreed, so mode B never deadlocks). Without ``set_local_batch_size`` n = 1: equal weights.
2. the kernel writes c_i = α_i(π_i − σ d_i) into an fp32 contribution buffer (π_i, v_i updated in place);
3. reduce-scatter (fp32, sum) of the buffer over the agent group: each agent rank owns 1/m of the shard and applies
   w ← w + (Σc − λw)/(σ + λ) to its slice of the fp32 master; all-gather of the updated slices writes the same bits
   into every agent's parameter. Bytes: 2·(m−1)/m·4 per element, exactly an fp32 all-reduce (ring), and the result is
   bitwise identical on all agents by construction (one owner computes each element).

What is the fp32 master? Under FSDP2 (also with ``MixedPrecisionPolicy(param_dtype=bf16)``) the sharded fp32 parameter
*is* the master: 4/k bytes per parameter per rank, the same as HSDP-AdamW; it is replicated over agents because every
agent needs w for its forward pass. For a plain fp32 model (k = 1) the parameter is likewise the master. For a
low-precision (bf16/fp16) parameter that FSDP does not master, the topology keeps an fp32 master *slice* on its owner
rank only (4/m bytes per parameter, state key ``"master"`` of the optimizer) and all-gathers the updated slice in the
parameter's dtype.

Auxiliary AdamW groups in mode B get their gradients α-averaged across agents (reduce-scatter + all-gather, fp32) and
then take the same AdamW step on every agent, so they also stay bitwise identical.

Newton–Schulz on whole matrices (NSISA) is not consensus: see `pisa_zero.routing`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from ._utils import comm_device, dist_on

DEFAULT_BUCKET_ELEMENTS = 1 << 22  # 16 MiB of fp32 per consensus collective


class AgentTopology:
    """m agents × k shard ranks. Build with :meth:`from_mesh` (a DeviceMesh with dims ("agent", "shard")) or
    :meth:`build` (``agents=m`` over the whole world).

    Attributes: ``agents`` (m), ``shard_size`` (k), ``agent_index`` (this rank's agent), ``shard_index``,
    ``agent_group`` (the m ranks holding the same shard in different agents), ``shard_group`` (this agent's k ranks),
    ``shard_mesh`` (the 1-D sub-mesh to hand to ``fully_shard``), ``mesh`` and ``alpha`` (this agent's weight in the
    last step).
    """

    def __init__(self, mesh=None, *, group=None):
        self.mesh = mesh
        self.control_group = None  # the ranks that agree on α and on skipping (None: the whole world)
        if group is not None:  # every rank of a process group is an agent, parameters not sharded (k = 1)
            if mesh is not None:
                raise ValueError("AgentTopology: give a mesh or a group, not both")
            self.agents, self.shard_size = dist.get_world_size(group), 1
            self.agent_index, self.shard_index = dist.get_rank(group), 0
            self.agent_group, self.shard_group, self.shard_mesh = group, None, None
            self.control_group = group
        elif mesh is None:  # one agent, one rank: no torch.distributed needed
            self.agents, self.shard_size, self.agent_index, self.shard_index = 1, 1, 0, 0
            self.agent_group = self.shard_group = self.shard_mesh = None
        else:
            names = tuple(mesh.mesh_dim_names or ())
            if names != ("agent", "shard"):
                raise ValueError(f"AgentTopology: mesh_dim_names={names!r}: expected ('agent', 'shard')")
            if mesh.mesh.numel() != dist.get_world_size():
                raise ValueError(
                    f"AgentTopology: mesh has {mesh.mesh.numel()} ranks but world_size={dist.get_world_size()}: "
                    "the agent mesh must span the whole world"
                )
            self.agents, self.shard_size = mesh.size(0), mesh.size(1)
            self.agent_index = mesh.get_local_rank("agent")
            self.shard_index = mesh.get_local_rank("shard")
            self.agent_group = mesh.get_group("agent")
            self.shard_group = mesh.get_group("shard")
            self.shard_mesh = mesh["shard"]
        self.alpha = 1.0 / self.agents
        self.extra_totals: list[float] = []  # the caller's floats summed by the last control all-reduce
        self._local_count: float | None = None
        self._masters: dict[tuple, Tensor] = {}  # fp32 master slices of low-precision groups (owner rank only)
        # Consensus buffers and kernel temporaries are bounded by buckets of this many elements (like DDP's
        # buckets): the step's transient memory stays ~6 × 4 bytes × bucket, not × the whole shard.
        self.bucket_elements = DEFAULT_BUCKET_ELEMENTS

    @classmethod
    def from_mesh(cls, device_mesh) -> AgentTopology:
        return cls(device_mesh)

    @classmethod
    def from_group(cls, group) -> AgentTopology:
        """Every rank of ``group`` (a ProcessGroup, e.g. ``dist.group.WORLD``) is one agent with unsharded params."""
        if not dist_on():
            raise ValueError("AgentTopology.from_group: torch.distributed is not initialised")
        return cls(group=group)

    @classmethod
    def build(cls, agents: int, device_type: str | None = None) -> AgentTopology:
        """m = ``agents`` agents over the whole world (k = world/m ranks each, rank = agent·k + shard)."""
        if not isinstance(agents, int) or agents < 1:
            raise ValueError(f"AgentTopology.build: invalid agents={agents!r}: expected an integer >= 1")
        if not dist_on():
            if agents != 1:
                raise ValueError(f"AgentTopology.build: agents={agents} needs torch.distributed to be initialised")
            return cls(None)
        world = dist.get_world_size()
        if world % agents:
            raise ValueError(f"AgentTopology.build: agents={agents} does not divide world_size={world}")
        from torch.distributed.device_mesh import init_device_mesh

        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        mesh = init_device_mesh(device_type, (agents, world // agents), mesh_dim_names=("agent", "shard"))
        return cls(mesh)

    def __repr__(self) -> str:
        return f"AgentTopology(agents={self.agents}, shard_size={self.shard_size}, agent_index={self.agent_index})"

    # ------------------------------------------------------------------------------------------- weights α
    def set_local_batch_size(self, n: float) -> None:
        """This rank's sample (or token) count for the coming steps (kept until changed). Agent i's weight is
        α_i = k·n_i / Σ_ranks n: FSDP averages an agent's k rank-gradients with equal weights, so an agent's ranks
        should see equal counts. Never called: n = 1 everywhere, equal weights."""
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise ValueError(f"set_local_batch_size: invalid n={n!r}: expected a finite number > 0")
        self._local_count = float(n)

    def begin_step(self, grads: list[Tensor], check_finite: bool, extra=(), veto=False) -> bool:
        """The control all-reduce: agree on skipping (non-finite gradients or a ``veto`` anywhere) and compute α.
        True = go. ``extra`` (floats or a 1-D tensor) rides on the same all-reduce; the sums land in
        ``extra_totals``."""
        count = 1.0 if self._local_count is None else self._local_count
        distributed = self.agents * self.shard_size > 1
        device = grads[0].device if grads else torch.device("cpu")
        if distributed:
            device = comm_device(device, self.control_group)
        totals = control_all_reduce(grads, check_finite, count, extra, veto, device, self.control_group, distributed)
        total, self.extra_totals = totals[0], totals[1:]
        if not math.isfinite(total):
            return False
        self.alpha = count * self.shard_size / total
        return True

    # ------------------------------------------------------------------------------------------- collectives
    def _sum_across_agents(self, buf: Tensor, owner_fn=None) -> None:
        """In place: buf ← Σ_agents buf, as reduce-scatter + (owner_fn on the owned slice) + all-gather."""
        m = self.agents
        if m == 1:
            if owner_fn is not None:
                owner_fn(buf, 0)
            return
        s = buf.numel() // m
        out = torch.empty(s, dtype=buf.dtype, device=buf.device)
        _reduce_scatter(out, buf, self.agent_group)
        me = dist.get_rank(self.agent_group)
        if owner_fn is not None:
            owner_fn(out, me * s)
        _all_gather(buf, out, self.agent_group)

    def _buckets(self, tensors: list[Tensor]) -> list[list[int]]:
        """Consecutive index runs of at most ``bucket_elements`` elements (at least one tensor each)."""
        buckets, current, size = [], [], 0
        for i, t in enumerate(tensors):
            if current and size + t.numel() > self.bucket_elements:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += t.numel()
        if current:
            buckets.append(current)
        return buckets

    def reduce_gradients(self, grads: list[Tensor]) -> None:
        """g ← Σ_i α_i g_i over agents, in place (auxiliary AdamW groups in mode B), bucket by bucket."""
        if self.agents == 1 or not grads:
            return
        for bucket in self._buckets(grads):
            self._reduce_gradients([grads[i] for i in bucket])

    def _reduce_gradients(self, grads: list[Tensor]) -> None:
        if sum(g.numel() for g in grads) == 0:
            return
        buf = _flat_buffer(grads, self.agents)
        offset = 0
        for g in grads:
            buf[offset : offset + g.numel()].view_as(g).copy_(g).mul_(self.alpha)
            offset += g.numel()
        self._sum_across_agents(buf)
        offset = 0
        for g in grads:
            g.copy_(buf[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self, params, directions, duals, second_moments, steps, scalars: F.StepScalars, implementation):
        """One consensus step on this rank's local tensors (called by `PISA._pisa_group`), bucket by bucket."""
        if not params:
            return
        m = self.agents
        if m == 1 and not _low_precision(params[0]):  # one agent: the plain (mode A) step, no buffer
            F.pisa_step(params, directions, duals, second_moments, steps, scalars, implementation=implementation)
            return
        for bucket in self._buckets(params):

            def pick(xs, bucket=bucket):
                return None if xs is None else [xs[i] for i in bucket]

            self._step_bucket(
                pick(params), pick(directions), pick(duals), pick(second_moments), pick(steps), scalars,
                implementation,
            )  # fmt: skip

    def _step_bucket(self, params, directions, duals, second_moments, steps, scalars, implementation):
        m = self.agents
        if sum(p.numel() for p in params) == 0:  # empty shards (e.g. rows < k): the same on every agent
            return
        buf, offsets, views = _flat_views(params, m)
        low_precision = _low_precision(params[0])
        kernel_scalars = dataclasses.replace(scalars, alpha=self.alpha)
        if low_precision:  # decay goes to the fp32 master, not to the bf16 copy
            kernel_scalars = dataclasses.replace(kernel_scalars, decay=1.0)
        F.pisa_step(
            params, directions, duals, second_moments, steps, kernel_scalars,
            implementation=implementation, contributions=views,
        )  # fmt: skip
        s = buf.numel() // m

        if not low_precision:

            def owner(summed: Tensor, start: int) -> None:
                # the fp32 master slice of the owner: the parameter itself (same bits on every agent)
                w = torch.zeros_like(summed)
                for o, p in zip(offsets, params):
                    lo, hi = max(o, start), min(o + p.numel(), start + s)
                    if lo < hi:
                        w[lo - start : hi - start] = p.reshape(-1)[lo - o : hi - o]
                F.apply_consensus([w], [summed], scalars.sigma, scalars.l2_lambda)
                summed.copy_(w)

            self._sum_across_agents(buf, owner)
            for p, v in zip(params, views):
                p.copy_(v)
            return

        # low precision: the fp32 master slice lives on its owner only; gather the update in the param dtype
        key = tuple(p.data_ptr() for p in params)
        if key not in self._masters:
            self._masters[key] = self.master_slice(params)
        master = self._masters[key]
        if master.numel() != s:
            raise ValueError(f"consensus: master slice has {master.numel()} elements, expected {s}")
        if m == 1:
            master.mul_(scalars.decay)
            F.apply_consensus([master], [buf], scalars.sigma, scalars.l2_lambda)
            gathered = master
        else:
            out = torch.empty(s, dtype=buf.dtype, device=buf.device)
            _reduce_scatter(out, buf, self.agent_group)
            master.mul_(scalars.decay)
            F.apply_consensus([master], [out], scalars.sigma, scalars.l2_lambda)
            gathered = torch.empty(s * m, dtype=params[0].dtype, device=buf.device)
            _all_gather(gathered, master.to(params[0].dtype), self.agent_group)
        for o, p in zip(offsets, params):
            p.copy_(gathered[o : o + p.numel()].view_as(p))

    def master_slice(self, params: list[Tensor]) -> Tensor:
        """This rank's fp32 master slice of a low-precision group (initialised from the params)."""
        m = self.agents
        n = sum(p.numel() for p in params)
        s = -(-n // m)
        me = 0 if m == 1 else dist.get_rank(self.agent_group)
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        out = torch.zeros(s, dtype=torch.float32, device=flat.device)
        part = flat[me * s : (me + 1) * s]
        out[: part.numel()] = part
        return out


def _reduce_scatter(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # renamed in torch 2.13
    fn(out, inp, op=dist.ReduceOp.SUM, group=group)


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    fn(out, inp, group=group)


def _low_precision(t: Tensor) -> bool:
    """Narrower than the arithmetic (bf16/fp16): such groups keep an fp32 master slice on its owner."""
    return t.dtype != F.arithmetic_dtype(t)


def control_all_reduce(grads, check_finite: bool, value: float, extra, veto, device, group, reduce: bool) -> list:
    """[value, or +inf when this rank's gradients are not finite or it vetoes; *extra] summed over ``group`` (when
    ``reduce``) and read back in one host sync. fp32 (4 bytes) unless ``extra`` is given, then fp64."""
    extra = torch.as_tensor(extra, device=device).reshape(-1)
    dtype = torch.float64 if extra.numel() else torch.float32
    bad = torch.as_tensor(veto, device=device).reshape(1).bool()
    if check_finite and grads:
        bad = bad | ~F.finite_flag(grads).to(device).reshape(1)
    head = torch.where(bad, math.inf, torch.full((1,), value, dtype=dtype, device=device))
    vec = torch.cat([head, extra.to(dtype)])
    if reduce:
        dist.all_reduce(vec, group=group)
    return vec.tolist()


def _flat_buffer(tensors: list[Tensor], parts: int) -> Tensor:
    """Zeroed buffer in the arithmetic dtype (fp32; fp64 for fp64), padded to split into ``parts`` equal slices."""
    n = sum(t.numel() for t in tensors)
    s = -(-n // parts)
    return torch.zeros(s * parts, dtype=F.arithmetic_dtype(tensors[0]), device=tensors[0].device)


def _flat_views(tensors: list[Tensor], parts: int) -> tuple[Tensor, list[int], list[Tensor]]:
    """A :func:`_flat_buffer` for ``tensors``, each tensor's offset in it, and a view of it shaped like each."""
    buf = _flat_buffer(tensors, parts)
    offsets, offset = [], 0
    for t in tensors:
        offsets.append(offset)
        offset += t.numel()
    return buf, offsets, [buf[o : o + t.numel()].view_as(t) for o, t in zip(offsets, tensors)]
