"""Local steps (PISA(..., local_steps=H), ALGORITHM.md §6) on real gloo ranks == an independent float64
implementation of the round written here from the issue's update (not from pisa_zero.local_steps).

Each world size is spawned once (module fixtures); every scenario is its own test id reading those results:
- 2 ranks, ``consensus=dist.group.WORLD``, different data per rank: H = 1 (== today's mode B and the reference) and
  H = 5 (== the reference after 10 steps), sisa; no cross-agent collective between rounds;
- FSDP2 2 × 1 and 2 × 2 meshes, nsisa on matrices + AdamW on the rest, H = 5, == the reference;
- a checkpoint mid-round resumes bit-identically (2 × 1), and a 2 × 2 mid-round checkpoint loads on 2 × 1 (DCP
  reshards anchor, w_i, π_i, b_i) and continues to the same point as the uninterrupted run;
- a non-finite gradient on one agent is skipped by that agent only.
"""

import math
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _consensus_common import agent_batch, agent_pools, loss_fn, make_model, max_rel_err, rank_batch  # noqa: E402
from _consensus_common import reference_run as sync_reference  # noqa: E402
from distributed import CrossAgentCalls, load_script, run_distributed  # noqa: E402

from pisa_zero import PISA, checkpoint  # noqa: E402
from pisa_zero.consensus import AgentTopology  # noqa: E402
from pisa_zero.integrations.fsdp import prepare  # noqa: E402
from pisa_zero.reference import newton_schulz5  # noqa: E402

HP = dict(sigma=2.0, rho=20.0, l2_lambda=0.01, eps=1e-8)  # as test_consensus.py
NS_HP = dict(sigma=10.0, rho=100.0, l2_lambda=0.01, eps=1e-8)  # as test_fsdp.py (NSISA stays non-chaotic)
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95))
STEPS, H = 10, 5
VARIANTS = {"prox": dict(prox_sigma=0.5), "centred": dict(prox_sigma=0.5, centred_dual=True)}
SIZES2, SIZES4 = [5, 11], [6, 10]
TOL = 1e-5  # the bound: fp32 round-off, relative
NAN_AT = (2, 1)  # (call, rank = agent): a NaN gradient there in the 2-rank run


