"""pisa_zero.reference with local steps: H = 1 is the §2 step, a hand-checked H = 2 round, AdamW tensors vs torch."""

import copy
import math

import pytest
import torch

from pisa_zero.reference import ReferencePISA, newton_schulz5

SHAPES = [(6, 4), (4, 6), (5,)]


def section2_step(
    state, grads, alphas, lr, kinds, sigma0, rho0, lr_ref, beta2=0.999, mu=0.95, eps=1e-8, lam=0.0, wd=0.0
):
    """ALGORITHM.md §2 as the reference wrote it before local steps existed: one consensus per step."""
    state["t"] += 1
    sigma, rho = sigma0 * lr_ref / lr, rho0 * lr_ref / lr
    alphas = [a / sum(alphas) for a in alphas]
    w = [t * (1 - lr * wd) for t in state["w"]]
    new_w = [torch.zeros_like(t) for t in w]
    for i, agent_grads in enumerate(grads):
        for k, wk in enumerate(w):
            g, kind = agent_grads[k], kinds[k]
            if kind == "nsisa":
                state["b"][i][k] = mu * state["b"][i][k] + g
                u = g + mu * state["b"][i][k]
                h = (newton_schulz5(u) if u.ndim == 2 else u) + state["pi"][i][k]
                q = h.abs() + eps
            else:
                h = g + state["pi"][i][k]
                state["v"][i][k] = beta2 * state["v"][i][k] + (1 - beta2) * h**2
                q = torch.sqrt(state["v"][i][k] / (1 - beta2 ** state["t"])) + eps
            w_i = wk - h / (sigma + rho * q)
            state["pi"][i][k] = state["pi"][i][k] + sigma * (w_i - wk)
            new_w[k] += alphas[i] * (sigma * w_i + state["pi"][i][k])
    state["w"] = [t / (sigma + lam) for t in new_w]


@pytest.mark.parametrize("kinds", [["sisa"] * 3, ["nsisa", "nsisa", "sisa"]])
def test_one_local_step_is_the_section2_step(kinds):
    gen = torch.Generator().manual_seed(0)
    w0 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    hp = dict(sigma=2.0, rho=10.0, lr=0.05)
    ref = ReferencePISA(w0, 2, preconditioner=kinds, l2_lambda=0.05, weight_decay=0.01, local_steps=1, **hp)
    zeros = [[torch.zeros_like(t) for t in w0] for _ in range(2)]
    oracle = dict(
        w=[t.clone() for t in w0], pi=copy.deepcopy(zeros), v=copy.deepcopy(zeros), b=copy.deepcopy(zeros), t=0
    )
    for step in range(12):
        lr = 0.05 * (0.5 + 0.5 * math.cos(step / 12))  # a schedule: σ, ρ scale by lr_ref / lr
        grads = [[torch.randn(s, generator=gen, dtype=torch.float64) + i for s in SHAPES] for i in range(2)]
        alphas = [1.0 + step % 3, 2.0]
        seen = []
        ref.step([lambda w, g=g, seen=seen: seen.append(w) or g for g in grads], alphas, lr=lr)
        for w_seen in seen:  # with one local step every agent's gradient is taken at the consensus point
            assert all(torch.equal(a, b) for a, b in zip(w_seen, oracle["w"]))
        section2_step(oracle, grads, alphas, lr, kinds, 2.0, 10.0, 0.05, lam=0.05, wd=0.01)
        assert ref.round_position == 0
        for a, b in zip(ref.w, oracle["w"]):
            assert torch.equal(a, b)
        for i in range(2):
            assert all(torch.equal(a, b) for a, b in zip(ref.pi[i], oracle["pi"][i]))


def quadratic_agents(centres):
    """F_i(w) = ½(w − c_i)²: the gradient w − c_i depends on the point, so it shows where it was taken."""
    return [lambda w, c=c: [w[0] - c] for c in centres]


def test_hand_checked_round_of_two_local_steps():
    # identity preconditioner, σ = ρ = 1: every local step is w_i ← w_i − h/2 with h = (w_i − c_i) + π_i + (w_i − w).
    ref = ReferencePISA([torch.zeros(())], 2, sigma=1.0, rho=1.0, preconditioner="identity", local_steps=2)
    fns = quadratic_agents([1.0, 3.0])
    ref.step(fns)  # agent 1: h = −1 → w_1 = 0.5;  agent 2: h = −3 → w_2 = 1.5
    assert ref.round_position == 1 and ref.w[0].item() == 0.0
    assert [ref.local[i][0].item() for i in range(2)] == [0.5, 1.5]
    assert [ref.pi[i][0].item() for i in range(2)] == [0.0, 0.0]  # duals move only at the round's end
    ref.step(fns)  # h = −0.5 + 0 + 0.5 = 0 and −1.5 + 0 + 1.5 = 0: both stay; π_i = w_i − w = 0.5, 1.5
    assert [ref.pi[i][0].item() for i in range(2)] == [0.5, 1.5]
    assert ref.w[0].item() == 2.0  # ½[(0.5 + 0.5) + (1.5 + 1.5)]: the minimiser of ½Σ(w − c_i)²
    assert ref.round_position == 0 and all(ref.local[i][0].item() == 2.0 for i in range(2))
    ref.step(fns)  # from w = 2: h = 1 + 0.5 = 1.5 → w_1 = 1.25;  h = −1 + 1.5 = 0.5 → w_2 = 1.75
    assert [ref.local[i][0].item() for i in range(2)] == [1.25, 1.75]
    ref.step(fns)  # h = 0.25 + 0.5 − 0.75 = 0, −1.25 + 1.5 − 0.25 = 0; π = 0.5 − 0.75, 1.5 − 0.25
    assert [ref.pi[i][0].item() for i in range(2)] == [-0.25, 1.25]
    assert ref.w[0].item() == 2.0  # the fixed point stays put while π_i moves toward −∇F_i(w*) = (−1, 1)


