"""The ``--inject-nonfinite`` testing aid: make chosen steps non-finite the way real failures are, on every back end.

loss:N   rank 0's loss at step N is NaN (its gradients follow)
grad:N   rank 0's gradients at step N are inf while its loss stays finite (an identity whose backward is inf,
         applied to the logits, so it works wherever autograd runs: one process, FSDP2, DeepSpeed's ZeRO)
weights:N  after step N one weight is NaN on every rank (a step that went wrong): the next evaluation is
         non-finite and no checkpoint of it may be published
"""

from __future__ import annotations

import torch

KINDS = ("loss", "grad", "weights")


class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


class Faults:
    def __init__(self, spec: str, rank: int):
        kind, _, steps = spec.rpartition(":") if ":" in spec else ("loss", "", spec)
        if kind not in KINDS:
            raise ValueError(f"invalid --inject-nonfinite={spec!r}: the prefix must be one of {KINDS}")
        try:
            self.steps = {int(x) for x in steps.split(",") if x}
        except ValueError:
            raise ValueError(f"invalid --inject-nonfinite={spec!r}: expected comma-separated step numbers") from None
        self.kind, self.rank = kind, rank

    def _now(self, step: int, kind: str) -> bool:
        return self.kind == kind and step in self.steps and (self.rank == 0 or kind == "weights")

    def logits(self, step: int, logits):
        return _InfGradient.apply(logits) if self._now(step, "grad") else logits

    def loss(self, step: int, loss):
        return loss * float("nan") if self._now(step, "loss") else loss

    @torch.no_grad()
    def after_step(self, step: int, params) -> None:
        if self._now(step, "weights"):
            for p in params:
                local = p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)
                if local.numel():
                    local.view(-1)[0] = float("nan")
                    return
