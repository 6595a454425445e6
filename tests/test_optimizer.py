"""PISA (the fast optimizer) against pisa_zero.reference (the slow one), and the host-framework contract."""

import copy
import io
import math
import re

import pytest
import torch

from pisa_zero import PISA, grads_are_finite
from pisa_zero.reference import ReferencePISA

PRECONDITIONERS = ["sisa", "adagrad", "identity", "nsisa"]
IMPLEMENTATIONS = ["single", "foreach", "compiled"]
SHAPES = [(12, 7), (7, 12), (12, 7), (9,), (3, 4, 2)]  # same-shape matrices batch in NS; a 3-D tensor skips NS


def make_params(seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def grad_stream(params, seed=1):
    gen = torch.Generator().manual_seed(seed)
    while True:
        yield [torch.randn(p.shape, generator=gen) * 0.5 + 0.1 for p in params]


def run_pair(preconditioner, implementation, steps=50, state_dtype=None, lr_schedule=None, **hp):
    params = make_params()
    ref = ReferencePISA(params, preconditioner=preconditioner, **hp)
    opt = PISA(params, preconditioner=preconditioner, implementation=implementation, state_dtype=state_dtype, **hp)
    stream = grad_stream(params)
    for t in range(steps):
        grads = next(stream)
        lr = None
        if lr_schedule is not None:
            lr = lr_schedule(t)
            for group in opt.param_groups:
                group["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([lambda w, grads=grads: grads], lr=lr)
    return params, ref, opt


def max_rel_err(params, ref):
    return max(((p.detach().double() - r).norm() / r.norm()).item() for p, r in zip(params, ref.w))


HP = dict(sigma=2.0, rho=10.0, l2_lambda=0.05, weight_decay=0.01, eps=1e-8)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_matches_reference_fp32(preconditioner, implementation):
    params, ref, _ = run_pair(preconditioner, implementation, steps=60, **HP)
    assert max_rel_err(params, ref) <= 1e-6


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_matches_reference_bf16_state(preconditioner, implementation):
    # bf16 π/v/b round each store to 8 bits of mantissa: the documented trade-off is ~1e-2 relative drift.
    params, ref, opt = run_pair(preconditioner, implementation, steps=50, state_dtype=torch.bfloat16, **HP)
    assert opt.state[params[0]]["dual"].dtype == torch.bfloat16
    assert max_rel_err(params, ref) <= 2e-2


@pytest.mark.parametrize("implementation", ["single", "foreach", None])
@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_matches_reference_fp64(preconditioner, implementation):
    # float64 parameters get float64 arithmetic and state (as torch.optim): the reference in float64 to 1e-10.
    params = [torch.nn.Parameter(p.detach().double()) for p in make_params()]
    ref = ReferencePISA(params, preconditioner=preconditioner, **HP)
    opt = PISA(params, preconditioner=preconditioner, implementation=implementation, **HP)
    stream = grad_stream(params)
    for _ in range(30):
        grads = [g.double() for g in next(stream)]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([lambda w, grads=grads: grads])
    assert opt.state[params[0]]["dual"].dtype == torch.float64
    assert max_rel_err(params, ref) <= 1e-10


def test_mixed_dtype_group_steps_each_dtype_in_its_own_arithmetic():
    # one group holding fp64 and fp32 params: each tensor gets the step of a group of its own dtype
    shapes = [(5, 3), (4,)]
    mixed = [torch.nn.Parameter(torch.randn(s, dtype=dt)) for s, dt in zip(shapes, (torch.float64, torch.float32))]
    alone = [torch.nn.Parameter(p.detach().clone()) for p in mixed]
    opt_mixed = PISA(mixed, implementation="foreach", **HP)
    opts_alone = [PISA([p], implementation="foreach", **HP) for p in alone]
    for _ in range(5):
        for p, q in zip(mixed, alone):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt_mixed.step()
        for opt in opts_alone:
            opt.step()
    for p, q in zip(mixed, alone):
        assert p.dtype == q.dtype and torch.equal(p, q)


@pytest.mark.parametrize("preconditioner", PRECONDITIONERS)
def test_implementations_agree(preconditioner):
    finals = [run_pair(preconditioner, impl, steps=30, **HP)[0] for impl in IMPLEMENTATIONS]
    for other in finals[1:]:
        for a, b in zip(finals[0], other):
            assert ((a - b).norm() / a.norm()).item() <= 1e-6


def test_authors_scale_hyperparameters():
    # NSISA at the authors' GPT-2 setting and SISA at their ResNet setting stay within round-off of the reference.
    for preconditioner, hp in [("nsisa", dict(sigma=80.0, rho=100.0)), ("sisa", dict(sigma=0.1, rho=5e3))]:
        params, ref, _ = run_pair(preconditioner, None, steps=50, **hp)
        assert max_rel_err(params, ref) <= 1e-6


def test_lr_schedule_scales_sigma_and_rho():
    # A warm-up then decay schedule: the optimizer must follow σ_t = σ·lr_ref/lr_t, ρ_t = ρ·lr_ref/lr_t.
    lr_ref = 1.0 / (HP["sigma"] + HP["rho"])
    schedule = lambda t: lr_ref * min(1.0, (t + 1) / 10) * (0.5 if t > 30 else 1.0)  # noqa: E731
    params, ref, opt = run_pair("sisa", "foreach", steps=50, lr_schedule=schedule, **HP)
    assert max_rel_err(params, ref) <= 1e-6
    sigma_t, rho_t = opt.effective_hyperparameters(opt.param_groups[0])
    assert sigma_t == pytest.approx(HP["sigma"] * 2) and rho_t == pytest.approx(HP["rho"] * 2)


def test_first_step_bias_correction_closed_form():
    # At t = 1 from zero state: v̂ = h² exactly, so d = g/(σ + ρ(|g| + ε)) and w ← w − 2d (λ = 0).
    w0 = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g = torch.tensor([0.3, -1.0, 2.0, 0.0])
    sigma, rho, eps = 3.0, 7.0, 1e-3
    p = torch.nn.Parameter(w0.clone())
    p.grad = g.clone()
    opt = PISA([p], sigma=sigma, rho=rho, eps=eps, beta2=0.9)
    opt.step()
    d = g / (sigma + rho * (g.abs() + eps))
    torch.testing.assert_close(p.detach(), w0 - 2 * d, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["dual"], -sigma * d, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt.state[p]["second_moment"], 0.1 * g * g, rtol=1e-6, atol=1e-9)


def test_state_names_and_dtype():
    params = make_params()
    opt = PISA([{"params": params[:2], "preconditioner": "nsisa"}, {"params": params[2:]}], sigma=1.0, rho=10.0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert set(opt.state[params[0]]) == {"step", "dual", "momentum"}
    assert set(opt.state[params[3]]) == {"step", "dual", "second_moment"}
    assert all(opt.state[p]["dual"].dtype == torch.float32 for p in params)


def test_state_dict_resume_is_bit_identical():
    def train(opt, params, stream, n):
        for _ in range(n):
            for p, g in zip(params, next(stream)):
                p.grad = g
            opt.step()

    hp = dict(sigma=2.0, rho=10.0, l2_lambda=0.01)
    params = make_params()
    groups = [{"params": params[:3], "preconditioner": "nsisa"}, {"params": params[3:], "preconditioner": "sisa"}]
    opt = PISA(groups, **hp)
    stream = grad_stream(params)
    train(opt, params, stream, 20)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    train(opt, params, stream, 20)
    uninterrupted = [p.detach().clone() for p in params]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_params = [torch.nn.Parameter(t) for t in saved["params"]]
    groups = [
        {"params": resumed_params[:3], "preconditioner": "nsisa"},
        {"params": resumed_params[3:], "preconditioner": "sisa"},
    ]
    resumed = PISA(groups, **hp)
    resumed.load_state_dict(saved["opt"])
    stream = grad_stream(params)
    for _ in range(20):
        next(stream)
    train(resumed, resumed_params, stream, 20)
    for a, b in zip(uninterrupted, resumed_params):
        assert torch.equal(a, b.detach())


def test_zero_lr_step_is_a_no_op():
    params = make_params()
    opt = PISA(params, sigma=2.0, rho=10.0, weight_decay=0.1, l2_lambda=0.1)
    for p, g in zip(params, next(grad_stream(params))):
        p.grad = g
    opt.step()
    before = copy.deepcopy((list(map(torch.Tensor.detach, params)), opt.state_dict()))
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    after = (list(map(torch.Tensor.detach, params)), opt.state_dict())
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    for key, state in before[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, after[1]["state"][key][name]), name


def test_flat_partitions_per_group_reproduce_per_tensor_step():
    """ZeRO-1/2 hand one flat 1-D slice per group and call step() once per group with only that group present."""
    params = make_params()
    flat_params = [torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params[:3]]).clone())]
    flat_params.append(torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in params[3:]]).clone()))
    for preconditioner in ["sisa", "adagrad", "identity"]:
        per_tensor = PISA([p for p in make_params()], preconditioner=preconditioner, **HP)
        tensors = per_tensor.param_groups[0]["params"]
        flat = [torch.nn.Parameter(t.detach().clone()) for t in flat_params]
        zero = PISA([{"params": [flat[0]]}, {"params": [flat[1]]}], preconditioner=preconditioner, **HP)
        all_groups = zero.param_groups
        stream = grad_stream(tensors)
        for _ in range(25):
            grads = next(stream)
            for p, g in zip(tensors, grads):
                p.grad = g
            per_tensor.step()
            flat[0].grad = torch.cat([g.reshape(-1) for g in grads[:3]])
            flat[1].grad = torch.cat([g.reshape(-1) for g in grads[3:]])
            for group in all_groups:  # DeepSpeed's _optimizer_step: one group visible per call
                zero.param_groups = [group]
                zero.step()
            zero.param_groups = all_groups
        expected = torch.cat([p.detach().reshape(-1) for p in tensors])
        torch.testing.assert_close(torch.cat([f.detach() for f in flat]), expected, rtol=1e-6, atol=1e-7)


