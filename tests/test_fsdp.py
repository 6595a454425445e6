"""PISA on FSDP2 (real gloo ranks, CPU): mode A == single-process PISA, mode B == the m-agent reference,
NSISA with whole matrices routed to owner ranks, auxiliary AdamW groups, bf16 mixed precision, CPU offload."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from _consensus_common import (  # noqa: E402
    agent_batch,
    agent_pools,
    assert_matches_reference,
    loss_fn,
    make_model,
    max_rel_err,
    rank_batch,
)
from distributed import run_scenarios  # noqa: E402

from pisa_zero import PISA  # noqa: E402
from pisa_zero.consensus import AgentTopology  # noqa: E402
from pisa_zero.integrations.fsdp import prepare  # noqa: E402

HP = dict(sigma=10.0, rho=100.0, l2_lambda=0.01, eps=1e-8)  # σ=2, ρ=20 makes 20 NSISA steps chaotic (fp32≠fp64)
ADAMW = dict(lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
GLOBAL = 16  # mode A global batch


def kinds(name, p):
    return "nsisa" if p.ndim == 2 else "sisa"


def make_groups(model, other):
    """Block-like matrices on nsisa, the rest on ``other`` ("sisa" or "adamw"); "all-sisa": one sisa group."""
    if other == "all-sisa":
        return [{"params": list(model.parameters()), "preconditioner": "sisa"}]
    named = list(model.named_parameters())
    matrices = [p for n, p in named if p.ndim == 2]
    rest = [p for n, p in named if p.ndim != 2]
    extra = ADAMW if other == "adamw" else {}
    return [{"params": matrices, "preconditioner": "nsisa"}, {"params": rest, "preconditioner": other, **extra}]


def full_weights(model):
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def train_mode_a(steps, other, implementation="foreach"):
    model = make_model()
    model, opt = prepare(model, groups=make_groups(model, other), implementation=implementation, **HP)
    k, r = torch.distributed.get_world_size(), torch.distributed.get_rank()
    pools = agent_pools(1, False)
    for t in range(steps):
        x, y = rank_batch(pools, 0, r, k, t, GLOBAL)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return full_weights(model)


def train_mode_b(agents, steps, sizes, heterogeneous, groups, param_dtype=None, cpu_offload=False):
    topo = AgentTopology.build(agents=agents)
    model = make_model()
    model, opt = prepare(
        model, topo, groups=groups(model), param_dtype=param_dtype, cpu_offload=cpu_offload,
        implementation="foreach", **HP,
    )  # fmt: skip
    pools = agent_pools(agents, heterogeneous)
    i, k = topo.agent_index, topo.shard_size
    for t in range(steps):
        x, y = rank_batch(pools, i, topo.shard_index, k, t, sizes[i])
        opt.set_local_batch_size(sizes[i] // k)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the sharded fp32 masters
    return full_weights(model)


def single_process(steps, other, implementation="foreach"):
    model = make_model()
    opt = PISA(make_groups(model, other), implementation=implementation, **HP)
    pools = agent_pools(1, False)
    for t in range(steps):
        x, y = agent_batch(pools, 0, t, GLOBAL)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    return {n: p.detach() for n, p in model.named_parameters()}


def nsisa_adamw_reference(model, losses, steps, alphas, dtype=torch.float64):
    """Independent simulation of mode B (m = len(alphas) agents) in ``dtype``: NSISA (reference.py) on the matrices
    and AdamW on the α-averaged gradient (torch.optim.AdamW) for the rest. ``losses(i, t, forward)`` is agent i's
    loss at step t, ``forward`` the model at the current weights."""
    from pisa_zero.reference import ReferencePISA

    model = model.to(dtype)
    names = [n for n, _ in model.named_parameters()]
    is_mat = [p.ndim == 2 for p in model.parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    ref = ReferencePISA([t for t, m in zip(w, is_mat) if m], len(alphas), preconditioner="nsisa", dtype=dtype, **HP)
    others = [torch.nn.Parameter(t.clone()) for t, m in zip(w, is_mat) if not m]
    adamw = torch.optim.AdamW(others, **ADAMW, eps=HP["eps"])
    weights = [a / sum(alphas) for a in alphas]
    for t in range(steps):
        mats = iter(ref.w)
        rest = iter(others)
        current = [next(mats) if m else next(rest).detach() for m in is_mat]
        grads = []
        for i in range(len(alphas)):
            params = {nm: c.clone().requires_grad_() for nm, c in zip(names, current)}
            loss = losses(i, t, lambda inp, params=params: torch.func.functional_call(model, params, (inp,)))
            grads.append(torch.autograd.grad(loss, list(params.values())))
        for j, p in enumerate([q for q, m in zip(range(len(is_mat)), is_mat) if not m]):
            others[j].grad = sum(a * g[p] for a, g in zip(weights, grads))
        adamw.step()
        ref.step([lambda _w, g=g: [gq for gq, m in zip(g, is_mat) if m] for g in grads], alphas=alphas)
    mats, rest = iter(ref.w), iter(others)
    return {nm: (next(mats) if m else next(rest).detach()) for nm, m in zip(names, is_mat)}


def two_agent_nsisa_adamw_reference(steps, sizes, heterogeneous):
    """Mode B on the digits MLP, each agent on its own batches: the float64 `nsisa_adamw_reference`."""
    pools = agent_pools(len(sizes), heterogeneous)

    def losses(i, t, forward):
        x, y = agent_batch(pools, i, t, sizes[i])
        return loss_fn(forward, x.double(), y)

    return nsisa_adamw_reference(make_model(), losses, steps, sizes)


# A 1-row head: Linear(4, 1)'s weight (1 × 4) and bias (1) have fewer rows than an agent's 2 shard ranks (mode B,
# 2 × 2) or than the 4 ranks (mode A), so those ranks hold empty shards of them.
HEAD_STEPS, HEAD_BATCH = 3, 8


def one_row_head_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))


def head_batches(seed, steps):
    """Agent ``seed``'s batches, one per step (mode A: seed 0 is the global batch)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(HEAD_BATCH, 6, generator=gen) for _ in range(steps)]


