"""Pure PISA update kernels over lists of tensors (no distribution, no optimizer bookkeeping).

One PISA step on a tensor, at the consensus point w (ALGORITHM.md §2–3), given the direction source ``g``
(the gradient for the elementwise preconditioners, the orthogonalised Nesterov momentum O for ``nsisa``)::

    w  ← w · (1 − lr·wd)                         decoupled weight decay (only when wd > 0)
    h  = g + π
    q  = sqrt(v̂) + ε   (sisa: v ← β₂v + (1−β₂)h², v̂ = v/(1−β₂ᵗ))
         sqrt(v) + ε   (adagrad: v ← v + h²)
         |h| + ε       (nsisa)
         1             (identity)
    d  = h / (σ + ρ q)
    π  ← π − σ d
    c  = π − σ d                                  this agent's consensus contribution (before α)
    w  ← w + (c − λ w) / (σ + λ)                  = (σ w + c)/(σ + λ), written as an increment for accuracy

With agents (mode B) the kernel stops after c and writes α·c into ``contribution``; the consensus layer sums it
over agents and applies the last line with Σα·c in place of c.

Three back ends compute these operations in the same order: ``single`` (a loop of per-tensor ops), ``foreach``
(torch._foreach_* over the list) and ``compiled`` (torch.compile'd fused kernels: one graph per tensor on CPU, one
graph over the whole list on GPUs). ``compiled`` multiplies by reciprocals of the scalar divisors (1/(1 − β₂ᵗ),
1/(σ + λ), 1/(σ + ρ)) instead of dividing, and leaves out the weight-decay and λ terms when they are zero (a graph per
case): a division costs several multiplications on a CPU, and this kernel is the step's whole cost there; the
results agree to a rounding. The step counters t are 0-d tensors; ``compiled`` reads them on the
device (1 − β₂ᵗ of the whole list in one fp64 op), so a GPU step has no per-tensor host work and no host sync.
State tensors may be bf16 (``state_dtype``); the arithmetic is fp32 and the state is rounded on store, except for
float64 parameters, whose arithmetic (and default state) is float64, as in torch.optim (`arithmetic_dtype`).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

ELEMENTWISE_PRECONDITIONERS = ("sisa", "adagrad", "identity")
PRECONDITIONERS = (*ELEMENTWISE_PRECONDITIONERS, "nsisa")
IMPLEMENTATIONS = ("single", "foreach", "compiled")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def arithmetic_dtype(t: Tensor) -> torch.dtype:
    """The step's arithmetic dtype for tensor ``t``: fp32, or fp64 when ``t`` is fp64 (never narrower than t)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class StepScalars:
    """The group's hyper-parameters in effect for one call (σ and ρ already scaled by lr_ref/lr)."""

    preconditioner: str
    sigma: float
    rho: float
    beta2: float
    eps: float
    l2_lambda: float
    decay: float  # 1 − lr·weight_decay
    alpha: float = 1.0  # agent weight; only used when writing contributions


# ---------------------------------------------------------------------------------------------------------------
# Newton–Schulz (NSISA)
# ---------------------------------------------------------------------------------------------------------------