def test_empty_groups_and_zero3_style_calls():
    """ZeRO-3 leaves every group's params empty except the sub-group being stepped."""
    params = make_params()
    opt = PISA([{"params": params[:2]}, {"params": params[2:]}], **HP)
    ref = PISA([{"params": [torch.nn.Parameter(p.detach().clone()) for p in params]}], **HP)
    stream = grad_stream(params)
    for _ in range(10):
        grads = next(stream)
        for p, r, g in zip(params, ref.param_groups[0]["params"], grads):
            p.grad, r.grad = g, g.clone()
        ref.step()
        lists = [g["params"] for g in opt.param_groups]
        for i in range(len(lists)):
            for j, group in enumerate(opt.param_groups):
                group["params"] = lists[j] if i == j else []
            opt.step()
        for group, saved in zip(opt.param_groups, lists):
            group["params"] = saved
    for p, r in zip(params, ref.param_groups[0]["params"]):
        assert torch.equal(p.detach(), r.detach())


def test_hyperparameters_are_reread_each_call():
    params = make_params(shapes=[(6,)])
    opt = PISA(params, sigma=2.0, rho=10.0, preconditioner="identity")
    params[0].grad = torch.ones(6)
    opt.param_groups[0]["sigma"] = 4.0
    opt.step()
    d = 1.0 / (4.0 + 10.0)  # identity: d = g/(σ+ρ) with the σ set after construction
    assert torch.allclose(opt.state[params[0]]["dual"], torch.full((6,), -4.0 * d))