# ------------------------------------------------------------------------------------------- independent reference
def local_reference(
    steps, local_steps, sizes, heterogeneous, kinds, hp, adamw=None, dtype=torch.float64, gaps=None, skip=()
):
    """m agents, H local steps per round, in the issue's notation (float64). ``kinds[name]`` is "sisa", "nsisa" or
    "adamw". Returns the consensus w after ``steps`` (a multiple of H: then every agent's w_i = w); ``gaps`` (a list)
    gets each round's sqrt(mean_i Σ‖w_i − w‖² / Σ‖w‖²) over the PISA (non-adamw) tensors. ``skip``: (call, agent)
    pairs (call from 0) where that agent skips its local step (a non-finite gradient): its w_i, π_i, v_i, b_i and
    step count t_i stay, and the call's tokens do not count toward its α of the round (ALGORITHM.md §6's rule as
    pisa_zero.local_steps documents it); the round still closes on the H-th call."""
    model = make_model().to(dtype)
    names = [n for n, _ in model.named_parameters()]
    m = len(sizes)
    sigma, rho, lam, eps = hp["sigma"], hp["rho"], hp["l2_lambda"], hp["eps"]
    beta2, mu = 0.999, 0.95
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    zeros = lambda: {n: torch.zeros_like(t) for n, t in w.items()}  # noqa: E731
    wi = [{n: t.clone() for n, t in w.items()} for _ in range(m)]
    pi, v, b, m1, m2 = ([zeros() for _ in range(m)] for _ in range(5))
    pools = agent_pools(m, heterogeneous)
    counts = [0] * m  # each agent's local steps taken (its bias-correction t)
    tokens = [0] * m  # each agent's tokens in the round's taken steps
    for t in range(1, steps + 1):
        for i in range(m):
            if (t - 1, i) in skip:
                continue
            counts[i] += 1
            tokens[i] += sizes[i]
            ti = counts[i]
            x, y = agent_batch(pools, i, t - 1, sizes[i])
            params = {n: wi[i][n].clone().requires_grad_() for n in names}
            loss = loss_fn(lambda inp, params=params: torch.func.functional_call(model, params, (inp,)), x.to(dtype), y)
            grads = dict(zip(names, torch.autograd.grad(loss, list(params.values()))))
            for n in names:
                g = grads[n]
                if kinds[n] == "adamw":
                    b1, b2 = adamw["betas"]
                    m1[i][n] = b1 * m1[i][n] + (1 - b1) * g
                    m2[i][n] = b2 * m2[i][n] + (1 - b2) * g * g
                    denom = torch.sqrt(m2[i][n] / (1 - b2**ti)) + eps
                    wi[i][n] = wi[i][n] - adamw["lr"] * (m1[i][n] / (1 - b1**ti)) / denom
                    continue
                if kinds[n] == "nsisa":
                    b[i][n] = mu * b[i][n] + g
                    u = g + mu * b[i][n]
                    s = newton_schulz5(u) if u.ndim == 2 else u
                else:
                    s = g
                h = s + pi[i][n] + sigma * (wi[i][n] - w[n])
                if kinds[n] == "nsisa":
                    q = h.abs() + eps
                else:
                    v[i][n] = beta2 * v[i][n] + (1 - beta2) * h * h
                    q = torch.sqrt(v[i][n] / (1 - beta2**ti)) + eps
                wi[i][n] = wi[i][n] - h / (sigma + rho * q)
        if t % local_steps == 0 and sum(tokens) == 0:  # every agent skipped the whole round: w stays
            wi = [{n: t_.clone() for n, t_ in w.items()} for _ in range(m)]
        elif t % local_steps == 0:  # the round: dual ascent, then the consensus
            alphas = [n_i / sum(tokens) for n_i in tokens]
            tokens = [0] * m
            for n in names:
                if kinds[n] == "adamw":
                    w[n] = sum(a * wi[i][n] for i, a in enumerate(alphas))
                    continue
                for i in range(m):
                    pi[i][n] = pi[i][n] + sigma * (wi[i][n] - w[n])
                w[n] = sum(a * (sigma * wi[i][n] + pi[i][n]) for i, a in enumerate(alphas)) / (sigma + lam)
            if gaps is not None:
                pisa_names = [n for n in names if kinds[n] != "adamw"]
                gap = sum((wi[i][n] - w[n]).square().sum() for i in range(m) for n in pisa_names) / m
                gaps.append(math.sqrt(gap / sum(w[n].square().sum() for n in pisa_names)))
            wi = [{n: t_.clone() for n, t_ in w.items()} for _ in range(m)]
    return w


def roundoff_tol(*args, **kwargs) -> float:
    """max(1e-6, 3 × how far the reference itself moves in float32): NSISA's Newton–Schulz amplifies round-off."""
    ref = local_reference(*args, **kwargs)
    r32 = local_reference(*args, **kwargs, dtype=torch.float32)
    return max(1e-6, 3 * max_rel_err(r32, ref))


def kinds_of(model_kinds: str) -> dict:
    named = list(make_model().named_parameters())
    if model_kinds == "sisa":
        return {n: "sisa" for n, _ in named}
    return {n: ("nsisa" if p.ndim == 2 else "adamw") for n, p in named}