def newton_schulz(matrix: Tensor, steps: int = 5, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """Quintic Newton–Schulz orthogonalisation of Muon on a matrix or a batch ``(..., rows, cols)``; returns fp32
    (fp64 for an fp64 input).

    The edges stay in the arithmetic dtype (fp32): the Frobenius normalisation (its ``1e-7`` guard keeps a zero or
    tiny matrix finite) before the iterations, the cast back after them. Only the iterations' matmuls run in
    ``compute_dtype`` (bf16 where the hardware multiplies it fast, as Muon does)."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.to(arithmetic_dtype(matrix))
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = (x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(compute_dtype)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transposed:
        x = x.mT
    return x.to(arithmetic_dtype(matrix))


def orthogonalize(momentum: Tensor, steps: int = 5, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """O = NS5(u) · sqrt(max(1, rows/cols)) for one matrix or a batch of same-shape matrices."""
    rows, cols = momentum.shape[-2:]
    return newton_schulz(momentum, steps, compute_dtype) * math.sqrt(max(1.0, rows / cols))


#: ``ns_dtype`` values: the Newton–Schulz iterations' precision ("auto": bf16 where :func:`bf16_matmul_is_fast`).
NS_DTYPES = ("auto", "float32", "bfloat16")


#: Overrides the CPU detection below ("1": fast bf16, "0": not), e.g. so that runs on CPUs with and without AMX
#: compute the same "auto" Newton–Schulz (the test suite sets "0": its fp32 references must not depend on the CPU).
CPU_BF16_ENV = "PISA_ZERO_CPU_FAST_BF16"


@functools.cache
def _cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX, which oneDNN uses for bf16 matmuls (elsewhere a CPU converts bf16 to fp32 and back)."""
    override = os.environ.get(CPU_BF16_ENV)
    if override is not None:
        if override not in ("0", "1"):
            raise ValueError(f"{CPU_BF16_ENV}={override!r}: expected 0 or 1 (or unset: read the CPU's flags)")
        return override == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """Accelerators (CUDA and the rest) and CPUs with AVX512-BF16 or AMX."""
    return device.type != "cpu" or _cpu_has_fast_bf16()


def ns_compute_dtype(device: torch.device, dtype: torch.dtype = torch.float32, ns_dtype: str = "auto") -> torch.dtype:
    """The dtype of the Newton–Schulz matmuls: fp64 for fp64 tensors; else ``ns_dtype`` ("float32", "bfloat16"),
    or for "auto" bf16 where the device multiplies bf16 fast and fp32 elsewhere."""
    if dtype == torch.float64:
        return torch.float64
    if ns_dtype == "auto":
        return torch.bfloat16 if bf16_matmul_is_fast(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[ns_dtype]


def nesterov_momentum(grads: list[Tensor], momenta: list[Tensor], mu: float, nesterov: bool) -> list[Tensor]:
    """b ← μ b + g; returns u = g + μ b (Nesterov) or b. Momenta are updated in place (rounded to their dtype)."""
    directions = []
    for g, b in zip(grads, momenta):
        dtype = arithmetic_dtype(g)
        b_new = b.to(dtype).mul_(mu).add_(g)
        b.copy_(b_new)
        directions.append(g.to(dtype).add(b_new, alpha=mu) if nesterov else b_new)
    return directions


#: Elements per Newton–Schulz batch: same-shape matrices are stacked up to this many (at least one matrix), so the
#: iteration's temporaries (a few copies of the batch) stay bounded however large the model; 2^26 fp32 = 256 MiB.
NS_BATCH_ELEMENTS = 2**26


def orthogonalize_batched(directions: list[Tensor], steps: int, compute_dtype: torch.dtype) -> list[Tensor]:
    """Orthogonalise every 2-D tensor of the list, batching same-shape matrices (``NS_BATCH_ELEMENTS`` at most per
    batch); other tensors pass through."""
    out: list[Tensor] = list(directions)
    by_shape: dict[tuple, list[int]] = {}
    for i, u in enumerate(directions):
        if u.ndim == 2 and u.numel():  # an empty matrix has nothing to orthogonalise
            by_shape.setdefault((*u.shape, u.dtype), []).append(i)
    for (rows, cols, _), indices in by_shape.items():
        per_batch = max(1, NS_BATCH_ELEMENTS // (rows * cols))
        for start in range(0, len(indices), per_batch):
            batch = indices[start : start + per_batch]
            ortho = orthogonalize(torch.stack([directions[i] for i in batch]), steps, compute_dtype)
            for j, i in enumerate(batch):
                out[i] = ortho[j]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Elementwise step: single-tensor back end
# ---------------------------------------------------------------------------------------------------------------


def _step_single(
    w: Tensor,
    g: Tensor,
    dual: Tensor,
    second_moment: Tensor | None,
    bias_correction2: float,
    s: StepScalars,
    contribution: Tensor | None,
) -> None:
    if s.decay != 1.0:
        w.mul_(s.decay)
    dtype = arithmetic_dtype(w)
    dual_f = dual.to(dtype)
    h = g.to(dtype).add(dual_f)
    if s.preconditioner == "identity":
        d = h.div(s.sigma + s.rho)
    else:
        if s.preconditioner == "sisa":
            v = second_moment.to(dtype).mul_(s.beta2).addcmul_(h, h, value=1.0 - s.beta2)
            second_moment.copy_(v)
            q = v.div(bias_correction2).sqrt_().add_(s.eps)
        elif s.preconditioner == "adagrad":
            v = second_moment.to(dtype).addcmul_(h, h)
            second_moment.copy_(v)
            q = v.sqrt().add_(s.eps)
        else:  # nsisa
            q = h.abs().add_(s.eps)
        d = h.div_(q.mul_(s.rho).add_(s.sigma))
    dual_f.add_(d, alpha=-s.sigma)
    dual.copy_(dual_f)
    c = dual_f.add(d, alpha=-s.sigma)
    if contribution is not None:
        contribution.copy_(c.mul_(s.alpha))
        return
    if s.l2_lambda != 0.0:
        c.sub_(w, alpha=s.l2_lambda)
    w.add_(c.div_(s.sigma + s.l2_lambda))


# ---------------------------------------------------------------------------------------------------------------
# foreach back end
# ---------------------------------------------------------------------------------------------------------------


def _as_dtype(tensors: list[Tensor], dtype: torch.dtype) -> list[Tensor]:
    return [t.to(dtype) for t in tensors] if tensors and tensors[0].dtype != dtype else tensors


def _step_foreach(
    ws: list[Tensor],
    gs: list[Tensor],
    duals: list[Tensor],
    second_moments: list[Tensor] | None,
    bias_corrections2: list[float],
    s: StepScalars,
    contributions: list[Tensor] | None,
) -> None:
    if s.decay != 1.0:
        torch._foreach_mul_(ws, s.decay)
    dtype = arithmetic_dtype(ws[0])
    duals_f = _as_dtype(duals, dtype)  # the state itself when already in dtype, so the updates below are in place
    h = torch._foreach_add(_as_dtype(gs, dtype), duals_f)
    if s.preconditioner == "identity":
        d = torch._foreach_div(h, s.sigma + s.rho)
    else:
        if s.preconditioner in ("sisa", "adagrad"):
            vs = _as_dtype(second_moments, dtype)
            if s.preconditioner == "sisa":
                torch._foreach_mul_(vs, s.beta2)
                torch._foreach_addcmul_(vs, h, h, value=1.0 - s.beta2)
                q = torch._foreach_div(vs, bias_corrections2)
                torch._foreach_sqrt_(q)
            else:
                torch._foreach_addcmul_(vs, h, h)
                q = torch._foreach_sqrt(vs)
            if vs is not second_moments:
                torch._foreach_copy_(second_moments, vs)
        else:  # nsisa
            q = torch._foreach_abs(h)
        torch._foreach_add_(q, s.eps)
        torch._foreach_mul_(q, s.rho)
        torch._foreach_add_(q, s.sigma)
        d = torch._foreach_div(h, q)
    torch._foreach_add_(duals_f, d, alpha=-s.sigma)
    if duals_f is not duals:
        torch._foreach_copy_(duals, duals_f)
    c = torch._foreach_add(duals_f, d, alpha=-s.sigma)
    if contributions is not None:
        torch._foreach_mul_(c, s.alpha)
        torch._foreach_copy_(contributions, c)
        return
    if s.l2_lambda != 0.0:
        torch._foreach_sub_(c, ws, alpha=s.l2_lambda)
    torch._foreach_div_(c, s.sigma + s.l2_lambda)
    torch._foreach_add_(ws, c)


# ---------------------------------------------------------------------------------------------------------------
# compiled back end: the same arithmetic in fused kernels (flattened, dynamic lengths)
# ---------------------------------------------------------------------------------------------------------------

# Index of each scalar in the vector handed to the kernel (scalars as a tensor avoid recompiles per value).
(_SIGMA, _RHO, _BETA2, _ONE_MINUS_BETA2, _EPS, _LAMBDA, _INV_SIGMA_PLUS_LAMBDA, _DECAY, _ALPHA, _INV_SIGMA_PLUS_RHO) = (
    range(10)
)


@dataclass(frozen=True)
class _KernelCase:
    """What the compiled graph is specialised on (Python values: one graph per case, no per-element branches)."""

    preconditioner: str
    write_contribution: bool  # mode B: write α·c, leave w to the consensus
    decay: bool  # weight decay on (1 − lr·wd ≠ 1)
    l2: bool  # λ ≠ 0


def _fused_kernel(w, g, dual, second_moment, inv_bias_correction2, scalars, case: _KernelCase, contribution):
    sigma, rho = scalars[_SIGMA], scalars[_RHO]
    dtype = scalars.dtype  # arithmetic_dtype(w): the scalar table is built in it
    dual_f = dual.to(dtype)
    h = g.to(dtype) + dual_f
    if case.preconditioner == "identity":
        d = h * scalars[_INV_SIGMA_PLUS_RHO]
    else:
        if case.preconditioner == "sisa":
            v = second_moment.to(dtype) * scalars[_BETA2] + (h * h) * scalars[_ONE_MINUS_BETA2]
            second_moment.copy_(v)
            q = torch.sqrt(v * inv_bias_correction2[0]) + scalars[_EPS]
        elif case.preconditioner == "adagrad":
            v = second_moment.to(dtype) + h * h
            second_moment.copy_(v)
            q = torch.sqrt(v) + scalars[_EPS]
        else:
            q = h.abs() + scalars[_EPS]
        d = h / (q * rho + sigma)
    dual_new = dual_f - d * sigma
    dual.copy_(dual_new)
    c = dual_new - d * sigma
    w_f = w * scalars[_DECAY] if case.decay else w
    if case.write_contribution:
        if case.decay:
            w.copy_(w_f)
        contribution.copy_(c * scalars[_ALPHA])
    elif case.l2:
        w.copy_(w_f + (c - w_f * scalars[_LAMBDA]) * scalars[_INV_SIGMA_PLUS_LAMBDA])
    else:
        w.copy_(w_f + c * scalars[_INV_SIGMA_PLUS_LAMBDA])


def _fused_list(ws, gs, duals, second_moments, inv_bias_corrections2, scalars, case: _KernelCase, outs):
    """The fused kernel over a whole list of tensors in one graph (GPU: one compiled call launches them all)."""
    for i in range(len(ws)):
        v = second_moments[i] if second_moments is not None else None
        out = outs[i] if outs is not None else None
        _fused_kernel(ws[i], gs[i], duals[i], v, inv_bias_corrections2[i : i + 1], scalars, case, out)


def _one_graph_per_list(device: torch.device) -> bool:
    """GPUs: one graph over the list (a compiled call costs ~0.1 ms of host time; 92 per-tensor calls were 7x fused
    AdamW's whole step on an H100). CPU: one graph per tensor (a multi-tensor C++ graph compiled slowly and ran 5x
    slower there)."""
    return device.type != "cpu"


@functools.cache
def _compiled_list():
    return torch.compile(_fused_list, dynamic=True, fullgraph=True)


@functools.cache
def _compiled_kernel():
    # dynamic_threads: the graph is compiled once for all lengths, so let OpenMP (not a size hint) decide threading.
    return torch.compile(_fused_kernel, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


def _step_compiled(
    ws: list[Tensor],
    gs: list[Tensor],
    duals: list[Tensor],
    second_moments: list[Tensor] | None,
    steps: list[Tensor],
    s: StepScalars,
    contributions: list[Tensor] | None,
) -> None:
    device = ws[0].device
    shared = [s.sigma, s.rho, s.beta2, 1.0 - s.beta2, s.eps, s.l2_lambda]
    shared += [1.0 / (s.sigma + s.l2_lambda), s.decay, s.alpha, 1.0 / (s.sigma + s.rho)]
    # One host-to-device copy per call for all the scalars (per-tensor copies dominate a GPU step otherwise).
    scalars = torch.tensor(shared, dtype=arithmetic_dtype(ws[0])).to(device, non_blocking=True)
    # 1/(1 − β₂ᵗ) of every tensor in one fp64 op on the device (as the host computes it; inside the kernel it would
    # be recomputed for every element)
    inv_bias_corrections2 = (1.0 / (1.0 - s.beta2 ** torch.stack(steps).to(device, torch.float64))).to(scalars.dtype)
    write = contributions is not None
    case = _KernelCase(s.preconditioner, write, s.decay != 1.0, s.l2_lambda != 0.0)
    # One graph per (kernel case, dtypes, device, list length): more than dynamo's default limit of 8.
    with torch._dynamo.config.patch(recompile_limit=128):
        if _one_graph_per_list(device):
            flat = lambda ts: [t.reshape(-1) for t in ts] if ts is not None else None  # noqa: E731
            _compiled_list()(
                flat(ws), flat(gs), flat(duals), flat(second_moments), inv_bias_corrections2, scalars, case,
                flat(contributions),
            )  # fmt: skip
            return
        kernel = _compiled_kernel()
        for i, w in enumerate(ws):
            v = second_moments[i].view(-1) if second_moments is not None else None
            out = contributions[i].view(-1) if write else None
            kernel(
                w.view(-1), gs[i].reshape(-1), duals[i].view(-1), v, inv_bias_corrections2[i : i + 1], scalars, case,
                out,
            )  # fmt: skip


def finite_flag(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor on the tensors' device: True when every element of every tensor is finite. No host sync.

    One read of each tensor: a sum per tensor on CPU (the cheapest full read torch has there), one multi-tensor L1
    norm on GPUs (a launch or two for the whole list). A sum or norm is inf/NaN when an element is (or, harmlessly,
    when finite values overflow fp32: garbage either way)."""
    if tensors[0].device.type == "cpu":
        reductions = [t.sum(dtype=torch.float32) for t in tensors]
    else:
        reductions = torch._foreach_norm(tensors, 1, dtype=torch.float32)
    return torch.isfinite(torch.stack(reductions)).all()


def all_finite(tensors: list[Tensor]) -> bool:
    """``finite_flag`` read on the host (one sync); True for an empty list."""
    return not tensors or bool(finite_flag(tensors))


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def pisa_step(
    params: list[Tensor],
    directions: list[Tensor],
    duals: list[Tensor],
    second_moments: list[Tensor] | None,
    steps: list[Tensor],
    scalars: StepScalars,
    *,
    implementation: str = "foreach",
    contributions: list[Tensor] | None = None,
) -> None:
    """Apply one PISA step in place to plain (local) tensors.

    ``directions`` are the gradients (elementwise preconditioners) or the orthogonalised momenta (nsisa);
    ``steps`` are the per-tensor step counters (0-d tensors) *after* increment, used for sisa's bias correction:
    ``single`` and ``foreach`` read them on the host (keep them on the CPU there), ``compiled`` in the kernel (on
    GPUs keep them on the device, as fused AdamW does);
    ``contributions``, when given, receive α·c and ``params`` get only the weight decay (mode B).
    """
    if not params:
        return
    if scalars.preconditioner not in ("sisa", "adagrad"):
        second_moments = None
    kinds = [(w.dtype, d.dtype) for w, d in zip(params, duals)]
    if implementation != "single" and len(set(kinds)) > 1:  # one dtype per list op, as torch.optim groups them
        for kind in dict.fromkeys(kinds):
            idx = [i for i, k in enumerate(kinds) if k == kind]
            pick = lambda xs, idx=idx: None if xs is None else [xs[i] for i in idx]  # noqa: E731
            pisa_step(
                pick(params), pick(directions), pick(duals), pick(second_moments), pick(steps), scalars,
                implementation=implementation, contributions=pick(contributions),
            )  # fmt: skip
        return
    if implementation == "compiled":
        _step_compiled(params, directions, duals, second_moments, steps, scalars, contributions)
        return
    bias_corrections2 = [1.0 - scalars.beta2 ** float(t) for t in steps]
    if implementation == "single":
        for i, w in enumerate(params):
            _step_single(
                w,
                directions[i],
                duals[i],
                second_moments[i] if second_moments is not None else None,
                bias_corrections2[i],
                scalars,
                contributions[i] if contributions is not None else None,
            )
    elif implementation == "foreach":
        _step_foreach(params, directions, duals, second_moments, bias_corrections2, scalars, contributions)
    else:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def apply_consensus(params: list[Tensor], summed_contributions: list[Tensor], sigma: float, l2_lambda: float) -> None:
    """w ← w + (Σα·c − λ w)/(σ + λ) on each tensor (the server step of mode B)."""
    for w, c in zip(params, summed_contributions):
        c = c.to(arithmetic_dtype(w))
        if l2_lambda != 0.0:
            c = c.sub(w, alpha=l2_lambda)
        w.add_(c.div(sigma + l2_lambda))
