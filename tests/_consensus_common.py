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


def reference_run(steps, agents, sizes, heterogeneous, preconditioner, hp, seed=0, alphas=None, dtype=torch.float64):
    """The float64 m-agent reference fed the same per-agent batches; returns {name: tensor}."""
    model = make_model(seed).to(dtype)
    names = [n for n, _ in model.named_parameters()]
    pools = agent_pools(agents, heterogeneous)
    if callable(preconditioner):
        preconditioner = [preconditioner(n, p) for n, p in model.named_parameters()]
    ref = ReferencePISA(
        [p.detach() for p in model.parameters()], agents, preconditioner=preconditioner, dtype=dtype, **hp
    )
    for t in range(steps):
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