def test_nsisa_refuses_flat_partitions():
    matrix = torch.nn.Parameter(torch.randn(4, 5))
    opt = PISA([matrix], preconditioner="nsisa")
    flat = torch.nn.Parameter(matrix.detach().reshape(-1).clone())
    flat.grad = torch.randn(20)
    opt.param_groups[0]["params"] = [flat]  # what ZeRO-1/2 do to the group
    with pytest.raises(ValueError, match="flat 1-D partition"):
        opt.step()
    partition = torch.nn.Parameter(torch.randn(10))
    partition.ds_shape = torch.Size([4, 5])  # a ZeRO-3 partition of a matrix
    partition.grad = torch.randn(10)
    opt = PISA([partition], preconditioner="nsisa")
    with pytest.raises(ValueError, match="Newton–Schulz cannot run on a slice"):
        opt.step()


def test_nsisa_on_vectors_uses_raw_nesterov_momentum():
    p = torch.nn.Parameter(torch.zeros(5))
    opt = PISA([p], preconditioner="nsisa", sigma=1.0, rho=1.0, momentum=0.9, eps=1e-8)
    g = torch.tensor([1.0, -2.0, 3.0, 0.5, 0.0])
    p.grad = g
    opt.step()
    u = g + 0.9 * g  # b = g after one step; Nesterov u = g + μ b
    d = u / (1.0 + (u.abs() + 1e-8))
    torch.testing.assert_close(opt.state[p]["dual"], -d)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(rho=-1.0), "rho"),
        (dict(beta2=1.0), "beta2"),
        (dict(beta2=-0.1), "beta2"),
        (dict(eps=0.0), "eps"),
        (dict(momentum=1.0), "momentum"),
        (dict(l2_lambda=-1.0), "l2_lambda"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(ns_steps=0), "ns_steps"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=0.0), "lr"),
        (dict(preconditioner="adam"), "preconditioner"),
        (dict(implementation="fused"), "implementation"),
        (dict(state_dtype=torch.float16), "state_dtype"),
        (dict(preconditioner="adamw"), "lr"),
        (dict(preconditioner="adamw", lr=1e-3, betas=(0.9, 1.0)), "betas"),
    ],
)
def test_validation_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"invalid {name}="):
        PISA([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma="thirty"), "sigma"),
        (dict(lr="abc"), "lr"),
        (dict(rho=None), "rho"),
        (dict(eps="1e-8"), "eps"),
        (dict(beta2=[0.9]), "beta2"),
        (dict(nesterov="yes"), "nesterov"),
        (dict(ns_steps=5.0), "ns_steps"),
        (dict(sigma=True), "sigma"),
        (dict(preconditioner="adamw", lr=1e-3, betas=("0.9", 0.95)), "betas"),
        (dict(preconditioner="adamw", lr=1e-3, betas=0.9), "betas"),
    ],
)
def test_wrong_types_name_the_argument(kwargs, name):
    # "must be real number, not str" named nothing; the message must name the key and the value
    value = repr(next(iter(kwargs.values())) if name != "betas" else kwargs["betas"])
    with pytest.raises(ValueError, match=rf"invalid {name}={re.escape(value)}"):
        PISA([torch.nn.Parameter(torch.zeros(2))], **kwargs)