def test_variants_by_hand():
    fns = quadratic_agents([1.0, 3.0])
    # prox_sigma = σ is the plain update; prox_sigma = 0.5 changes the proximal term, the dual and the consensus.
    plain = ReferencePISA([torch.zeros(())], 2, sigma=1.0, rho=1.0, preconditioner="identity", local_steps=2)
    same = ReferencePISA(
        [torch.zeros(())], 2, sigma=1.0, rho=1.0, preconditioner="identity", local_steps=2, prox_sigma=1.0
    )
    for _ in range(6):
        plain.step(fns)
        same.step(fns)
    assert torch.equal(plain.w[0], same.w[0])
    ref = ReferencePISA(
        [torch.zeros(())],
        2,
        sigma=1.0,
        rho=1.0,
        preconditioner="identity",
        local_steps=2,
        prox_sigma=0.5,
        dual_damping=True,
        outer_lr=0.5,
    )
    ref.step(fns)  # w_1 = 0.5, w_2 = 1.5 (the denominator keeps σ + ρ = 2)
    ref.step(fns)  # h = −0.5 + 0.25 = −0.25 → w_1 = 0.625;  h = −1.5 + 0.75 = −0.75 → w_2 = 1.875
    # π_i = 0.5 w_i = 0.3125, 0.9375; consensus ½[(0.3125 + 0.3125) + (0.9375 + 0.9375)]/0.5 = 2.5;
    # outer step w = 0 + 0.5·(2.5 − 0) = 1.25; damped duals π_i = ½π_i
    assert ref.w[0].item() == 1.25
    assert [ref.pi[i][0].item() for i in range(2)] == [0.15625, 0.46875]


def test_centred_dual_by_hand():
    # The consensus averages the local points; π_i then moves by σ(w_i − w_new), so Σ π_i stays 0.
    ref = ReferencePISA(
        [torch.zeros(())], 2, sigma=1.0, rho=1.0, preconditioner="identity", local_steps=2, centred_dual=True
    )
    fns = quadratic_agents([1.0, 3.0])
    ref.step(fns)
    ref.step(fns)  # local points 0.5 and 1.5 as in the plain round; w = 1; π = (−0.5, 0.5)
    assert ref.w[0].item() == 1.0
    assert [ref.pi[i][0].item() for i in range(2)] == [-0.5, 0.5]
    ref.step(fns)  # from w = 1: h = 0 − 0.5 → w_1 = 1.25;  h = −2 + 0.5 → w_2 = 1.75
    assert [ref.local[i][0].item() for i in range(2)] == [1.25, 1.75]
    ref.step(fns)  # h = 0.25 − 0.5 + 0.25 = 0 and −1.25 + 0.5 + 0.75 = 0: both stay; w = 1.5
    assert ref.w[0].item() == 1.5
    assert [ref.pi[i][0].item() for i in range(2)] == [-0.75, 0.75]  # → −(∇F_i(w*) − mean) = (−1, 1)


def test_adamw_tensors_against_torch():
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    grads = [[torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(2)] for _ in range(6)]
    hp = dict(preconditioner="adamw", adamw_lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, lr=1.0)
    # H = 1: AdamW on the α-averaged gradient (mode B today).
    ref = ReferencePISA([w0], 2, local_steps=1, **hp)
    p = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([p], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        ref.step([lambda w, g=gi: [g] for gi in g], alphas=[1.0, 3.0])
        p.grad = 0.25 * g[0] + 0.75 * g[1]
        opt.step()
    torch.testing.assert_close(ref.w[0], p.detach(), rtol=1e-12, atol=1e-12)
    # H = 3: each agent runs its own AdamW; every round averages the weights (α-weighted), moments stay per agent.
    ref = ReferencePISA([w0], 2, local_steps=3, **hp)
    ps = [torch.nn.Parameter(w0.clone()) for _ in range(2)]
    opts = [torch.optim.AdamW([q], lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1) for q in ps]
    for step, g in enumerate(grads, 1):
        ref.step([lambda w, g=gi: [g] for gi in g], alphas=[1.0, 3.0])
        for q, o, gi in zip(ps, opts, g):
            q.grad = gi
            o.step()
        if step % 3 == 0:
            mean = 0.25 * ps[0].detach() + 0.75 * ps[1].detach()
            for q in ps:
                q.data.copy_(mean)
            torch.testing.assert_close(ref.w[0], mean, rtol=1e-12, atol=1e-12)


def test_zero_lr_is_a_no_op_and_keeps_the_round_position():
    ref = ReferencePISA([torch.ones(3)], 2, sigma=1.0, rho=1.0, lr=0.1, local_steps=3)
    fns = [lambda w: [torch.ones(3)], lambda w: [-torch.ones(3)]]
    ref.step(fns, lr=0.1)
    before = copy.deepcopy((ref.w, ref.local, ref.pi, ref.v, ref.t, ref.round_position))
    ref.step(fns, lr=0.0)
    after = (ref.w, ref.local, ref.pi, ref.v, ref.t, ref.round_position)
    assert repr(before) == repr(after)


def test_invalid_options_name_the_key():
    with pytest.raises(ValueError, match="local_steps=0"):
        ReferencePISA([torch.zeros(2)], local_steps=0)
    with pytest.raises(ValueError, match="'bogus'"):
        ReferencePISA([torch.zeros(2)], preconditioner="bogus")
    with pytest.raises(ValueError, match="adamw_lr"):
        ReferencePISA([torch.zeros(2)], preconditioner="adamw")