# ------------------------------------------------------------------------------------------- rank bodies
def _groups(model, model_kinds):
    named = list(model.named_parameters())
    if model_kinds == "sisa":
        return [{"params": [p for _, p in named], "preconditioner": "sisa"}]
    return [
        {"params": [p for _, p in named if p.ndim == 2], "preconditioner": "nsisa"},
        {"params": [p for _, p in named if p.ndim != 2], "preconditioner": "adamw", **ADAMW},
    ]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _weights(model):
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _train(model, opt, topo, start, stop, sizes, heterogeneous, count_cross=False, nan_at=None):
    """Steps start … stop−1; returns the number of cross-agent collectives per call (when asked)."""
    pools = agent_pools(topo.agents, heterogeneous)
    i, k = topo.agent_index, topo.shard_size
    agent_ranks = range(i * k, (i + 1) * k)
    cross = []
    for t in range(start, stop):
        x, y = rank_batch(pools, i, topo.shard_index, k, t, sizes[i])
        opt.set_local_batch_size(sizes[i] // k)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        if nan_at is not None and (t, dist.get_rank()) == nan_at:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        with CrossAgentCalls(agent_ranks) as counter:
            opt.step()
        cross.append(counter.calls if count_cross else None)
    return cross


def _group_run(local_steps, steps, **kw):
    group = dist.group.WORLD
    model = make_model()
    opt = PISA(model.parameters(), consensus=group, local_steps=local_steps, implementation="foreach", **HP, **kw)
    cross = _train(model, opt, opt.consensus, 0, steps, SIZES2, heterogeneous=True, count_cross=True)
    return model, opt, cross


def _fsdp(topo, model_kinds, local_steps):
    model = make_model()
    hp = NS_HP if model_kinds != "sisa" else HP
    return prepare(
        model, topo, groups=_groups(model, model_kinds), local_steps=local_steps, implementation="foreach", **hp
    )


def _body2(rank, world, root):
    out = {}
    # consensus=dist.group.WORLD, every rank one agent, different data
    model, opt, cross = _group_run(1, STEPS)
    out["group_h1"] = _weights(model)
    model, opt, cross = _group_run(H, STEPS)
    out["group_h5"] = _weights(model)
    out["group_h5_cross"] = cross
    out["group_h5_rounds"] = (opt.rounds_completed, opt.round_position)
    # TensorBoard diagnostics: consensus_gap of the last round, rounds, cross-agent bytes per step
    from pisa_zero.monitor import Diagnostics

    model = make_model()
    opt = PISA(model.parameters(), consensus=dist.group.WORLD, local_steps=H, implementation="foreach", **HP)
    monitor = Diagnostics(opt)
    out["monitor"] = []
    for start in range(0, STEPS, H):
        _train(model, opt, opt.consensus, start, start + H, SIZES2, heterogeneous=True)
        out["monitor"].append(monitor.measure())
    # today's mode B (the existing code path, no local_steps argument)
    model = make_model()
    opt = PISA(model.parameters(), consensus=dist.group.WORLD, implementation="foreach", **HP)
    _train(model, opt, opt.consensus, 0, STEPS, SIZES2, heterogeneous=True)
    out["today"] = _weights(model)
    # consensus_weights(): mid-round the params are w_i; inside the context the anchor w, restored exactly after
    model, opt, _ = _group_run(H, 7)
    before = _weights(model)
    with opt.consensus_weights():
        inside = _weights(model)
    out["context"] = (before, inside, _weights(model))
    # anchor on the CPU: the same bits here (CPU run), the option is accepted and used
    model, opt, _ = _group_run(H, STEPS, anchor_device="cpu")
    out["anchor_cpu"] = _weights(model)
    # the round variants (options of the same names in pisa_zero.reference)
    for name, variant in VARIANTS.items():
        model, opt, _ = _group_run(H, STEPS, **variant)
        out[name] = _weights(model)
    # a NaN gradient on rank 1 at step 2: agent 1 skips its local step, agent 0 does not; the round still closes
    model = make_model()
    opt = PISA(model.parameters(), consensus=dist.group.WORLD, local_steps=H, implementation="foreach", **HP)
    _train(model, opt, opt.consensus, 0, STEPS, SIZES2, heterogeneous=True, nan_at=NAN_AT)
    out["nan"] = (_weights(model), opt.nonfinite_steps_skipped, int(opt.state[model.inp.weight]["step"]))
    # FSDP2 on a 2 × 1 mesh, nsisa + AdamW
    topo = AgentTopology.build(agents=2)
    model, opt = _fsdp(topo, "nsisa", H)
    _train(model, opt, topo, 0, STEPS, SIZES2, heterogeneous=True)
    out["fsdp_2x1"] = _weights(model)
    # resume mid-round (step 7 of rounds of 5): save, keep going; a fresh model/optimizer loads and continues
    model, opt = _fsdp(topo, "nsisa", H)
    _train(model, opt, topo, 0, 7, SIZES2, heterogeneous=True)
    checkpoint.save(os.path.join(root, "mid2"), model, opt)
    out["mid2_local"] = _weights(model)
    with opt.consensus_weights():
        out["mid2_anchor"] = _weights(model)
    _train(model, opt, topo, 7, STEPS, SIZES2, heterogeneous=True)
    out["uninterrupted"] = _weights(model)
    # the same checkpoint merged into one agent of 2 shards: w_i α-averaged, the anchor kept
    one = AgentTopology.build(agents=1)
    model, opt = _fsdp(one, "nsisa", H)
    checkpoint.load(os.path.join(root, "mid2"), model, opt)
    out["merged_local"] = _weights(model)
    with opt.consensus_weights():
        out["merged_anchor"] = _weights(model)
    _train(model, opt, one, 7, STEPS, [16], heterogeneous=False)
    out["merged_trained"] = _weights(model)
    model, opt = _fsdp(topo, "nsisa", H)
    checkpoint.load(os.path.join(root, "mid2"), model, opt)
    out["resumed_position"] = opt.round_position
    _train(model, opt, topo, 7, STEPS, SIZES2, heterogeneous=True)
    out["resumed"] = _weights(model)
    # the 2 × 2 checkpoint written by the 4-rank run, loaded on 2 × 1 (shards 2 → 1), continued to STEPS
    model, opt = _fsdp(topo, "nsisa", H)
    checkpoint.load(os.path.join(root, "mid4"), model, opt)
    _train(model, opt, topo, 7, STEPS, SIZES4, heterogeneous=True)
    out["resharded"] = _weights(model)
    return out


def _body4(rank, world, root):
    out = {}
    topo = AgentTopology.build(agents=2)
    assert (topo.agents, topo.shard_size) == (2, 2)
    for model_kinds in ("sisa", "nsisa"):
        model, opt = _fsdp(topo, model_kinds, H)
        cross = _train(model, opt, topo, 0, STEPS, SIZES4, heterogeneous=True, count_cross=True)
        out[f"fsdp_2x2_{model_kinds}"] = _weights(model)
        out[f"fsdp_2x2_{model_kinds}_cross"] = cross
    model, opt = _fsdp(topo, "nsisa", H)
    _train(model, opt, topo, 0, 7, SIZES4, heterogeneous=True)
    checkpoint.save(os.path.join(root, "mid4"), model, opt)
    # scripts/comm_account.py on the same 2 × 2 mesh (last: it wraps torch.distributed's collectives for good)
    out["comm"] = load_script("comm_account").worker(load_script("comm_account").parse_args(COMM_ARGV))
    return out


COMM_ARGV = ["--world", "4", "--agents", "2", "--modes", "B-sisa,BH-sisa", "--local-steps", "2", "--steps", "2"]
COMM_ARGV += ["--d-model", "64", "--seq", "32", "--batch", "2"]


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory(prefix="pisa_local_") as root:
        four = run_distributed(_body4, 4, root, timeout=300)
        two = run_distributed(_body2, 2, root, timeout=300)
    return two, four


def _identical(results, key):
    for r in results[1:]:
        for n, w in results[0][key].items():
            assert torch.equal(w, r[key][n]), f"{key}: agents disagree on {n}"


# ------------------------------------------------------------------------------------------- checks
def test_reference_h1_is_todays_pisa():
    """The issue's update at H = 1 is §2's step: the local reference == pisa_zero.reference's m-agent PISA."""
    ours = local_reference(STEPS, 1, SIZES2, True, kinds_of("sisa"), HP)
    assert max_rel_err(ours, sync_reference(STEPS, 2, SIZES2, True, "sisa", HP)) < 1e-12


def test_one_agent_local_steps_match_reference():
    """One agent, no torch.distributed (the m = 1 consensus path), H = 3 after 9 steps."""
    topo = AgentTopology.build(agents=1)
    model = make_model()
    opt = PISA(model.parameters(), consensus=topo, local_steps=3, implementation="foreach", **HP)
    pools = agent_pools(1, False)
    for t in range(9):
        x, y = agent_batch(pools, 0, t, 8)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
    ref = local_reference(9, 3, [8], False, kinds_of("sisa"), HP)
    assert max_rel_err(_weights(model), ref) <= TOL
    assert (opt.rounds_completed, opt.round_position) == (3, 0)


def test_local_steps_validation():
    p = [torch.nn.Parameter(torch.zeros(2))]
    topo = AgentTopology.build(agents=1)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="local_steps"):
            PISA(p, consensus=topo, local_steps=bad)
    with pytest.raises(ValueError, match="needs agents"):
        PISA(p, local_steps=2)
    with pytest.raises(ValueError, match="need local_steps > 1"):
        PISA(p, consensus=topo, prox_sigma=1.0)
    with pytest.raises(ValueError, match="prox_sigma=-1"):
        PISA(p, consensus=topo, local_steps=2, prox_sigma=-1.0)
    with pytest.raises(ValueError, match="centred_dual=1"):
        PISA(p, consensus=topo, local_steps=2, centred_dual=1)
    with pytest.raises(ValueError, match="anchor_device='cuda'"):
        PISA(p, consensus=topo, local_steps=2, anchor_device="cuda")
    half = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
    opt = PISA([half], consensus=topo, local_steps=2)
    half.grad = torch.ones_like(half)
    with pytest.raises(ValueError, match="needs fp32 parameters"):
        opt.step()
    opt = PISA(p, consensus=topo, local_steps=2)
    with opt.consensus_weights(), pytest.raises(RuntimeError, match="consensus_weights"):
        p[0].grad = torch.ones(2)
        opt.step()