BAD_GROUP_VALUES = [
    ("lr", float("nan")),
    ("lr", float("inf")),
    ("lr", -1e-3),
    ("lr", "abc"),
    ("eps", 0.0),
    ("weight_decay", float("nan")),
]
BAD_PISA_GROUP_VALUES = [
    ("sigma", 0.0),
    ("sigma", float("nan")),
    ("sigma", float("inf")),
    ("rho", float("nan")),
    ("rho", -1.0),
    ("beta2", 1.0),
    ("lr_ref", 0.0),
]


@pytest.mark.parametrize(
    "preconditioner, key, value",
    [("sisa", k, v) for k, v in BAD_GROUP_VALUES + BAD_PISA_GROUP_VALUES]
    + [("adamw", k, v) for k, v in BAD_GROUP_VALUES],
)
def test_group_values_written_after_construction_are_checked_at_step(preconditioner, key, value):
    # schedulers and users write groups: a bad value must stop step() naming the group and the key, before any
    # parameter or state changes (it used to give NaN weights, or step silently for lr < 0)
    params = make_params(shapes=[(3, 2), (4,)])
    opt = PISA([{"params": params[:1]}, {"params": params[1:], "preconditioner": preconditioner, "lr": 1e-2}], **HP)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    before = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=rf"invalid {key}={re.escape(repr(value))} in param group 1 at step\(\)"):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before[0], params))
    for k, state in before[1]["state"].items():
        for name, t in state.items():
            assert torch.equal(t, opt.state_dict()["state"][k][name])


def test_validation_applies_to_added_groups():
    opt = PISA([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="invalid rho=-5"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "rho": -5})


def test_nonfinite_gradient_never_reaches_state():
    params = make_params()
    opt = PISA(params, **HP)
    for p, g in zip(params, next(grad_stream(params))):
        p.grad = g
    opt.step()
    snapshot = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in params]
    params[1].grad = params[1].grad.clone()
    params[1].grad[0, 0] = float("nan")
    assert not grads_are_finite(params)
    opt.step()
    assert opt.nonfinite_steps_skipped == 1
    assert all(torch.equal(a, p.detach()) for a, p in zip(weights, params))
    for key, state in snapshot["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt.state_dict()["state"][key][name])
    params[1].grad[0, 0] = float("inf")
    assert not grads_are_finite(params)
    params[1].grad[0, 0] = 1.0
    assert grads_are_finite(params)


def test_adamw_group_matches_torch_adamw():
    params = make_params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = PISA(params, preconditioner="adamw", **hp)
    theirs = torch.optim.AdamW(twins, foreach=False, **hp)
    stream = grad_stream(params)
    for _ in range(30):
        for p, q, g in zip(params, twins, next(stream)):
            p.grad, q.grad = g, g.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_default_lr_is_reference_lr():
    opt = PISA([torch.nn.Parameter(torch.zeros(2))], sigma=30.0, rho=70.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    assert opt.param_groups[0]["lr_ref"] == pytest.approx(0.01)
    assert math.isclose(opt.effective_hyperparameters(opt.param_groups[0])[0], 30.0)


def test_init_state_materialises_without_stepping():
    params = make_params()
    opt = PISA(params, preconditioner="nsisa")
    opt.init_state()
    assert all(opt.state[p]["step"].item() == 0 and torch.all(opt.state[p]["momentum"] == 0) for p in params)
