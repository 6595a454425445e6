"""`PISA`: the torch.optim.Optimizer. Param groups, lazy per-tensor state, the lr → σ, ρ rule.

The arithmetic lives in `pisa_zero.functional`; distribution across agents in `pisa_zero.consensus`; the checks
of every hyper-parameter in `pisa_zero.hyperparameters`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.optim.adamw import adamw as torch_adamw

from . import functional as F
from ._utils import comm_device, compiled_available, dist_on
from ._utils import local as _local
from .consensus import control_all_reduce
from .hyperparameters import BOOKKEEPING_KEYS, HyperparameterError, check_group_keys, validate_group
from .local_steps import ANCHOR_DEVICES as LOCAL_ANCHOR_DEVICES
from .local_steps import LocalRounds
from .orthogonalizer import default_orthogonalizer

logger = logging.getLogger(__name__)


class PISA(torch.optim.Optimizer):
    r"""Preconditioned Inexact Stochastic ADMM (Zhou et al., arXiv 2502.10784).

    For every tensor, at the consensus point :math:`w` (the parameter, fp32 master), with gradient :math:`g`,
    dual :math:`\pi` and step :math:`t` (all state starts at 0)::

        w ← w (1 − lr·weight_decay)                               (decoupled weight decay, optional)
        h = g + π                                                 (sisa / adagrad / identity)
        h = O + π,  O = NS5(g + μ b) · sqrt(max(1, rows/cols)),   b ← μ b + g        (nsisa, 2-D tensors)
        q = sqrt(v / (1 − β₂ᵗ)) + ε,  v ← β₂ v + (1 − β₂) h²      (sisa)
        q = sqrt(v) + ε,              v ← v + h²                  (adagrad)
        q = |h| + ε                                               (nsisa)
        q = 1                                                     (identity)
        d = h / (σ + ρ q)                                         (inexact local step: w_i = w − d)
        π ← π − σ d                                               (dual ascent)
        w ← (σ w + π − σ d) / (σ + λ)                             (consensus, m = 1)

    With ``consensus=`` (agents, mode B) every agent contributes :math:`c_i = α_i(π_i − σ d_i)` and
    :math:`w ← (σ w + Σ_i c_i)/(σ + λ)`; see `pisa_zero.consensus`.

    Learning rate: σ and ρ are given for the reference lr ``lr_ref`` (``lr``, or ``1/(σ+ρ)`` when ``lr=None``).
    When a scheduler sets ``group['lr']`` to ``lr_t`` both are scaled by ``lr_ref/lr_t``; ``lr_t = 0`` leaves the
    parameters and every state tensor untouched and does not advance the step counters.

    A group with ``preconditioner="adamw"`` is updated by torch's own functional AdamW (``lr``, ``betas``, ``eps``,
    ``weight_decay``; state ``exp_avg``, ``exp_avg_sq``; fused where the device has the kernel): the auxiliary
    optimizer for embeddings, norms and biases that NSISA needs, carried in the same optimizer object, state dict and
    checkpoint.

    Non-finite gradients: with ``skip_nonfinite=True`` (default) each ``step()`` call first checks the gradients it
    was handed, once (one read of each, one host sync); if any is inf/NaN the call changes nothing (no parameter,
    state or step counter) and ``nonfinite_steps_skipped`` is incremented. With a topology (``consensus=``, and
    always under `pisa_zero.integrations.fsdp`) the flag rides on the step's one control all-reduce, so every rank
    skips together; without one the decision is the rank's own, which is enough where gradients are replicated (one
    process, DDP). Loops that shard gradients without a topology call :func:`pisa_zero.grads_are_finite` instead.
    The check cannot share the kernel's pass over the gradients: a skip must be decided before the first tensor is
    written, and the kernel writes each tensor as it reads its gradient.

    Args:
        params: parameters or param groups.
        sigma: σ > 0, the ADMM penalty (at the reference lr).
        rho: ρ ≥ 0, the preconditioner weight (at the reference lr).
        lr: reference learning rate; ``None`` means ``1/(σ+ρ)``. Required for ``adamw`` groups.
        preconditioner: "sisa", "adagrad", "identity", "nsisa" or "adamw" (per group).
        beta2: β₂ ∈ [0, 1) of sisa's second moment.
        momentum: μ ∈ [0, 1) of nsisa's momentum.
        nesterov: nsisa uses g + μ b (True) or b (False).
        eps: ε > 0 inside the preconditioner (multiplied by ρ).
        l2_lambda: λ ≥ 0, the server-side ℓ2 term of the consensus.
        weight_decay: decoupled weight decay (w ← w (1 − lr·wd) before the step).
        ns_steps: Newton–Schulz iterations (nsisa).
        ns_dtype: precision of the Newton–Schulz matmuls (nsisa): "auto" (bf16 on accelerators and on CPUs with
            AVX512-BF16/AMX, as Muon; fp32 elsewhere; ``PISA_ZERO_CPU_FAST_BF16=0|1`` overrides the CPU's flags),
            "float32" or "bfloat16". The momentum, the normalisation and everything after O stay fp32 (fp64 tensors
            use fp64 throughout).
        implementation: "single", "foreach", "compiled", or None for the fastest that works on the device.
        state_dtype: dtype of π, v and b (fp32 default, fp64 for fp64 parameters; bf16 halves their memory at the
            cost of rounding). The arithmetic is fp32, or fp64 for fp64 parameters.
        betas: (β₁, β₂) of ``adamw`` groups.
        skip_nonfinite: skip a call whose gradients contain inf/NaN (see above).
        consensus: a `pisa_zero.consensus.AgentTopology` or a ProcessGroup (every rank one agent) for mode B;
            None for mode A (host-averaged gradients).
        orthogonalizer: how nsisa gets O for whole matrices (`pisa_zero.orthogonalizer`); None: DTensor-routed
            when a parameter is a DTensor (FSDP2), else local. Host integrations pass theirs (DeepSpeed ZeRO).
        local_steps: H ≥ 1 (mode B): agents take H local steps per consensus round; ``step()`` is still called
            every step and every H-th call closes the round (`pisa_zero.local_steps`, ALGORITHM.md §6). 1 (default)
            is the step above.
        anchor_device: where the round's anchor w lives when H > 1: None (beside the parameter) or "cpu".
        prox_sigma: H > 1: σ_p of the proximal term, dual ascent and consensus (None: σ); per group.
        centred_dual: H > 1: consensus = average of the local points, duals keep only the drift correction.
    """

    def __init__(
        self,
        params: Iterable,
        sigma: float = 1.0,
        rho: float = 1000.0,
        *,
        lr: float | None = None,
        preconditioner: str = "sisa",
        beta2: float = 0.999,
        momentum: float = 0.95,
        nesterov: bool = True,
        eps: float = 1e-8,
        l2_lambda: float = 0.0,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: str = "auto",
        implementation: str | None = None,
        state_dtype: torch.dtype | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        skip_nonfinite: bool = True,
        consensus=None,
        local_steps: int = 1,
        anchor_device: str | None = None,
        prox_sigma: float | None = None,
        centred_dual: bool = False,
        orthogonalizer=None,
    ):
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            raise HyperparameterError("local_steps", local_steps, "an integer >= 1")
        if local_steps > 1 and consensus is None:
            raise ValueError(f"PISA: local_steps={local_steps} needs agents (mode B): pass consensus=")
        if anchor_device not in LOCAL_ANCHOR_DEVICES:
            raise HyperparameterError("anchor_device", anchor_device, f"one of {LOCAL_ANCHOR_DEVICES}")
        if implementation is not None and implementation not in F.IMPLEMENTATIONS:
            raise HyperparameterError("implementation", implementation, f"one of {F.IMPLEMENTATIONS}")
        if state_dtype is not None and state_dtype not in (torch.float32, torch.bfloat16):
            raise HyperparameterError("state_dtype", state_dtype, "torch.float32 or torch.bfloat16")
        defaults = dict(
            sigma=sigma,
            rho=rho,
            lr=lr,
            preconditioner=preconditioner,
            beta2=beta2,
            momentum=momentum,
            nesterov=nesterov,
            eps=eps,
            l2_lambda=l2_lambda,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            betas=betas,
        )
        if local_steps > 1:  # round variants (pisa_zero.local_steps); with H = 1 there is no round to vary
            defaults.update(prox_sigma=prox_sigma, centred_dual=centred_dual)
        elif prox_sigma is not None or centred_dual:
            raise ValueError("PISA: prox_sigma / centred_dual change the local-step round: they need local_steps > 1")
        self.implementation = implementation
        self.state_dtype = state_dtype or torch.float32
        self.skip_nonfinite = skip_nonfinite
        if consensus is not None and not hasattr(consensus, "begin_step"):  # a ProcessGroup: one agent per rank
            from .consensus import AgentTopology

            consensus = AgentTopology.from_group(consensus)
        self.consensus = consensus
        self.local_steps = local_steps
        self._rounds = LocalRounds(self, local_steps, anchor_device) if local_steps > 1 else None
        self.nonfinite_steps_skipped = 0
        self.extra_totals: list[float] = []  # see step(extra=...)
        self._known_params: set[int] = set()
        super().__init__(params, defaults)
        self._orthogonalizer = orthogonalizer or default_orthogonalizer(self.param_groups, self._known_params)

    # ----------------------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        where = f" in param group {len(self.param_groups)}"
        check_group_keys(param_group, {*self.defaults, *BOOKKEEPING_KEYS}, where)
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):  # torch only warns; PISA would step such a tensor twice
            raise ValueError(f"PISA: a parameter appears twice{where} (a tied weight is one parameter: list it once)")
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        validate_group(group, where)
        if group["lr"] is None:
            group["lr"] = 1.0 / (group["sigma"] + group["rho"])
        group.setdefault("lr_ref", group["lr"])
        if self._rounds is not None:  # the position in the round, saved with the param groups
            group.setdefault("local_calls", 0)
            group.setdefault("round_tokens", 0.0)
        self._known_params.update(id(p) for p in group["params"])

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._known_params.update(id(p) for p in group["params"])

    def consensus_weights(self):
        """Context manager: inside it the parameters hold the consensus w (for evaluation and export) without
        breaking a local-step round; w_i is put back on exit. With ``local_steps=1`` the parameters are w already."""
        return contextlib.nullcontext() if self._rounds is None else self._rounds.consensus_weights()

    @property
    def round_position(self) -> int:
        """Calls already taken in the current round (0 … H−1); always 0 with ``local_steps=1``."""
        return self.rounds_and_position()[1]

    @property
    def rounds_completed(self) -> int:
        """Consensus rounds completed with ``local_steps > 1`` (0 with ``local_steps=1``, which keeps no count)."""
        return self.rounds_and_position()[0]

    def rounds_and_position(self) -> tuple[int, int]:
        calls = max((g.get("local_calls", 0) for g in self.param_groups), default=0)
        return divmod(calls, self.local_steps)

    def set_local_batch_size(self, n: float) -> None:
        """Mode B: this rank's sample/token count, from which the agent weights α are computed (see
        `pisa_zero.consensus.AgentTopology.set_local_batch_size`). Ignored in mode A."""
        if self.consensus is not None:
            self.consensus.set_local_batch_size(n)

    # ------------------------------------------------------------------------------------------------ state
    def _state_for(self, p: Tensor, preconditioner: str) -> dict:
        """Lazy per-tensor state, created as zeros_like(p) (flat ZeRO partitions and DTensors included)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if preconditioner == "adamw":
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            else:
                # never narrower than the arithmetic: fp64 parameters keep fp64 state unless bf16 was asked for
                dtype = F.arithmetic_dtype(p) if self.state_dtype == torch.float32 else self.state_dtype
                state["dual"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
                if preconditioner in ("sisa", "adagrad"):
                    state["second_moment"] = torch.zeros_like(p, dtype=dtype)
                elif preconditioner == "nsisa":
                    state["momentum"] = torch.zeros_like(p, dtype=dtype)
            if self._rounds is not None:
                state["anchor"] = self._rounds.new_anchor(p)
        return state

    @torch.no_grad()
    def init_state(self) -> None:
        """Create every state tensor now (zeros, step 0) without touching parameters: for hosts that need state
        to exist before the first step (checkpoint loading, torchtitan's ``init_optim_state``)."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_for(p, group["preconditioner"])

    def _pick_implementation(self, params: list[Tensor]) -> str:
        if self.implementation is not None:
            return self.implementation
        return "compiled" if compiled_available(params[0].device) else "foreach"

    # ------------------------------------------------------------------------------------------------- step
    def effective_hyperparameters(self, group: dict) -> tuple[float, float]:
        """(σ, ρ) in effect at the group's current lr: both scale by lr_ref / lr."""
        scale = group["lr_ref"] / group["lr"]
        return group["sigma"] * scale, group["rho"] * scale

    @torch.no_grad()
    def step(self, closure=None, *, extra=None, veto=False, grad_norm=None):
        """One step. A training loop may hand this rank's ``extra`` floats or 1-D tensor (a loss, a stop request)
        to the step's control all-reduce and read their sums over the topology's ranks from ``extra_totals``
        afterwards (without a topology they come back as given); ``veto`` (a bool or a 0-d tensor, e.g. a non-finite
        loss) skips the step on every rank. ``grad_norm``: the gradients' total norm over every rank that holds
        them, already computed (``clip_grad_norm_``'s return): a non-finite norm skips the step and the separate
        finite check (a second read of every gradient) is not made; an inf/NaN in any gradient makes the norm
        inf/NaN, so the decisions are the same. Not with ``local_steps > 1``, whose skip is decided inside the
        agent."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):  # a scheduler or a user may have written any of them
            validate_group(group, f" in param group {i} at step()")
        active = [
            (group, [p for p in group["params"] if p.grad is not None])
            for group in self.param_groups
            if group["lr"] != 0
        ]
        active = [(group, params) for group, params in active if params]
        if grad_norm is not None and not self.skip_nonfinite:
            raise ValueError("PISA: step(grad_norm=) decides the non-finite skip, but skip_nonfinite=False")
        if not active and extra is None and veto is False and grad_norm is None:
            return loss
        if self._rounds is not None:  # H local steps per round (pisa_zero.local_steps)
            if extra is not None or veto is not False or grad_norm is not None:
                raise ValueError(
                    "PISA: step(extra=, veto=, grad_norm=) needs local_steps=1 (the round decides inside the agent)"
                )
            self._rounds.step(active)
            return loss
        # The step's one finite check (one read of the gradients, or the host's norm; one host sync) and, with a
        # topology, its one control all-reduce, which also agrees α: every rank skips or none does.
        grads = [_local(p.grad) for _, params in active for p in params]
        check_grads = self.skip_nonfinite and grad_norm is None
        if grad_norm is not None:
            norm = torch.as_tensor(grad_norm).reshape(())  # stays on its device: the one host sync comes below
            veto = torch.as_tensor(veto, device=norm.device).reshape(()) | ~torch.isfinite(norm)
        if self.consensus is not None:
            go = self.consensus.begin_step(grads, check_grads, () if extra is None else extra, veto)
            self.extra_totals = self.consensus.extra_totals
        elif extra is None and veto is False:
            go = not check_grads or F.all_finite(grads)
        else:  # the same vector as the topology's, read back without a collective
            device = grads[0].device if grads else torch.device("cpu")
            totals = control_all_reduce(
                grads, check_grads, 1.0, () if extra is None else extra, veto, device, None, False
            )
            go, self.extra_totals = math.isfinite(totals[0]), totals[1:]
        if not go:
            self.nonfinite_steps_skipped += 1
            logger.warning("PISA: non-finite loss or gradient; step skipped (%d so far)", self.nonfinite_steps_skipped)
            return loss
        for group, params in active:
            if group["preconditioner"] == "adamw":
                self._adamw_group(group, params)
            else:
                self._pisa_group(group, params)
        return loss

    def _pisa_group(self, group: dict, params: list[Tensor]) -> None:
        preconditioner = group["preconditioner"]
        states = [self._state_for(p, preconditioner) for p in params]
        local_params = [_local(p) for p in params]
        implementation = self._pick_implementation(local_params)
        # compiled kernels read t on the device (no host sync); single/foreach read it on the host
        on_device = implementation == "compiled" and local_params[0].device.type != "cpu"
        steps = _step_counters(states, local_params[0].device if on_device else torch.device("cpu"))
        torch._foreach_add_(steps, 1)
        directions = self._directions(group, params, states)
        scalars = self._step_scalars(group)
        duals = [_local(s["dual"]) for s in states]
        second_moments = [_local(s["second_moment"]) for s in states] if "second_moment" in states[0] else None
        if self.consensus is None:
            F.pisa_step(local_params, directions, duals, second_moments, steps, scalars, implementation=implementation)
        else:
            self.consensus.step(local_params, directions, duals, second_moments, steps, scalars, implementation)

    def _step_scalars(self, group: dict) -> F.StepScalars:
        """The group's scalars for the elementwise step, at its current lr."""
        sigma, rho = self.effective_hyperparameters(group)
        return F.StepScalars(
            preconditioner=group["preconditioner"],
            sigma=sigma,
            rho=rho,
            beta2=group["beta2"],
            eps=group["eps"],
            l2_lambda=group["l2_lambda"],
            decay=1.0 - group["lr"] * group["weight_decay"],
        )

    def _directions(self, group: dict, params: list[Tensor], states: list[dict]) -> list[Tensor]:
        """What the elementwise step preconditions: O (nsisa) or the local gradient."""
        if group["preconditioner"] == "nsisa":
            return self._nsisa_directions(group, params, states)
        return [_local(p.grad) for p in params]

    def _nsisa_directions(self, group: dict, params: list[Tensor], states: list[dict]) -> list[Tensor]:
        """O = NS5(g + μ b)·scale for whole matrices, u itself for other tensors; momentum b updated in place."""
        grads, momenta = [_local(p.grad) for p in params], [_local(s["momentum"]) for s in states]
        us = F.nesterov_momentum(grads, momenta, group["momentum"], group["nesterov"])
        compute_dtype = F.ns_compute_dtype(us[0].device, us[0].dtype, group.get("ns_dtype", "auto"))
        return self._orthogonalizer(params, us, group["ns_steps"], compute_dtype)

    def _adamw_group(self, group: dict, params: list[Tensor]) -> None:
        """torch's own functional AdamW (fused where the device has the kernel, else foreach; ``single``: the
        per-tensor loop) on the local tensors, with this optimizer's state keys."""
        beta1, beta2 = group["betas"]
        if self.consensus is not None and self._rounds is None:  # mode B: AdamW on the α-averaged gradient
            self.consensus.reduce_gradients([_local(p.grad) for p in params])
        states = [self._state_for(p, "adamw") for p in params]
        local_params = [_local(p) for p in params]
        implementation = self._pick_implementation(local_params)
        fused = implementation == "compiled" and _fused_adamw_available(local_params)
        torch_adamw(
            local_params,
            [_local(p.grad) for p in params],
            [_local(s["exp_avg"]) for s in states],
            [_local(s["exp_avg_sq"]) for s in states],
            [],
            _step_counters(states, local_params[0].device if fused else torch.device("cpu")),
            foreach=implementation != "single" and not fused,
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _step_counters(states: list[dict], device: torch.device) -> list[Tensor]:
    """The 0-d ``step`` tensors, moved once to where the kernel reads them (e.g. after loading a checkpoint)."""
    for state in states:
        if state["step"].device != device:
            state["step"] = state["step"].to(device)
    return [state["step"] for state in states]


def _fused_adamw_available(params: list[Tensor]) -> bool:
    """torch's fused AdamW kernel: floating-point tensors on a device that has it (CPU and CUDA in torch 2.x)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    devices = _get_fused_kernels_supported_devices()
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def grads_are_finite(params: Iterable[Tensor], group=None) -> bool:
    """True when every gradient on every rank of ``group`` is finite (one all-reduce and one host sync when
    distributed).

    For training loops around *other* optimizers, or around PISA built with ``skip_nonfinite=False``: `PISA.step`
    makes this check itself, once, agreed across ranks whenever it has a topology (FSDP2, mode B).
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not dist_on():
        return F.all_finite(grads)
    device = comm_device(grads[0].device if grads else torch.device("cpu"), group)
    flag = F.finite_flag(grads).to(device, torch.float32) if grads else torch.ones((), device=device)
    flag = flag.reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
    return bool(flag.item() == 1.0)