def reference_py_run(steps, local_steps, sizes, heterogeneous, kinds, hp, adamw=None, **variant):
    """The same round through pisa_zero.reference.ReferencePISA(local_steps=H) (written by another engineer)."""
    from pisa_zero.reference import ReferencePISA

    model = make_model().double()
    names = [n for n, _ in model.named_parameters()]
    extra = dict(adamw_lr=adamw["lr"], betas=adamw["betas"]) if adamw else {}
    ref = ReferencePISA(
        [p.detach() for p in model.parameters()], len(sizes), preconditioner=[kinds[n] for n in names],
        local_steps=local_steps, **hp, **extra, **variant,
    )  # fmt: skip
    pools = agent_pools(len(sizes), heterogeneous)
    for t in range(steps):
        fns = []
        for i, n in enumerate(sizes):
            x, y = agent_batch(pools, i, t, n)
            x = x.double()

            def grad_fn(w, x=x, y=y):
                params = {nm: wi.requires_grad_() for nm, wi in zip(names, w)}
                loss = loss_fn(lambda inp: torch.func.functional_call(model, params, (inp,)), x, y)
                return torch.autograd.grad(loss, list(params.values()))

            fns.append(grad_fn)
        ref.step(fns, alphas=sizes)
    return dict(zip(names, ref.w))


