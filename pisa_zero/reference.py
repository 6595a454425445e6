"""A slow, plain PISA in the paper's notation, with m agents simulated in one process.

Used only by tests and benchmarks: every fast path (`PISA`, the consensus collectives, the host integrations) is
compared with it. Written from ALGORITHM.md §2–3 and §6 line by line, in float64 by default, with no shared code
from `pisa_zero.functional` so that a mistake there cannot hide here.

One round of H local steps (``local_steps=H``; H = 1 is §2, one consensus per step), from the consensus w (the
anchor, fixed during the round):

    every agent i:   w_i = w
      H times:       s   = ∇F_i(w_i)                       (at agent i's LOCAL point)
                           nsisa: b_i ← μ b_i + s;  s ← NS5(s + μ b_i)·sqrt(max(1, rows/cols))  (2-D tensors)
                     h   = s + π_i + σ (w_i − w)
                     q   from h: sqrt(v̂_i) + ε (sisa), sqrt(v_i) + ε (adagrad), |h| + ε (nsisa), 1 (identity)
                     w_i = w_i − h / (σ + ρ q)
                     π_i fixed during the round
      round end:     π_i = π_i + σ (w_i − w)
    consensus:       w = Σ_i α_i (σ w_i + π_i) / (σ + λ)

At H = 1 the proximal term is zero and this is the §2 step: w_i = w − d_i, π_i − σ d_i.

Rules the update leaves open (ALGORITHM.md §6), agreed with `PISA(..., local_steps=H)`:
- A step at lr uses σ, ρ scaled by lr_ref/lr; the round's dual ascent and consensus use σ of its last step.
  lr = 0 is a no-op (no state, counter or round position changes).
- Decoupled weight decay shrinks w_i and the anchor w by (1 − lr·wd) before every local step (adamw tensors: by
  1 − lr_adamw·wd, lr_adamw = adamw_lr·lr/lr_ref).
- α_i is agent i's ``alphas`` summed over the round's steps, normalised at the consensus.
- ``"adamw"`` tensors (the auxiliary optimizer): at H = 1, AdamW on the α-averaged gradient (mode B today); at
  H > 1, every agent runs AdamW from its own gradients and moments, and the round averages the weights (Σ α_i w_i).

Variants of the round (item 6 of the local-steps issue), each off by default so that the defaults are the update
above:
- ``prox_sigma=σ_p``: σ_p replaces σ in the proximal term, the dual ascent and the consensus; the step's denominator
  σ + ρq keeps σ. The consensus moves by about Ō/σ_p per round in steady state, so σ_p ≈ σ/H lets a round do the
  work of H steps while each step keeps its size.
- ``dual_damping=True``: the authors' damped dual, π_i ← α_i π_i after the round's dual ascent.
- ``outer_lr``, ``outer_momentum``: a Nesterov outer step on the consensus displacement Δ = w_new − w (DiLoCo's
  outer optimizer): M ← μ M + Δ;  w ← w + lr_o (Δ + μ M).
- ``centred_dual=True``: the duals keep only their drift-correcting part. The consensus is the average of the
  local points, w ← σ_p Σ_i α_i w_i / (σ_p + λ), and then π_i ← π_i + σ_p (w_i − w) with the NEW w, so that
  Σ_i α_i π_i stays 0 (λ = 0): π_i → −(s_i − Σ_j α_j s_j), the correction of SCAFFOLD, while the mean motion is
  the agents' H sequential steps (FedAvg's) instead of the ADMM consensus's one step of Ō/σ_p per round.
  Same bytes (one all-reduce of w_i per round). Not the §2 step at H = 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

KINDS = ("sisa", "adagrad", "identity", "nsisa", "adamw")


def newton_schulz5(u: Tensor, steps: int = 5) -> Tensor:
    """Muon's quintic Newton–Schulz iteration, written out for one matrix."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = u.clone()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (torch.linalg.matrix_norm(x) + 1e-7)
    for _ in range(steps):
        a_mat = x @ x.T
        b_mat = b * a_mat + c * a_mat @ a_mat
        x = a * x + b_mat @ x
    if tall:
        x = x.T
    return x * math.sqrt(max(1.0, u.shape[0] / u.shape[1]))


