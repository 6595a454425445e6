"""H local steps per consensus round (mode B, ALGORITHM.md §6): `PISA(..., consensus=..., local_steps=H)`.

Per agent i, one round from the consensus w (the *anchor*, fixed during the round), with π_i fixed in the round::

    w_i ← w
    repeat H times (t = per-tensor local step counter, continuing across rounds):
        s   = g(w_i)              (nsisa: O = NS5(g + μ b)·scale, b ← μ b + g, whole matrices inside the agent)
        w_i ← w_i (1 − lr·wd),  w ← w (1 − lr·wd)                 decoupled weight decay, when asked [choice]
        h̃  = s + π_i + σ (w_i − w)
        q   = the group's preconditioner built from h̃   (sisa: v ← β₂v + (1−β₂)h̃², q = sqrt(v/(1−β₂ᵗ)) + ε)
        w_i ← w_i − h̃ / (σ + ρ q)
    π_i ← π_i + σ (w_i − w)
    w   ← Σ_i α_i (σ w_i + π_i)/(σ + λ)  =  w + (Σ_i c_i − λ w)/(σ + λ),   c_i = α_i (σ (w_i − w) + π_i)

With H = 1 this is §2's step exactly (w_i = w − d_i, and c_i is today's contribution). The user's loop calls
``step()`` every step; every H-th call closes the round. Between rounds nothing crosses agents: the host shards and
averages gradients inside an agent, the non-finite check is agreed over the agent's own ranks, NSISA routes whole
matrices inside the agent. At the round's end: one control all-reduce over the world (this rank's tokens in the
round → α_i) and the consensus reduce-scatter + all-gather over the agent group — the same collectives as one
mode-B step, once per H steps.

Variants (group options; the defaults are the update above, which is what the tests check against):

- ``prox_sigma=σ_p``: σ_p replaces σ in the proximal term, the dual ascent and the consensus; the step's denominator
  σ + ρq keeps σ (scaled by lr_ref/lr like σ). In steady state a round moves the consensus by about Ō/σ_p, so
  σ_p ≈ σ/H lets a round do the work of H steps.
- ``centred_dual=True``: the consensus is the average of the local points, w ← w + (Σ_i α_i σ_p (w_i − w) − λw)/
  (σ_p + λ), and then π_i ← π_i + σ_p (w_i − w_new), so Σα π = 0 and the duals carry only the drift correction
  (SCAFFOLD's control variate at the same bytes).

Both are ``pisa_zero.reference.ReferencePISA``'s options of the same names.

Auxiliary AdamW groups take plain AdamW steps on the agent's gradient and meet at the round as w ← Σ_i α_i w_i
(moments stay per agent).

State: per tensor ``anchor`` (fp32 w, 4 bytes/param/rank, on ``anchor_device`` — "cpu" keeps it off the
accelerator and streams it through the step a tensor at a time); per group ``local_calls`` (calls taken part in:
position in the round = local_calls % H) and ``round_tokens`` (this rank's tokens in the round's stepped calls). Both
live in the optimizer's state dict, so a checkpoint taken mid-round resumes bit-identically.

Non-finite gradients: a call whose gradients are not finite on some rank of an agent is skipped by that agent only
(its w_i, π_i, v_i and t stay; ``nonfinite_steps_skipped`` counts it) and the round still closes on the H-th call
everywhere. The skipped call's tokens do not count, so the agent's α for the round shrinks in proportion; an agent
that skipped every call of a round contributes c_i = 0 with α_i = 0 (its w_i = w, π_i unchanged). If every agent
skipped every call, the round closes without a consensus (w is unchanged).
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.distributed as dist
from torch import Tensor

from . import functional as F
from ._utils import DTensor, comm_device
from ._utils import local as _local
from .consensus import _flat_views

logger = logging.getLogger(__name__)

ANCHOR_DEVICES = (None, "cpu")


def _sumsq(t: Tensor) -> Tensor:
    return t.double().square().sum()


# -------------------------------------------------------------------------------------------------- kernels
def local_step(
    params: list[Tensor],
    directions: list[Tensor],
    duals: list[Tensor],
    anchors: list[Tensor],
    second_moments: list[Tensor] | None,
    steps: list[int],
    s: F.StepScalars,
    prox_sigma: float,
) -> None:
    """One local step in place on plain tensors: w_i ← w_i − h̃/(σ + ρq), h̃ = s + π + σ_p(w_i − w); π fixed
    (σ_p = σ unless ``prox_sigma`` was asked for).

    ``anchors`` (w) may live on another device (CPU): each is streamed to the parameter's device for its tensor.
    """
    for i, w in enumerate(params):
        anchor = anchors[i]
        if s.decay != 1.0:
            w.mul_(s.decay)
            anchor.mul_(s.decay)
        h = directions[i].float().add(duals[i].float())
        h.add_(w - anchor.to(w.device, non_blocking=True), alpha=prox_sigma)
        if s.preconditioner == "identity":
            d = h.div_(s.sigma + s.rho)
        else:
            if s.preconditioner == "sisa":
                v = second_moments[i].float().mul_(s.beta2).addcmul_(h, h, value=1.0 - s.beta2)
                second_moments[i].copy_(v)
                q = v.div(1.0 - s.beta2 ** steps[i]).sqrt_().add_(s.eps)
            elif s.preconditioner == "adagrad":
                v = second_moments[i].float().addcmul_(h, h)
                second_moments[i].copy_(v)
                q = v.sqrt().add_(s.eps)
            else:  # nsisa
                q = h.abs().add_(s.eps)
            d = h.div_(q.mul_(s.rho).add_(s.sigma))
        w.sub_(d)


# -------------------------------------------------------------------------------------------------- rounds
class LocalRounds:
    """The round bookkeeping and collectives of `PISA` with ``local_steps > 1`` (built by PISA; not user-facing)."""

    def __init__(self, optimizer, local_steps: int, anchor_device: str | None):
        self.opt = optimizer
        self.local_steps = local_steps
        self.anchor_device = None if anchor_device is None else torch.device(anchor_device)
        self.cross_agent_bytes = 0.0  # consensus payload sent by this rank across agents so far (ring count)
        self._gap_sums: dict[str, tuple[Tensor, Tensor]] = {}
        self.swapped = False  # inside consensus_weights()

    @property
    def topology(self):
        return self.opt.consensus

    # ---------------------------------------------------------------------------------------------- state
    def new_anchor(self, p: Tensor) -> Tensor:
        """The anchor w of a parameter: an fp32 copy (a DTensor with the parameter's layout under FSDP2)."""
        local = _local(p).detach().float().clone()
        if self.anchor_device is not None:
            local = local.to(self.anchor_device)
        if isinstance(p, DTensor):
            return DTensor.from_local(
                local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False
            )
        return local

    def check_param(self, p: Tensor) -> None:
        if p.dtype != torch.float32:
            raise ValueError(
                f"PISA: local_steps={self.local_steps} needs fp32 parameters (they hold w_i through the round); got "
                f"{p.dtype} (shape {tuple(p.shape)}). Use FSDP2's MixedPrecisionPolicy(param_dtype=bf16) or "
                "DeepSpeed's bf16, whose fp32 master partitions are what PISA updates."
            )

    # ---------------------------------------------------------------------------------------------- step
    def step(self, active: list[tuple[dict, list[Tensor]]]) -> None:
        """One call: a local step on every active group (skipped inside the agent on non-finite gradients), then
        the round's consensus for the groups whose H-th call this is."""
        if self.swapped:
            raise RuntimeError("PISA.step() inside consensus_weights(): leave the context before stepping")
        opt, topo = self.opt, self.topology
        finite = True
        if opt.skip_nonfinite:
            finite = F.all_finite([_local(p.grad) for _, params in active for p in params])
            if topo.shard_size > 1:  # agreed inside the agent only: its shard ranks step together
                device = comm_device(_local(active[0][1][0]).device, topo.shard_group)
                flag = torch.tensor([1.0 if finite else 0.0], device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=topo.shard_group)
                finite = bool(flag.item() == 1.0)
        count = 1.0 if topo._local_count is None else topo._local_count
        if finite:
            for group, params in active:
                if group["preconditioner"] == "adamw":
                    opt._adamw_group(group, params)
                else:
                    self._local_pisa_group(group, params)
                group["round_tokens"] += count
        else:
            opt.nonfinite_steps_skipped += 1
            logger.warning(
                "PISA: non-finite gradient in agent %d; its local step skipped (%d so far)",
                topo.agent_index,
                opt.nonfinite_steps_skipped,
            )
        closing = []
        for group, _ in active:
            group["local_calls"] += 1
            if group["local_calls"] % self.local_steps == 0:
                closing.append(group)
        if closing:
            self._close_round(closing)

    def _local_pisa_group(self, group: dict, params: list[Tensor]) -> None:
        opt = self.opt
        preconditioner = group["preconditioner"]
        states = [opt._state_for(p, preconditioner) for p in params]
        for p in params:
            self.check_param(p)
        for state in states:
            state["step"] += 1
        steps = [int(state["step"].item()) for state in states]
        directions = opt._directions(group, params, states)
        scalars = opt._step_scalars(group)
        second_moments = [_local(s["second_moment"]) for s in states] if "second_moment" in states[0] else None
        local_step(
            [_local(p) for p in params],
            directions,
            [_local(s["dual"]) for s in states],
            [_local(s["anchor"]) for s in states],
            second_moments,
            steps,
            scalars,
            self.prox_sigma(group),
        )

    def prox_sigma(self, group: dict) -> float:
        """σ_p of the proximal term, dual ascent and consensus: ``prox_sigma`` (or σ), scaled by lr_ref/lr."""
        value = group["prox_sigma"] if group["prox_sigma"] is not None else group["sigma"]
        return value * group["lr_ref"] / group["lr"]

    # ---------------------------------------------------------------------------------------------- round end
    def _close_round(self, groups: list[dict]) -> None:
        topo = self.topology
        tokens = torch.tensor([g.get("round_tokens", 0.0) for g in groups], dtype=torch.float64)
        totals = tokens.clone()
        if topo.agents * topo.shard_size > 1:
            first = next((p for g in groups for p in g["params"]), None)
            device = comm_device(_local(first).device if first is not None else torch.device("cpu"), topo.control_group)
            flat = totals.to(device)
            dist.all_reduce(flat, group=topo.control_group)
            totals = flat.cpu()
        for group, n, total in zip(groups, tokens.tolist(), totals.tolist()):
            group["round_tokens"] = 0.0
            if total == 0:  # every agent skipped every call: w_i = w everywhere, nothing to agree on
                continue
            alpha = n * topo.shard_size / total
            topo.alpha = alpha
            params = [p for p in group["params"] if p in self.opt.state and "anchor" in self.opt.state[p]]
            if params:
                self._consensus(group, params, alpha)

    def _consensus(self, group: dict, params: list[Tensor], alpha: float) -> None:
        topo, opt = self.topology, self.opt
        states = [opt.state[p] for p in params]
        pisa = group["preconditioner"] != "adamw"
        if pisa:
            sigma, lam, centred = self.prox_sigma(group), group["l2_lambda"], group["centred_dual"]
        gap = torch.zeros((), dtype=torch.float64)
        norm = torch.zeros((), dtype=torch.float64)
        m = topo.agents
        for bucket in topo._buckets(params):
            ws = [_local(params[i]) for i in bucket]
            anchors = [_local(states[i]["anchor"]) for i in bucket]
            if sum(w.numel() for w in ws) == 0:
                continue
            buf, offsets, views = _flat_views(ws, m)
            for j, (w, a, view) in enumerate(zip(ws, anchors, views)):
                if pisa and centred:  # c = α σ (w_i − w); π is updated against the new w below
                    view.copy_(w - a.to(w.device)).mul_(sigma * alpha)
                elif pisa:  # π ← π + σ (w_i − w);  c = α (σ (w_i − w) + π)
                    dual = _local(states[bucket[j]]["dual"])
                    delta = w - a.to(w.device)
                    dual_f = dual.float().add_(delta, alpha=sigma)
                    dual.copy_(dual_f)
                    view.copy_(delta.mul_(sigma).add_(dual_f).mul_(alpha))
                else:  # AdamW: w ← Σ α_i w_i
                    view.copy_(w).mul_(alpha)
            s = buf.numel() // m

            def owner(summed: Tensor, start: int, ws=ws, anchors=anchors, offsets=offsets, s=s) -> None:
                if not pisa:
                    return
                # the owner's slice of the anchor w (the same bits on every agent): w ← w + (Σc − λw)/(σ + λ)
                w_slice = torch.zeros_like(summed)
                for o, a in zip(offsets, anchors):
                    lo, hi = max(o, start), min(o + a.numel(), start + s)
                    if lo < hi:
                        w_slice[lo - start : hi - start] = a.reshape(-1)[lo - o : hi - o].to(summed.device)
                F.apply_consensus([w_slice], [summed], sigma, lam)
                summed.copy_(w_slice)

            topo._sum_across_agents(buf, owner)
            if m > 1:
                self.cross_agent_bytes += 2 * (m - 1) / m * buf.numel() * buf.element_size()
            for j, (w, a, view) in enumerate(zip(ws, anchors, views)):
                if pisa and centred:  # π ← π + σ (w_i − w_new): the duals keep only the drift correction
                    dual = _local(states[bucket[j]]["dual"])
                    dual.copy_(dual.float().add_(w - view, alpha=sigma))
                gap += _sumsq(w - view)
                norm += _sumsq(view)
                w.copy_(view)
                a.copy_(view)
        label = group["preconditioner"]
        old = self._gap_sums.get(label)
        self._gap_sums[label] = (gap, norm) if old is None else (old[0] + gap, old[1] + norm)

    def take_gap_sums(self) -> dict[str, tuple[float, float]]:
        """{group label: (Σ‖w_i − w‖², Σ‖w‖²)} over this rank's tensors at the round ends since the last call (then
        cleared): `pisa_zero.monitor` sums them over ranks for ``pisa/<group>/consensus_gap``."""
        out = {k: (g.item(), n.item()) for k, (g, n) in self._gap_sums.items()}
        self._gap_sums = {}
        return out

    # ---------------------------------------------------------------------------------------------- evaluation
    @contextlib.contextmanager
    def consensus_weights(self):
        """Parameters hold the anchor w (the last consensus) inside; w_i is kept in the state as ``local_weights``
        and put back on exit (the exit re-reads the state, so a checkpoint loaded inside is restored correctly)."""
        if self.swapped:
            raise RuntimeError("consensus_weights() is not re-entrant")
        self._swap("anchor", "local_weights")
        self.swapped = True
        try:
            yield
        finally:
            self.swapped = False
            self._swap("local_weights", "anchor")

    @torch.no_grad()
    def _swap(self, key: str, new_key: str) -> None:
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state.get(p)
                if not state or key not in state:
                    continue
                other = state.pop(key)
                w, o = _local(p), _local(other)
                held = w.clone()
                w.copy_(o)
                o.copy_(held)
                state[new_key] = other

    @torch.no_grad()
    def restore_after_load(self) -> None:
        """After a checkpoint load (params = the saved consensus w): anchor ← w, and w_i back into the params."""
        for group in self.opt.param_groups:
            for p in group["params"]:
                state = self.opt.state.get(p)
                if not state:
                    continue
                state["anchor"] = self.new_anchor(p)
                held = state.pop("local_weights", None)
                if held is not None:
                    _local(p).copy_(_local(held).to(_local(p).device))
