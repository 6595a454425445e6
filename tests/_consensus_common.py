"""Shared pieces of the multi-process consensus / FSDP / checkpoint tests: a tiny model, per-agent digit batches,
and the float64 reference run (pisa_zero.reference) they are compared with."""

from __future__ import annotations

import functools

import torch
from torch import nn

from pisa_zero.reference import ReferencePISA

HIDDEN = 10  # uneven Shard(0) rows on 4 ranks (3, 3, 3, 1); the 10-class head too


class Net(nn.Module):
    def __init__(self, d_in=64, hidden=HIDDEN, classes=10, depth=2):
        super().__init__()
        self.inp = nn.Linear(d_in, hidden)
        self.blocks = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(depth)])
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for block in self.blocks:
            h = torch.tanh(block(h))
        return self.out(h)


def make_model(seed=0) -> Net:
    torch.manual_seed(seed)
    return Net()


@functools.cache
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def agent_pools(agents: int, heterogeneous: bool) -> list[torch.Tensor]:
    """Row indices each agent draws from: disjoint class subsets (heterogeneous) or interleaved rows (iid)."""
    _, y = digits()
    if heterogeneous:
        classes = torch.arange(10).chunk(agents)
        return [torch.nonzero(torch.isin(y, c)).flatten() for c in classes]
    idx = torch.arange(len(y))
    return [idx[i::agents] for i in range(agents)]


def agent_batch(pools, agent: int, step: int, n: int):
    x, y = digits()
    pool = pools[agent]
    rows = pool[(step * n + torch.arange(n)) % len(pool)]
    return x[rows], y[rows]


def rank_batch(pools, agent: int, shard: int, shards: int, step: int, n: int):
    """This rank's part of its agent's batch (n divisible by shards)."""
    x, y = agent_batch(pools, agent, step, n)
    part = n // shards
    return x[shard * part : (shard + 1) * part], y[shard * part : (shard + 1) * part]


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def reference_run(
    steps, agents, sizes, heterogeneous, preconditioner, hp, seed=0, alphas=None, dtype=torch.float64, skip=()
):
    """The float64 m-agent reference fed the same per-agent batches; returns {name: tensor}. The batches of the
    steps in ``skip`` are left out (a step every agent skipped is one that never happened)."""
    model = make_model(seed).to(dtype)
    names = [n for n, _ in model.named_parameters()]
    pools = agent_pools(agents, heterogeneous)
    if callable(preconditioner):
        preconditioner = [preconditioner(n, p) for n, p in model.named_parameters()]
    ref = ReferencePISA(
        [p.detach() for p in model.parameters()], agents, preconditioner=preconditioner, dtype=dtype, **hp
    )
    for t in range(steps):
        if t in skip:
            continue
        fns = []
        for i in range(agents):
            x, y = agent_batch(pools, i, t, sizes[i])
            x = x.to(dtype)

            def grad_fn(w, x=x, y=y):
                params = {n: wi.requires_grad_() for n, wi in zip(names, w)}
                loss = loss_fn(lambda inp: torch.func.functional_call(model, params, (inp,)), x, y)
                return torch.autograd.grad(loss, list(params.values()))

            fns.append(grad_fn)
        ref.step(fns, alphas=sizes if alphas is None else alphas)
    return dict(zip(names, ref.w))


def max_rel_err(got: dict, ref: dict) -> float:
    return max(((got[n].double() - ref[n]).norm() / ref[n].norm()).item() for n in ref)


def fp32_roundoff(steps, agents, sizes, heterogeneous, preconditioner, hp, alphas=None) -> float:
    """How far the reference itself moves when run in float32: the scale of "float32 round-off" for this run
    (NSISA's Newton–Schulz amplifies it to ~1e-5; elementwise preconditioners stay near 1e-7)."""
    args = (steps, agents, sizes, heterogeneous, preconditioner, hp)
    r32 = reference_run(*args, alphas=alphas, dtype=torch.float32)
    return max_rel_err(r32, reference_run(*args, alphas=alphas))


def assert_matches_reference(got, steps, agents, sizes, heterogeneous, preconditioner, hp, alphas=None, floor=2e-6):
    """got (fp32, distributed) == float64 reference within max(floor, 3 × the reference's own fp32 round-off)."""
    args = (steps, agents, sizes, heterogeneous, preconditioner, hp)
    err = max_rel_err(got, reference_run(*args, alphas=alphas))
    tol = max(floor, 3 * fp32_roundoff(*args, alphas=alphas))
    assert err <= tol, f"relative error {err:.3g} > {tol:.3g} vs the {agents}-agent reference"
    return err


# ------------------------------------------------------------------------------------------- bf16 bounds
BF16_U = 2.0**-8  # bf16's unit roundoff: 8 significant bits, round to nearest

# aten operations that move, view, select or build values without arithmetic: exact in bf16
_EXACT_OPS = {
    "alias", "arange", "as_strided", "cat", "clone", "constant_pad_nd", "copy_", "detach", "embedding", "empty",
    "empty_like", "expand", "fill_", "full", "index_select", "masked_fill", "new_empty", "new_ones", "new_zeros",
    "ones", "ones_like", "permute", "select", "slice", "split", "split_with_sizes", "squeeze", "stack", "t",
    "transpose", "unbind", "unsqueeze", "view", "_unsafe_view", "where", "zero_", "zeros", "zeros_like",
}  # fmt: skip


def bf16_roundings(fn) -> int:
    """The bf16 roundings one call of ``fn`` makes (e.g. a bf16 model's forward and backward): every aten operation
    that computes a bf16 result, each rounding its output once (fp32 → bf16 casts included, exact moves excluded)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.__name__.split(".")[0]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16]
            if name == "_to_copy":  # a cast rounds when it narrows
                wider = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.dtype != torch.bfloat16]
                outs = outs if wider else []
            if outs and name not in _EXACT_OPS:
                Count.n += 1
            return out

    with Count():
        fn()
    return Count.n


def bf16_bound(roundings: int, path: float, norm: float) -> float:
    """The bound on one tensor's relative error ‖w_bf16 − w‖/‖w‖ after a run, w the run without bf16 rounding.

    Each rounding perturbs a value by at most u = 2^-8 of itself; to first order (condition numbers ≤ 1, no
    cancellation among the roundings) the ``roundings`` of one step perturb that step's gradient and so the step
    Δ_t it takes by at most roundings · u of ‖Δ_t‖ (PISA's h / (σ + ρq) and AdamW's m / √v pass a relative
    perturbation through with a factor ≤ 1). The perturbations add along the trajectory: ‖w_bf16 − w‖ ≤
    roundings · u · Σ_t ‖Δ_t‖, and ``path`` = Σ_t ‖Δ_t‖ is the reference's own path length for this tensor.
    Dividing by ``norm`` = ‖w‖ makes it a relative bound; a tensor far from where it started (a zero-initialised
    bias) gets the full path, one that barely moved (a LayerNorm weight) almost none."""
    return roundings * BF16_U * path / norm