class ReferencePISA:
    """m agents, each with its own local point w_i and π_i, v_i, b_i, sharing one consensus w (a list of tensors).

    ``step(grad_fns, alphas, lr)`` is one optimizer step of every agent (call it every step, as ``PISA.step()``):
    ``grad_fns[i](w_i)`` returns agent i's gradients at a copy of its local point (a list like ``w``); ``alphas`` are
    the agents' weights for this step. Every ``local_steps``-th call ends the round with the consensus.
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        agents: int = 1,
        *,
        sigma: float = 1.0,
        rho: float = 1000.0,
        preconditioner: str | Sequence[str] = "sisa",
        beta2: float = 0.999,
        momentum: float = 0.95,
        nesterov: bool = True,
        eps: float = 1e-8,
        l2_lambda: float = 0.0,
        weight_decay: float = 0.0,
        lr: float | None = None,
        ns_steps: int = 5,
        adamw_lr: float | None = None,
        betas: tuple[float, float] = (0.9, 0.95),
        local_steps: int = 1,
        prox_sigma: float | None = None,
        dual_damping: bool = False,
        outer_lr: float = 1.0,
        outer_momentum: float = 0.0,
        centred_dual: bool = False,
        dtype: torch.dtype = torch.float64,
    ):
        self.w = [t.detach().to(dtype).clone() for t in weights]
        self.m = agents
        if isinstance(preconditioner, str):
            preconditioner = [preconditioner] * len(self.w)
        self.preconditioner = list(preconditioner)
        unknown = sorted(set(self.preconditioner) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown preconditioner {unknown[0]!r}: expected one of {KINDS}")
        if "adamw" in self.preconditioner and adamw_lr is None:
            raise ValueError("adamw tensors need adamw_lr")
        if not (isinstance(local_steps, int) and local_steps >= 1):
            raise ValueError(f"invalid local_steps={local_steps!r}: expected an integer >= 1")
        self.sigma0, self.rho0 = sigma, rho
        self.prox_sigma0 = sigma if prox_sigma is None else prox_sigma
        self.lr_ref = lr if lr is not None else 1.0 / (sigma + rho)
        self.beta2, self.mu, self.nesterov, self.eps = beta2, momentum, nesterov, eps
        self.lam, self.wd, self.ns_steps = l2_lambda, weight_decay, ns_steps
        self.adamw_lr, self.betas = adamw_lr, betas
        self.H, self.dual_damping = local_steps, dual_damping
        self.outer_lr, self.outer_mu = outer_lr, outer_momentum
        self.centred_dual = centred_dual
        zeros = lambda: [torch.zeros_like(t) for t in self.w]  # noqa: E731
        self.local = [[t.clone() for t in self.w] for _ in range(agents)]
        self.pi = [zeros() for _ in range(agents)]
        self.v = [zeros() for _ in range(agents)]
        self.b = [zeros() for _ in range(agents)]  # nsisa momentum; AdamW's first moment for adamw tensors
        self.outer_m = zeros()
        self.t = 0
        self.round_position = 0
        self.round_alphas = [0.0] * agents

    def step(self, grad_fns: Sequence[Callable], alphas: Sequence[float] | None = None, lr: float | None = None):
        lr = self.lr_ref if lr is None else lr
        if lr == 0:
            return
        self.t += 1
        sigma = self.sigma0 * self.lr_ref / lr
        rho = self.rho0 * self.lr_ref / lr
        sigma_p = self.prox_sigma0 * self.lr_ref / lr
        alphas = [1.0] * self.m if alphas is None else list(alphas)
        self.round_alphas = [r + a for r, a in zip(self.round_alphas, alphas)]
        grads = [
            [g.detach().to(self.w[0].dtype) for g in fn([t.clone() for t in self.local[i]])]
            for i, fn in enumerate(grad_fns)
        ]
        if self.H == 1 and "adamw" in self.preconditioner:  # mode B today: AdamW on the α-averaged gradient
            weights = [a / sum(alphas) for a in alphas]
            for k, kind in enumerate(self.preconditioner):
                if kind == "adamw":
                    mean = sum(weights[i] * grads[i][k] for i in range(self.m))
                    for i in range(self.m):
                        grads[i][k] = mean
        adamw_lr = None if self.adamw_lr is None else self.adamw_lr * lr / self.lr_ref
        decays = [1 - (adamw_lr if kind == "adamw" else lr) * self.wd for kind in self.preconditioner]
        self.w = [t * decay for t, decay in zip(self.w, decays)]
        for i in range(self.m):
            for k, kind in enumerate(self.preconditioner):
                w_i = self.local[i][k] * decays[k]
                if kind == "adamw":
                    self.local[i][k] = self._adamw_step(i, k, w_i, grads[i][k], adamw_lr)
                else:
                    h = self._direction(i, k, grads[i][k]) + self.pi[i][k] + sigma_p * (w_i - self.w[k])
                    self.local[i][k] = w_i - h / (sigma + rho * self._q(i, k, h))
        self.round_position += 1
        if self.round_position == self.H:
            self._consensus(sigma_p)

    def _direction(self, i: int, k: int, g: Tensor) -> Tensor:
        """s: the gradient, or for nsisa the orthogonalised Nesterov momentum (matrices; other shapes pass u)."""
        if self.preconditioner[k] != "nsisa":
            return g
        self.b[i][k] = self.mu * self.b[i][k] + g
        u = g + self.mu * self.b[i][k] if self.nesterov else self.b[i][k]
        return newton_schulz5(u, self.ns_steps) if u.ndim == 2 else u

    def _q(self, i: int, k: int, h: Tensor) -> Tensor:
        kind = self.preconditioner[k]
        if kind == "sisa":
            self.v[i][k] = self.beta2 * self.v[i][k] + (1 - self.beta2) * h**2
            return torch.sqrt(self.v[i][k] / (1 - self.beta2**self.t)) + self.eps
        if kind == "adagrad":
            self.v[i][k] = self.v[i][k] + h**2
            return torch.sqrt(self.v[i][k]) + self.eps
        if kind == "nsisa":
            return h.abs() + self.eps
        return torch.ones_like(h)  # identity

    def _adamw_step(self, i: int, k: int, w: Tensor, g: Tensor, lr: float) -> Tensor:
        beta1, beta2 = self.betas
        self.b[i][k] = beta1 * self.b[i][k] + (1 - beta1) * g
        self.v[i][k] = beta2 * self.v[i][k] + (1 - beta2) * g**2
        m_hat = self.b[i][k] / (1 - beta1**self.t)
        v_hat = self.v[i][k] / (1 - beta2**self.t)
        return w - lr * m_hat / (torch.sqrt(v_hat) + self.eps)

    def _consensus(self, sigma_p: float) -> None:
        alphas = [a / sum(self.round_alphas) for a in self.round_alphas]
        new_w = []
        for k, kind in enumerate(self.preconditioner):
            total = torch.zeros_like(self.w[k])
            for i in range(self.m):
                if kind == "adamw":
                    total += alphas[i] * self.local[i][k]
                    continue
                if self.centred_dual:
                    total += alphas[i] * sigma_p * self.local[i][k]
                    continue
                self.pi[i][k] = self.pi[i][k] + sigma_p * (self.local[i][k] - self.w[k])
                total += alphas[i] * (sigma_p * self.local[i][k] + self.pi[i][k])
                if self.dual_damping:
                    self.pi[i][k] = alphas[i] * self.pi[i][k]
            new_w.append(total if kind == "adamw" else total / (sigma_p + self.lam))
            if self.centred_dual and kind != "adamw":
                for i in range(self.m):
                    self.pi[i][k] = self.pi[i][k] + sigma_p * (self.local[i][k] - new_w[k])
        if self.outer_lr != 1.0 or self.outer_mu != 0.0:
            for k, target in enumerate(new_w):
                delta = target - self.w[k]
                self.outer_m[k] = self.outer_mu * self.outer_m[k] + delta
                new_w[k] = self.w[k] + self.outer_lr * (delta + self.outer_mu * self.outer_m[k])
        self.w = new_w
        self.local = [[t.clone() for t in self.w] for _ in range(self.m)]
        self.round_position = 0
        self.round_alphas = [0.0] * self.m
