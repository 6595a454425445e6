"""PISA diagnostics and a TensorBoard writer.

`Diagnostics` reads what PISA keeps anyway (the consensus w in the parameter, the dual π in the state) and measures,
on the steps it is asked to (a copy of the local w and π is taken just before such a step):

- ``pisa/<group>/primal_residual``  ‖w_i − w‖ = ‖d‖, recovered from the dual update π ← π − σ d as ‖Δπ‖ / σ
- ``pisa/<group>/dual_residual``    σ ‖w_t − w_{t−1}‖
- ``pisa/<group>/dual_norm``, ``dual_rms``   ‖π‖ and ‖π‖/√n
- ``pisa/<group>/update_rms``       ‖w_t − w_{t−1}‖/√n (AdamW groups too)
- ``pisa/<group>/consensus_disagreement``  mode B only: √(Σ_i ‖d_i − d̄‖² / m), how far the agents' local
  solutions w_i = w − d_i spread around their mean (needs one parameter-sized all-reduce over the agent group)
- ``pisa/<group>/sigma``, ``rho``   σ and ρ in effect at the group's current lr
- local steps (``local_steps=H``): ``pisa/<group>/consensus_gap`` ‖w_i − w‖/‖w‖ at the round ends since the last
  measure (root-mean-square over agents; w the new consensus), ``pisa/rounds`` (rounds completed) and
  ``pisa/cross_agent_bytes_per_step`` (consensus bytes this rank sent across agents per step since the last measure)

Every quantity is a sum of squares over the tensors this rank holds — whole tensors, FSDP2 DTensor local shards or
DeepSpeed flat partitions — all-reduced once over the process group. With m agents each agent holds its own π_i and
d_i, and the numbers are the root-mean-square over agents. Nothing here changes the optimizer or its state.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ._utils import all_reduce_sum
from ._utils import local as _local


def find_pisa(optimizer):
    """The `pisa_zero.PISA` inside a wrapper (DeepSpeed's ZeRO optimizers keep it as ``.optimizer``)."""
    from .optimizer import PISA

    seen = 0
    while optimizer is not None and not isinstance(optimizer, PISA) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    if not isinstance(optimizer, PISA):
        raise ValueError("pisa_zero.monitor: no pisa_zero.PISA optimizer found inside the given optimizer")
    return optimizer


def _sumsq(t: Tensor) -> Tensor:
    t = t.float()
    return (t * t).sum(dtype=torch.float64)


def global_norm(tensors, group=None, replicas: int = 1) -> float:
    """√(Σ‖t‖² / replicas) over local shards/partitions on every rank of ``group`` (one all-reduce)."""
    tensors = [_local(t) for t in tensors if t is not None]
    device = tensors[0].device if tensors else torch.device("cpu")
    local = torch.stack([_sumsq(t).to(device) for t in tensors]).sum() if tensors else torch.zeros((), device=device)
    total = all_reduce_sum(local.reshape(1).double(), group, device)
    return math.sqrt(max(total.item(), 0.0) / replicas)


def _label(state: dict, group: dict | None) -> str:
    if group is not None:
        return group["preconditioner"]
    if "exp_avg" in state:
        return "adamw"
    if "momentum" in state:
        return "nsisa"
    return "sisa" if "second_moment" in state else "identity"


class Diagnostics:
    """Cheap PISA diagnostics for any host. Call ``snapshot()`` right before ``step()`` and ``measure()`` after.

    Args:
        optimizer: a PISA or a wrapper holding one (DeepSpeed's ZeRO optimizers).
        group: the process group whose ranks together hold the tensors (None: the default group, i.e. all ranks).
        agents: number of agents m (mode B); read from ``optimizer.consensus`` when None.
        agent_group: the group of the m agents holding the same shard (mode B); from the consensus when None.
    """

    def __init__(self, optimizer, *, group=None, agents: int | None = None, agent_group=None):
        self.pisa = find_pisa(optimizer)
        topology = self.pisa.consensus
        self.agents = agents or (getattr(topology, "agents", 1) if topology is not None else 1)
        self.agent_group = agent_group if agent_group is not None else getattr(topology, "agent_group", None)
        self.group = group
        self._before: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._bytes_mark = (0.0, 0)  # local steps: (cross-agent bytes sent, calls) at the last measure()

    def _groups_by_param(self) -> dict[int, dict]:
        return {id(p): g for g in self.pisa.param_groups for p in g["params"]}

    def _group_for_label(self, label: str) -> dict | None:
        for g in self.pisa.param_groups:
            if g["preconditioner"] == label:
                return g
        return None

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy this rank's w and π (local shards) for the next ``measure()``; costs one copy of each, once."""
        self._before = {}
        params = {id(p): p for p in self.pisa.state if isinstance(p, Tensor)}
        params.update({id(p): p for g in self.pisa.param_groups for p in g["params"]})  # state not created yet
        for key, p in params.items():
            dual = self.pisa.state[p].get("dual") if p in self.pisa.state else None
            # no dual yet: it starts at 0 in the coming step
            self._before[key] = (_local(p).detach().clone(), None if dual is None else _local(dual).clone())

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """All diagnostics as {tensorboard name: value}; the same on every rank (collective: call on all ranks)."""
        by_param = self._groups_by_param()
        labels: dict[str, dict] = {}
        rows: list[tuple[str, str, Tensor]] = []  # (label, quantity, local sum of squares)
        device = None
        # (with local steps the duals move only at round ends: consensus_gap replaces the per-step spread, which would
        # cost a parameter-sized all-reduce across agents)
        mode_b = self.agents > 1 and self.agent_group is not None and self.pisa._rounds is None
        for p, state in self.pisa.state.items():
            if not isinstance(p, Tensor):
                continue
            label = _label(state, by_param.get(id(p)))
            group = by_param.get(id(p)) or self._group_for_label(label) or {}
            labels.setdefault(label, group)
            w = _local(p)
            device = w.device
            rows.append((label, "numel", torch.tensor(float(w.numel()), dtype=torch.float64)))
            rows.append((label, "param", _sumsq(w)))
            dual = state.get("dual")
            if dual is not None:
                rows.append((label, "dual", _sumsq(_local(dual))))
            before = self._before.get(id(p))
            if before is None:
                continue
            w_old, dual_old = before
            rows.append((label, "update", _sumsq(w - w_old)))
            rows.append((label, "measured", torch.tensor(float(w.numel()), dtype=torch.float64)))
            if dual is not None:
                sigma = self._sigma(group)
                previous = dual_old.float() if dual_old is not None else 0.0
                d = (previous - _local(dual).float()) / sigma
                rows.append((label, "d", _sumsq(d)))
                if mode_b:
                    mean_d = d.clone()
                    torch.distributed.all_reduce(mean_d, group=self.agent_group)
                    mean_d /= self.agents
                    rows.append((label, "spread", _sumsq(d - mean_d)))
        self._before = {}
        rounds = self.pisa._rounds  # local steps: ‖w_i − w‖² and ‖w‖² summed at the round ends since the last call
        if rounds is not None:
            for label, (gap, norm) in sorted(rounds.take_gap_sums().items()):
                rows.append((label, "gap", torch.tensor(gap, dtype=torch.float64)))
                rows.append((label, "gap_norm", torch.tensor(norm, dtype=torch.float64)))
        keys = sorted({(label, q) for label, q, _ in rows})
        index = {k: i for i, k in enumerate(keys)}
        local = torch.zeros(len(keys), dtype=torch.float64)
        for label, q, v in rows:
            local[index[(label, q)]] += v.cpu()
        total = all_reduce_sum(local, self.group, device)
        m = float(self.agents)
        value = {k: total[i].item() / m for k, i in index.items()}  # per-agent mean of each sum
        out: dict[str, float] = {}
        for label, group in sorted(labels.items()):
            n = value.get((label, "numel"), 0.0)
            prefix = f"pisa/{label}"
            out[f"{prefix}/param_norm"] = math.sqrt(value.get((label, "param"), 0.0))
            if (label, "dual") in value:
                out[f"{prefix}/dual_norm"] = math.sqrt(value[(label, "dual")])
                out[f"{prefix}/dual_rms"] = math.sqrt(value[(label, "dual")] / max(n, 1.0))
            if group and group.get("preconditioner") != "adamw" and group.get("lr"):
                sigma, rho = self.pisa.effective_hyperparameters(group)
                out[f"{prefix}/sigma"], out[f"{prefix}/rho"] = sigma, rho
            if (label, "update") in value:
                upd = math.sqrt(value[(label, "update")])
                out[f"{prefix}/update_rms"] = upd / math.sqrt(max(value[(label, "measured")], 1.0))
                if (label, "d") in value:
                    out[f"{prefix}/dual_residual"] = self._sigma(group) * upd
                    out[f"{prefix}/primal_residual"] = math.sqrt(value[(label, "d")])
                if (label, "spread") in value:
                    out[f"{prefix}/consensus_disagreement"] = math.sqrt(value[(label, "spread")])
            if value.get((label, "gap_norm"), 0.0) > 0:
                out[f"{prefix}/consensus_gap"] = math.sqrt(value[(label, "gap")] / value[(label, "gap_norm")])
        if rounds is not None:
            out["pisa/rounds"] = float(self.pisa.rounds_completed)
            calls = max(g["local_calls"] for g in self.pisa.param_groups)
            sent, since = rounds.cross_agent_bytes - self._bytes_mark[0], calls - self._bytes_mark[1]
            if since > 0:
                out["pisa/cross_agent_bytes_per_step"] = sent / since
            self._bytes_mark = (rounds.cross_agent_bytes, calls)
        return out

    def _sigma(self, group: dict) -> float:
        if not group or not group.get("lr"):
            return float(group.get("sigma", 1.0)) if group else 1.0
        return self.pisa.effective_hyperparameters(group)[0]


class TensorBoard:
    """A SummaryWriter that only rank 0 opens; names like ``train/loss`` appear grouped by their prefix."""

    def __init__(self, logdir: str | None, enabled: bool = True):
        self.logdir = logdir
        self.writer = None
        if enabled and logdir:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(log_dir=logdir)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def text(self, name: str, body: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(name, body, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