def head_loss(forward, x):
    return forward(x).pow(2).mean()


def train_one_row_head(steps, agents=2):
    """FSDP2 with the 1-row head: mode B (``agents=2``, 2 × 2: both shard ranks of an agent see the agent's batch)
    or mode A (``agents=None``: the global batch split over the ranks)."""
    topo = AgentTopology.build(agents=agents) if agents else None
    model = one_row_head_model()
    model, opt = prepare(model, topo, groups=make_groups(model, "adamw"), implementation="foreach", **HP)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    for x in head_batches(topo.agent_index if topo else 0, steps):
        if topo is None:
            part = HEAD_BATCH // world
            x = x[rank * part : (rank + 1) * part]
        opt.zero_grad()
        head_loss(model, x).backward()
        opt.step()
    return full_weights(model)


def one_row_head_reference(steps, agents, dtype=torch.float64):
    """Mode B's agents unsharded, in the simulation above (α = ½ each: no batch sizes are set)."""
    batches = [head_batches(i, steps) for i in range(agents)]
    losses = lambda i, t, forward: head_loss(forward, batches[i][t].to(dtype))  # noqa: E731
    return nsisa_adamw_reference(one_row_head_model(), losses, steps, [1.0] * agents, dtype)


def one_row_head_single_process(steps, dtype=torch.float32):
    """Unsharded single-process PISA (the same groups) on the whole global batch: mode A's definition."""
    model = one_row_head_model().to(dtype)
    opt = PISA(make_groups(model, "adamw"), implementation="foreach", **HP)
    for x in head_batches(0, steps):
        opt.zero_grad()
        head_loss(model, x.to(dtype)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def route_matrices():
    """orthogonalize_sharded on Shard(0) DTensors (uneven rows, empty shards, several shapes, tall and wide) ==
    Newton–Schulz of the whole matrix; the whole matrices are spread over the owners."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from pisa_zero import functional as F
    from pisa_zero.routing import orthogonalize_sharded

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    gen = torch.Generator().manual_seed(0)
    shapes = [(10, 7), (10, 7), (7, 10), (3, 5), (10, 7), (1, 4), (6,)]
    full = [torch.randn(s, generator=gen) for s in shapes]
    params = [distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None) for t in full]
    got = orthogonalize_sharded(params, [p.to_local() for p in params], 5, torch.float32)
    worst = 0.0
    for t, o in zip(full, got):
        want = F.orthogonalize(t, 5) if t.ndim == 2 else t
        local = distribute_tensor(want, mesh, [Shard(0)], src_data_rank=None).to_local()
        assert o.shape == local.shape
        if o.numel():  # shards of rows < k matrices can be empty
            worst = max(worst, (o - local).abs().max().item())
    return worst


STEPS = 20


def _sizes_b(world):
    return [s * (world // 2) for s in ([6, 10] if world == 4 else [5, 11])]  # k = world/2 ranks split an agent batch


def _mode_b(agents, sizes, groups, **kwargs):
    return lambda rank, world, steps: train_mode_b(agents, steps, sizes(world), True, groups, **kwargs)


SISA_REST = lambda m: make_groups(m, "sisa")  # noqa: E731
ADAMW_REST = lambda m: make_groups(m, "adamw")  # noqa: E731
# Every scenario runs in one process group per world size (fixture below); each is its own test id.
SCENARIOS = {
    "mode_a_sisa": lambda rank, world, steps: train_mode_a(steps, "all-sisa"),
    "mode_a_nsisa_adamw": lambda rank, world, steps: train_mode_a(steps, "adamw"),
    "b_nsisa_sisa": _mode_b(2, _sizes_b, SISA_REST),
    "b_nsisa_adamw": _mode_b(2, _sizes_b, ADAMW_REST),
}
FOUR_RANK_SCENARIOS = {
    "b4_nsisa_sisa": _mode_b(4, lambda world: [5, 11, 8, 3], SISA_REST),
    "b_one_row_head": lambda rank, world, steps: train_one_row_head(HEAD_STEPS),
    "a_one_row_head": lambda rank, world, steps: train_one_row_head(HEAD_STEPS, agents=None),
    "route_matrices": lambda rank, world, steps: route_matrices(),
    "b_bf16_offload": _mode_b(2, _sizes_b, ADAMW_REST, param_dtype=torch.bfloat16, cpu_offload=True),
}


@pytest.fixture(scope="module")
def fsdp2_runs():
    runs = {}

    def results(world):
        if world not in runs:
            scenarios = {**SCENARIOS, **(FOUR_RANK_SCENARIOS if world == 4 else {})}
            runs[world] = run_scenarios(scenarios, world, STEPS, timeout=300)
        return runs[world]

    return results


def _identical_across_ranks(results, key):
    for r in results[1:]:
        for n, w in results[0].items():
            assert torch.equal(w, r[n]), f"{key}: ranks disagree on {n}"


def _check(name, results, world, steps):
    if name == "route_matrices":
        assert max(results) <= 1e-6  # owner-routed NS == whole-matrix NS
        return
    _identical_across_ranks(results, name)
    got = results[0]
    if name == "mode_a_sisa":  # mode A == single-process PISA on the same global batch
        single = {k: v.double() for k, v in single_process(steps, "all-sisa").items()}
        assert max_rel_err(got, single) <= 1e-6
    elif name == "mode_a_nsisa_adamw":
        err_a = max_rel_err(got, {k: v.double() for k, v in single_process(steps, "adamw").items()})
        print(f"{world} ranks: mode A nsisa+adamw vs single-process {err_a:.3g}")
        assert err_a <= 2e-5, err_a
    elif name == "b_nsisa_sisa":
        assert_matches_reference(got, steps, 2, _sizes_b(world), True, kinds, HP)
    elif name == "b_nsisa_adamw":
        err_b = max_rel_err(got, two_agent_nsisa_adamw_reference(steps, _sizes_b(world), True))
        print(f"{world} ranks: mode B nsisa+adamw vs reference {err_b:.3g}")
        assert err_b <= 3e-5, err_b
    elif name == "b4_nsisa_sisa":
        assert_matches_reference(got, steps, 4, [5, 11, 8, 3], True, kinds, HP)
    elif name == "b_one_row_head":  # empty shards of the head on one shard rank of each agent
        ref = one_row_head_reference(HEAD_STEPS, 2)
        roundoff = max_rel_err(one_row_head_reference(HEAD_STEPS, 2, torch.float32), ref)
        err = max_rel_err(got, ref)
        assert err <= max(2e-6, 3 * roundoff), (err, roundoff)
    elif name == "a_one_row_head":  # empty shards of the head on 3 of the 4 ranks
        ref = one_row_head_single_process(HEAD_STEPS, torch.float64)
        roundoff = max_rel_err(one_row_head_single_process(HEAD_STEPS), ref)
        err = max_rel_err(got, ref)
        assert err <= max(2e-6, 3 * roundoff), (err, roundoff)
    elif name == "b_bf16_offload":
        err_bf16 = max_rel_err(got, two_agent_nsisa_adamw_reference(steps, _sizes_b(world), True))
        assert err_bf16 <= 0.15, f"bf16 params + CPU offload drift {err_bf16:.3g} from the fp64 reference"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp2_two_ranks(fsdp2_runs, name):
    _check(name, fsdp2_runs(2)[name], 2, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCENARIOS) + list(FOUR_RANK_SCENARIOS))
def test_fsdp2_four_ranks(fsdp2_runs, name):
    _check(name, fsdp2_runs(4)[name], 4, STEPS)
