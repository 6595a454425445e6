"""A slow, plain PISA in the paper's notation, with m agents simulated in one process.

Used only by tests and benchmarks: every fast path (`PISA`, the consensus collectives, the host integrations) is
compared with it. Written from ALGORITHM.md §2–3 line by line, in float64 by default, with no shared code from
`pisa_zero.functional` so that a mistake there cannot hide here.

    for every agent i:   g_i = ∇F_i(w)                       (at the consensus point)
                         h_i = g_i + π_i        (nsisa: h_i = NS5(g_i + μ b_i)·scale + π_i, b_i ← μ b_i + g_i)
                         d_i = h_i / (σ + ρ q_i)
                         w_i = w − d_i
                         π_i = π_i + σ (w_i − w)
    consensus:           w = Σ_i α_i (σ w_i + π_i) / (σ + λ)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor


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
    """m agents, each with its own π_i, v_i, b_i, sharing one consensus w (a list of tensors).

    ``step(grad_fns, alphas)``: ``grad_fns[i](w)`` returns agent i's gradients at the consensus point (a list like
    ``w``); ``alphas`` are the agents' weights (normalised here to sum to one).
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
        dtype: torch.dtype = torch.float64,
    ):
        self.w = [t.detach().to(dtype).clone() for t in weights]
        self.m = agents
        if isinstance(preconditioner, str):
            preconditioner = [preconditioner] * len(self.w)
        self.preconditioner = list(preconditioner)
        self.sigma0, self.rho0 = sigma, rho
        self.lr_ref = lr if lr is not None else 1.0 / (sigma + rho)
        self.beta2, self.mu, self.nesterov, self.eps = beta2, momentum, nesterov, eps
        self.lam, self.wd, self.ns_steps = l2_lambda, weight_decay, ns_steps
        zeros = lambda: [torch.zeros_like(t) for t in self.w]  # noqa: E731
        self.pi = [zeros() for _ in range(agents)]
        self.v = [zeros() for _ in range(agents)]
        self.b = [zeros() for _ in range(agents)]
        self.t = 0

    def step(self, grad_fns: Sequence[Callable], alphas: Sequence[float] | None = None, lr: float | None = None):
        lr = self.lr_ref if lr is None else lr
        if lr == 0:
            return
        self.t += 1
        sigma = self.sigma0 * self.lr_ref / lr
        rho = self.rho0 * self.lr_ref / lr
        alphas = [1.0] * self.m if alphas is None else list(alphas)
        alphas = [a / sum(alphas) for a in alphas]
        grads = [[g.detach().to(self.w[0].dtype) for g in fn([t.clone() for t in self.w])] for fn in grad_fns]
        w = [t * (1 - lr * self.wd) for t in self.w]
        new_w = [torch.zeros_like(t) for t in w]
        for i in range(self.m):
            for k, wk in enumerate(w):
                g = grads[i][k]
                kind = self.preconditioner[k]
                if kind == "nsisa":
                    self.b[i][k] = self.mu * self.b[i][k] + g
                    u = g + self.mu * self.b[i][k] if self.nesterov else self.b[i][k]
                    o = newton_schulz5(u, self.ns_steps) if u.ndim == 2 else u
                    h = o + self.pi[i][k]
                    q = h.abs() + self.eps
                else:
                    h = g + self.pi[i][k]
                    if kind == "sisa":
                        self.v[i][k] = self.beta2 * self.v[i][k] + (1 - self.beta2) * h**2
                        q = torch.sqrt(self.v[i][k] / (1 - self.beta2**self.t)) + self.eps
                    elif kind == "adagrad":
                        self.v[i][k] = self.v[i][k] + h**2
                        q = torch.sqrt(self.v[i][k]) + self.eps
                    elif kind == "identity":
                        q = torch.ones_like(h)
                    else:
                        raise ValueError(f"unknown preconditioner {kind!r}")
                d = h / (sigma + rho * q)
                w_i = wk - d
                self.pi[i][k] = self.pi[i][k] + sigma * (w_i - wk)
                new_w[k] += alphas[i] * (sigma * w_i + self.pi[i][k])
        self.w = [t / (sigma + self.lam) for t in new_w]
