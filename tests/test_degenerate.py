"""Parameters a real model can contain — empty, one element, extreme aspect ratios, 3-D, frozen, shared between
modules — step as `pisa_zero.reference` says in every preconditioner and back end, or are refused with a message;
and a param-group key PISA would never read (a typo of one of its own) is refused by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import pisa_zero
from pisa_zero import PISA
from pisa_zero.reference import ReferencePISA

#: (name, shape): every one a model can hold (an empty expert, a 1×1 gate, a 4096×1 head, a conv kernel).
SHAPES = [("empty", (0,)), ("empty matrix", (0, 4)), ("one", (1,)), ("1x1", (1, 1)), ("tall", (512, 1)),
          ("wide", (1, 512)), ("3-D", (2, 3, 4)), ("plain", (6, 5))]  # fmt: skip
HP = dict(sigma=2.0, rho=10.0, l2_lambda=0.05, weight_decay=0.01)


@pytest.mark.parametrize("implementation", ["single", "foreach", "compiled"])
@pytest.mark.parametrize("preconditioner", ["sisa", "adagrad", "identity", "nsisa", "adamw"])
def test_degenerate_shapes_step_as_the_reference_says(preconditioner, implementation):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape)) for _, shape in SHAPES]
    extra = dict(lr=1e-2) if preconditioner == "adamw" else {}
    ref_extra = dict(adamw_lr=1e-2, lr=1e-2) if preconditioner == "adamw" else {}
    ref = ReferencePISA(params, preconditioner=preconditioner, **HP, **ref_extra)
    opt = PISA(params, preconditioner=preconditioner, implementation=implementation, **HP, **extra)
    gen = torch.Generator().manual_seed(1)
    for _ in range(8):
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        ref.step([lambda w, grads=grads: grads])
    for (name, _), p, r in zip(SHAPES, params, ref.w):
        assert p.shape == r.shape and torch.isfinite(p).all(), name
        if p.numel():
            err = ((p.detach().double() - r).norm() / r.norm()).item()
            assert err <= 1e-5, (name, err)


def test_shared_and_frozen_parameters_step_once_and_stay_put():
    """A Linear used twice (tied) is one parameter stepped once; a frozen one is never touched."""
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 4))
    model[3].weight.requires_grad_(False)
    frozen = model[3].weight.detach().clone()
    groups = pisa_zero.param_groups(model, matrix_options=HP, other_options=dict(lr=1e-2))
    assert sum(len(g["params"]) for g in groups) == 3  # shared weight + bias once, model[3].bias
    opt = PISA(groups)
    solo = nn.Parameter(shared.weight.detach().clone())
    ref = ReferencePISA([solo], preconditioner="nsisa", **HP)
    for step in range(4):
        model.zero_grad()
        model(torch.randn(8, 4, generator=torch.Generator().manual_seed(step))).square().sum().backward()
        grad = shared.weight.grad.clone()
        opt.step()
        ref.step([lambda w, grad=grad: [grad]])
    assert torch.equal(model[3].weight, frozen)
    assert ((shared.weight.detach().double() - ref.w[0]).norm() / ref.w[0].norm()).item() <= 1e-5


def test_a_parameter_listed_twice_is_refused():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="a parameter appears twice in param group 0"):
        PISA([p, p])
    with pytest.raises(ValueError, match="appears twice in param group 1"):
        PISA([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [p, p]}])


@pytest.mark.parametrize(
    "key, meant", [("sigmaa", "sigma"), ("prox_sigmaa", "prox_sigma"), ("ns_step", "ns_steps"), ("lrr", "lr")]
)
def test_a_param_group_key_pisa_would_never_read_is_refused(key, meant):
    with pytest.raises(ValueError, match=rf"unknown key '{key}' in param group 0: did you mean '{meant}'"):
        PISA([{"params": [nn.Parameter(torch.zeros(2))], key: 1.0}])


def test_hosts_keys_in_param_groups_are_kept():
    """Megatron's and the schedulers' own keys, and a name, are not PISA's to refuse."""
    host = dict(wd_mult=1.0, lr_mult=1.0, max_lr=1e-3, min_lr=1e-4, is_expert_parallel=False, initial_lr=1e-3, name="x")
    opt = PISA([{"params": [nn.Parameter(torch.zeros(2))], **host}])
    assert all(opt.param_groups[0][k] == v for k, v in host.items())