@pytest.mark.parametrize("model_kinds", ["sisa", "nsisa"])
def test_local_reference_agrees_with_reference_py(model_kinds):
    """Two independent float64 implementations of the round agree (this file's and pisa_zero.reference's)."""
    hp, adamw = (HP, None) if model_kinds == "sisa" else (NS_HP, ADAMW)
    args = (STEPS, H, SIZES4, True, kinds_of(model_kinds), hp)
    assert max_rel_err(local_reference(*args, adamw=adamw), reference_py_run(*args, adamw=adamw)) < 1e-10


@pytest.mark.slow
def test_group_h1_equals_today_and_reference(runs):
    two, _ = runs
    _identical(two, "group_h1")
    for n, w in two[0]["today"].items():
        assert torch.equal(two[0]["group_h1"][n], w), "local_steps=1 is not today's mode B"
    ref = local_reference(STEPS, 1, SIZES2, True, kinds_of("sisa"), HP)
    assert max_rel_err(two[0]["group_h1"], ref) <= TOL


@pytest.mark.slow
def test_group_h5_matches_reference(runs):
    two, _ = runs
    _identical(two, "group_h5")
    ref = local_reference(STEPS, H, SIZES2, True, kinds_of("sisa"), HP)
    assert max_rel_err(two[0]["group_h5"], ref) <= TOL
    # H matters: the H = 5 point is far from the every-step point
    assert max_rel_err(two[0]["group_h5"], local_reference(STEPS, 1, SIZES2, True, kinds_of("sisa"), HP)) > 1e-3
    assert two[0]["group_h5_rounds"] == (STEPS // H, 0)
    for r in two:
        for _, w in r["anchor_cpu"].items():
            assert math.isfinite(w.sum().item())
        for n, w in r["group_h5"].items():
            assert torch.equal(r["anchor_cpu"][n], w)


@pytest.mark.slow
def test_tensorboard_consensus_gap_rounds_bytes(runs):
    two, _ = runs
    gaps = []
    local_reference(STEPS, H, SIZES2, True, kinds_of("sisa"), HP, gaps=gaps)
    n = sum(p.numel() for p in make_model().parameters())
    for r in two:
        for j, values in enumerate(r["monitor"]):
            assert values["pisa/sisa/consensus_gap"] == pytest.approx(gaps[j], rel=1e-4)
            assert values["pisa/rounds"] == j + 1
            # ring RS + AG of the fp32 round buffer (n padded to 2 slices), once per H steps
            assert values["pisa/cross_agent_bytes_per_step"] == 2 * (1 / 2) * 4 * (-(-n // 2) * 2) / H
    assert gaps[0] > 1e-4


@pytest.mark.slow
def test_comm_account_cross_agent_bytes_fall_by_h(runs):
    """scripts/comm_account.py (GPT-2 on FSDP2, 2 × 2): cross-agent bytes per step of H = 2 are mode B's / 2 on
    every rank; inside the agents (FSDP's all-gather / reduce-scatter) nothing changes."""
    _, four = runs
    rows = four[0]["comm"]
    by = {(r["mode"], r["rank"]): r["bytes_per_step"] for r in rows}
    for rank in range(4):
        b, bh = by[("B-sisa", rank)], by[("BH-sisa", rank)]
        cross = lambda kinds: kinds["cross:reduce_scatter"] + kinds["cross:all_gather"]  # noqa: E731
        assert cross(b) > 0 and cross(bh) == cross(b) / 2, (b, bh)
        assert (
            bh["shard:all_gather"] == b["shard:all_gather"] and bh["shard:reduce_scatter"] == b["shard:reduce_scatter"]
        )
        assert "cross:all_reduce" not in bh


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_round_variants_match_reference_py(runs, name):
    two, _ = runs
    _identical(two, name)
    args = (STEPS, H, SIZES2, True, kinds_of("sisa"), HP)
    assert max_rel_err(two[0][name], reference_py_run(*args, **VARIANTS[name])) <= TOL
    assert max_rel_err(two[0][name], two[0]["group_h5"]) > 1e-3  # the variant changes the run


@pytest.mark.slow
def test_no_cross_agent_collective_between_rounds(runs):
    two, four = runs
    for cross in [r["group_h5_cross"] for r in two] + [
        r[f"fsdp_2x2_{k}_cross"] for r in four for k in ("sisa", "nsisa")
    ]:
        for t, calls in enumerate(cross):
            if (t + 1) % H:
                assert calls == 0, f"call {t}: {calls} cross-agent collectives inside a round"
            else:
                assert calls > 0, f"call {t} closes a round but made no cross-agent collective"


@pytest.mark.slow
def test_consensus_weights_context(runs):
    two, _ = runs
    before, inside, after = two[0]["context"]
    for n in before:
        assert torch.equal(before[n], after[n])
    # inside: the anchor w, identical on both agents; outside: w_i, different per agent mid-round
    for n in inside:
        assert torch.equal(inside[n], two[1]["context"][1][n])
    assert any(not torch.equal(before[n], two[1]["context"][0][n]) for n in before)
    assert any(not torch.equal(before[n], inside[n]) for n in before)


@pytest.mark.slow
def test_nonfinite_local_step_skipped_by_its_agent_only(runs):
    """Agent 1's call 2 is skipped by agent 1 alone (w_1, π_1, v_1, t_1 stay; its tokens leave the round's α);
    the result == the independent reference told the same, at the fp32 tolerance."""
    two, _ = runs
    (w0, skipped0, step0), (w1, skipped1, step1) = two[0]["nan"], two[1]["nan"]
    assert (skipped0, step0) == (0, STEPS) and (skipped1, step1) == (1, STEPS - 1)
    for n in w0:
        assert torch.equal(w0[n], w1[n]) and math.isfinite(w0[n].sum().item())
    args = (STEPS, H, SIZES2, True, kinds_of("sisa"), HP)
    assert max_rel_err(w0, local_reference(*args, skip={NAN_AT})) <= TOL
    # the skip is visible: the reference where agent 1 took call 2 is far away
    assert max_rel_err(w0, local_reference(*args)) > 10 * TOL


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["2x1", "2x2"])
def test_fsdp_nsisa_adamw_matches_reference(runs, mesh):
    two, four = runs
    results, sizes, key = (two, SIZES2, "fsdp_2x1") if mesh == "2x1" else (four, SIZES4, "fsdp_2x2_nsisa")
    _identical(results, key)
    args = (STEPS, H, sizes, True, kinds_of("nsisa"), NS_HP)
    err = max_rel_err(results[0][key], local_reference(*args, adamw=ADAMW))
    assert err <= max(TOL, roundoff_tol(*args, adamw=ADAMW))


@pytest.mark.slow
def test_fsdp_2x2_sisa_matches_reference(runs):
    _, four = runs
    _identical(four, "fsdp_2x2_sisa")
    ref = local_reference(STEPS, H, SIZES4, True, kinds_of("sisa"), HP)
    assert max_rel_err(four[0]["fsdp_2x2_sisa"], ref) <= TOL


@pytest.mark.slow
def test_resume_mid_round_bit_identical(runs):
    two, _ = runs
    assert two[0]["resumed_position"] == 7 % H
    for r in two:
        for n, w in r["uninterrupted"].items():
            assert torch.equal(r["resumed"][n], w), f"resume mid-round differs on {n}"


@pytest.mark.slow
def test_mid_round_checkpoint_merges_agents(runs):
    """2 agents → 1 agent (2 shards) mid-round: w_i is α-averaged like π, the anchor (the saved model) is kept."""
    two, _ = runs
    alphas = [s / sum(SIZES2) for s in SIZES2]
    local = [r["mid2_local"] for r in two]
    for n, w in two[0]["merged_local"].items():
        expected = alphas[0] * local[0][n] + alphas[1] * local[1][n]
        assert torch.allclose(w, expected, rtol=1e-6, atol=1e-7), n
        assert torch.equal(two[0]["merged_anchor"][n], two[0]["mid2_anchor"][n])
        assert math.isfinite(two[0]["merged_trained"][n].sum().item())


@pytest.mark.slow
def test_mid_round_checkpoint_reshards(runs):
    """2 × 2 → 2 × 1 mid-round: the continued run reaches the uninterrupted 2 × 2 run's point to round-off."""
    two, four = runs
    _identical(two, "resharded")
    args = (STEPS, H, SIZES4, True, kinds_of("nsisa"), NS_HP)
    assert max_rel_err(two[0]["resharded"], four[0]["fsdp_2x2_nsisa"]) <= max(TOL, roundoff_tol(*args, adamw=ADAMW))


def test_deepspeed_json_local_steps_validated():
    import pisa_zero.deepspeed as pds

    assert pds.parse_pisa_params({"local_steps": 4, "agents": 2}).kwargs["local_steps"] == 4
    with pytest.raises(ValueError, match="local_steps=0"):
        pds.parse_pisa_params({"local_steps": 0, "agents": 2})
    cfg = {"train_batch_size": 2, "optimizer": {"type": "PISA", "params": {"local_steps": 4}}}
    with pytest.raises(ValueError, match="optimizer.params.local_steps=4 needs agents"):
        pds.initialize(model=torch.nn.Linear(2, 2), config=cfg)


@pytest.mark.slow
def test_engine_local_steps_fsdp2(tmp_path):
    """engine/train.py --agents 2 --local-steps 3 (torchrun, FSDP2 mode B): rounds, consensus_gap and cross-agent
    bytes reach TensorBoard; evaluation runs on the consensus weights; a mid-round checkpoint is written."""
    import subprocess

    from test_engine import ROOT, TINY, env, scalars

    from engine import data

    cache = str(tmp_path / "cache")
    data.load_corpus(None, cache)
    out = tmp_path / "run"
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "engine/train.py", "--backend", "fsdp2"]
    cmd += ["--agents", "2", "--local-steps", "3", "--heterogeneity", *TINY, "--cache-dir", cache]
    cmd += ["--out-dir", str(out), "--max-steps", "7", "--eval-interval", "6", "--diag-interval", "3"]
    cmd += ["--log-interval", "3", "--ckpt-interval", "7", "--schedule", "constant"]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    s = scalars(out / "tensorboard")
    assert s["pisa/rounds"][3] == 1 and s["pisa/rounds"][6] == 2
    assert s["pisa/nsisa/consensus_gap"][6] > 0 and s["pisa/adamw/consensus_gap"][6] > 0
    assert s["pisa/cross_agent_bytes_per_step"][6] > 0
    assert s["val/loss"][6] < 5.0 and math.isfinite(s["val/loss"][7])
    assert "pisa/nsisa/consensus_disagreement" not in s  # a per-step cross-agent all-reduce: not with local steps
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000007"


def test_engine_local_steps_flag_needs_agents(capsys):
    from engine.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--local-steps", "4"])
    assert "--local-steps 4 needs agents" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--local-steps", "0", "--agents", "2", "--backend", "fsdp2"])
    assert parse_args(["--local-steps", "4", "--agents", "2", "--backend", "fsdp2"]).local_steps == 4


def test_engine_prox_sigma_and_centred_dual_flags_reach_pisa(capsys):
    from engine.backends import pisa_options
    from engine.train import parse_args

    mode_b = ["--agents", "2", "--backend", "fsdp2"]
    for argv, message in (
        (["--prox-sigma", "3", *mode_b], "--prox-sigma changes the local-step round: it needs --local-steps H > 1"),
        (["--centred-dual", *mode_b], "--centred-dual changes the local-step round: it needs --local-steps H > 1"),
        (["--prox-sigma", "0", "--local-steps", "4", *mode_b], "--prox-sigma=0.0: expected a finite value > 0"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    options = pisa_options(parse_args(["--local-steps", "4", "--prox-sigma", "7.5", "--centred-dual", *mode_b]))
    assert options["prox_sigma"] == 7.5 and options["centred_dual"] is True and options["local_steps"] == 4
    with pytest.raises(ValueError, match="needs agents"):  # PISA takes the keys (and wants its agents)
        PISA([torch.nn.Parameter(torch.zeros(3))], **options)
    assert "prox_sigma" not in pisa_options(parse_args(mode_b))  # H = 1: today's step, nothing added


@pytest.mark.gpu
@pytest.mark.parametrize("preconditioner", ["sisa", "nsisa"])
def test_cuda_local_steps_match_reference_with_cpu_anchor(preconditioner):
    """CUDA parameters, one agent (no torch.distributed), H = 4, weight decay and λ: anchor on the GPU and on the CPU
    give the same bits, and both match pisa_zero.reference's local-step round."""
    from pisa_zero.reference import ReferencePISA

    shapes = [(64, 32), (32, 64), (33,)]
    hp = dict(sigma=2.0, rho=10.0, l2_lambda=0.05, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    cpu = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(12)]
    kinds = [preconditioner if len(s) == 2 else "sisa" for s in shapes]
    results = []
    for anchor_device in (None, "cpu"):
        params = [torch.nn.Parameter(t.cuda()) for t in cpu]
        groups = [{"params": [p], "preconditioner": k} for p, k in zip(params, kinds)]
        opt = PISA(groups, consensus=AgentTopology.build(agents=1), local_steps=4, anchor_device=anchor_device, **hp)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.cuda()
            opt.step()
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ref = ReferencePISA(cpu, preconditioner=kinds, local_steps=4, **hp)
    for step_grads in grads:
        ref.step([lambda w, g=step_grads: g])
    err = max(((p.double() - r).norm() / r.norm()).item() for p, r in zip(results[0], ref.w))
    assert err <= (1e-5 if preconditioner == "sisa" else 1e-3)  # NS in bf16 on CUDA
