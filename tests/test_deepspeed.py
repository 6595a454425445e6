"""PISA under real DeepSpeed ZeRO-1/2/3 on 2 gloo CPU ranks (tiny transformers GPT-2 built outside zero.Init).

Every multi-rank check runs in forked ranks (tests/distributed.py) that share this process's imports; several checks
share one process group (tests/ds_scripts/checks.py `many`). Single-process references run here with one thread,
like the ranks, so that matmul reductions round the same way: the comparisons are then exact in practice; the
asserted bounds are the issue's (≤ 1e-6 relative in fp32).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.distributed import HeldPort, one_thread, require, run_distributed, run_scenarios  # noqa: E402

deepspeed = require("deepspeed", extra="deepspeed")
require("transformers", extra="transformers")

import pisa_zero  # noqa: E402
import pisa_zero.deepspeed as pds  # noqa: E402
from pisa_zero import PISA  # noqa: E402
from pisa_zero.integrations.deepspeed import config as ds_config  # noqa: E402
from pisa_zero.integrations.deepspeed import engine as ds_engine  # noqa: E402
from pisa_zero.integrations.deepspeed import layout as ds_layout  # noqa: E402
from tests.ds_scripts import checks as K  # noqa: E402
from tests.ds_scripts import common as C  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NSISA = {**C.NSISA_PARAMS, "implementation": "foreach"}


def nsisa_reference(model):
    """`NSISA` as plain PISA keywords: NSISA on the block matrices, AdamW (lr 3e-3, no weight decay) on the rest."""
    groups = pisa_zero.param_groups(
        model,
        matrix_preconditioner="nsisa",
        other_preconditioner="adamw",
        other_options={"lr": 3e-3, "weight_decay": 0.0},
    )
    return PISA(groups, sigma=30.0, rho=100.0, preconditioner="nsisa", implementation="foreach")


FP32_TOL = 1e-6
# bf16 model/gradients with fp32 master partitions vs the same run without bf16: every tensor's relative error
# against a bound from bf16's unit roundoff u = 2^-8 (tests/_consensus_common.bf16_bound): roundings · u · the
# tensor's path length in the reference / its norm, where roundings is what one step rounds in bf16 (counted:
# `bf16_step_roundings`). Loss-curve difference as before.
BF16_LOSS_TOL = 5e-2


def bf16_step_roundings(micro: int, clipping: bool = False) -> int:
    """The bf16 roundings of one DeepSpeed bf16 step on the tiny GPT-2: its micro-batch forward and backward
    (counted by tests/_consensus_common.bf16_roundings: 101 with torch 2.13/2.14 and transformers 5), the bf16 copy
    of the fp32 master weights (1), the reduction of the bf16 gradients over the ranks (2: the sum and the average)
    and, with clipping, the scaling by the clip coefficient (1)."""
    from tests._consensus_common import bf16_roundings

    model = C.make_model().to(torch.bfloat16)
    x = C.batch(0, micro)
    with one_thread():
        forward_backward = bf16_roundings(lambda: model(x, labels=x).loss.backward())
    return forward_backward + 1 + 2 + int(clipping)


def assert_bf16_tracks(got, ref, paths, roundings, what):
    """Every tensor of ``got`` (a bf16 run) within its bf16 bound of ``ref`` (the same run without bf16)."""
    errors = C.bf16_tensor_errors(got, ref, paths, roundings)
    over = {n: e for n, e in errors.items() if e[0] > e[1]}
    assert not over, f"{what}: (relative error, bound) over the bound: {over}"
    assert max(e for e, _ in errors.values()) > 0, f"{what}: bit-identical to the fp32 run: bf16 was not used"
    worst = max(errors, key=lambda n: errors[n][0] / errors[n][1])
    print(f"{what}: worst tensor {worst}: relative error {errors[worst][0]:.2e}, bound {errors[worst][1]:.2e}")
    return errors


def reference(cfg, steps, make_optimizer, world=2):
    """Single-process ``make_optimizer(model)`` (plain PISA keywords, not the JSON) with ``cfg``'s batches,
    clipping and scheduler: (weights, losses, optimizer)."""
    with one_thread():
        model, losses, opt = C.single_train(cfg, steps, world, make_optimizer)
    return {n: p.detach().clone() for n, p in model.named_parameters()}, losses, opt


# ------------------------------------------------------------------------------------------ fast, no processes
@pytest.mark.parametrize(
    "params, match",
    [
        ({"sigma": 1.0, "bogus": 3}, "bogus"),
        ({"sigma": -1.0}, "sigma"),
        ({"rho": float("nan")}, "rho"),
        ({"beta2": 1.5}, "beta2"),
        ({"preconditioner": "newton"}, "preconditioner"),
        ({"param_groups": "all"}, "param_groups"),
        ({"other_preconditioner": "adamw"}, "other_preconditioner"),
        ({"param_groups": "by_role", "other_options": {"lrr": 1e-3}}, "lrr"),
        ({"param_groups": "by_role", "other_options": {"betas": [0.9, 1.2]}}, "betas"),
        ({"state_dtype": "float8"}, "state_dtype"),
        ({"sigma": "thirty"}, r"optimizer\.params\.sigma='thirty'"),  # was "must be real number, not str" (no key)
        ({"lr": "abc"}, r"optimizer\.params\.lr='abc'"),
        ({"nesterov": "yes"}, r"optimizer\.params\.nesterov='yes'"),
        ({"param_groups": "by_role", "other_options": {"lr": "abc"}}, r"optimizer\.params\.other_options\.lr='abc'"),
        ({"param_groups": "by_role", "other_options": {"betas": 0.9}}, r"optimizer\.params\.other_options\.betas=0\.9"),
    ],
)
def test_bad_optimizer_params_fail_fast(params, match):
    cfg = C.ds_config(2, 2, params=params)
    with pytest.raises(ValueError, match=match):
        pds.initialize(model=torch.nn.Linear(2, 2), config=cfg)
    assert not torch.distributed.is_initialized()  # refused before any process-group work


def test_bad_zero_configs_fail_fast(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    few = {"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path), "buffer_count": 3}}
    with pytest.raises(ValueError, match=r"offload_optimizer\.buffer_count=3: .* expected an integer >= 4"):
        pds.initialize(model=model, config=C.ds_config(3, 2, params=NSISA, zero=few))
    from deepspeed.ops.op_builder.cpu.async_io import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)  # as without libaio
    nvme = C.ds_config(3, 2, zero={"offload_optimizer": {"device": "nvme", "nvme_path": str(tmp_path)}})
    with pytest.raises(ValueError, match="needs libaio: apt-get install libaio-dev"):
        pds.initialize(model=model, config=nvme)
    monkeypatch.undo()
    partial = C.ds_config(3, 2, zero={"offload_optimizer": {"device": "cpu", "ratio": 0.5}})
    with pytest.raises(ValueError, match="ratio"):
        pds.initialize(model=model, config=partial)
    with pytest.raises(ValueError, match="stage=0"):
        pds.initialize(model=model, config=C.ds_config(0, 2, params=NSISA, bf16={"enabled": True}))
    accum32 = C.ds_config(1, 2, params=NSISA, bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    with pytest.raises(ValueError, match="grad_accum_dtype"):
        pds.initialize(model=model, config=accum32)
    old = ds_layout.TESTED_DEEPSPEED
    ds_layout.TESTED_DEEPSPEED = ((0, 0),)
    try:  # a DeepSpeed version nobody checked the partition layout on: nsisa is refused, loudly, at initialize
        with pytest.raises(ValueError, match="TESTED_DEEPSPEED"):
            pds.initialize(model=model, config=C.ds_config(3, 2, params=NSISA))
    finally:
        ds_layout.TESTED_DEEPSPEED = old
    assert not torch.distributed.is_initialized()


def test_config_sources_and_flags(tmp_path):
    cfg = C.ds_config(3, 2, zero={"offload_optimizer": {"device": "cpu"}})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    loaded, ds_args = ds_config._load_config(type("A", (), {"deepspeed_config": str(path)})(), None)
    assert loaded == cfg and ds_args.deepspeed_config is None
    spec = ds_config.parse_pisa_params(loaded["optimizer"]["params"])
    out = ds_config.prepare_config(loaded, spec)
    assert out["zero_allow_untested_optimizer"] is True and out["zero_force_ds_cpu_optimizer"] is False
    user = dict(cfg, zero_allow_untested_optimizer=False)  # an explicit user setting is kept
    assert ds_config.prepare_config(user, spec)["zero_allow_untested_optimizer"] is False
    with pytest.raises(ValueError, match="both"):
        ds_config._load_config(type("A", (), {"deepspeed_config": str(path)})(), cfg)


def test_shipped_configs_parse():
    for stage in ("1", "2", "3", "3_offload", "3_nvme"):
        with open(os.path.join(ROOT, "configs", f"pisa_zero{stage}.json")) as f:
            cfg = json.load(f)
        assert pds.is_pisa_config(cfg)
        spec = pds.parse_pisa_params(cfg["optimizer"]["params"])
        assert spec.auto_groups and spec.matrix_preconditioner == "nsisa"
        ds_config.prepare_config(cfg, spec)
        model = C.make_model()
        opt, sched = pds.build_optimizer(model, cfg)
        assert [g["preconditioner"] for g in opt.param_groups] == ["nsisa", "adamw"]
        assert sched is not None


def test_register_is_reversible():
    original = deepspeed.initialize
    pds.register()
    pds.register()  # idempotent
    assert deepspeed.initialize is not original
    pds.unregister()
    assert deepspeed.initialize is original


# ------------------------------------------------------------------- optimizer.params, key by key (no processes)
# Every key a JSON ``optimizer.params`` block may hold, at a non-default value, and what it must set in the PISA that
# `pisa_zero.deepspeed.build_optimizer` builds — relative to the same JSON without that key — written out by hand:
# ``{(param group index, group key) or ("optimizer", attribute) or ("spec", field): value}``. Other keys of a row only
# make the key meaningful (``momentum`` is read by nsisa groups, ``prox_sigma`` needs local steps). The test below is
# parametrized over PISA_KEYS, GROUPING_KEYS and other_options' keys: a new PISA keyword without a row fails.
BY_ROLE = {"param_groups": "by_role"}
LOCAL = {"local_steps": 2}
ROWS = {
    "sigma": [
        ({"sigma": 7.0}, {(0, "sigma"): 7.0, (0, "lr"): 1 / 1007.0, (0, "lr_ref"): 1 / 1007.0}),
        (
            {**BY_ROLE, "sigma": 7.0},
            {(0, "sigma"): 7.0, (0, "lr"): 1 / 1007.0, (0, "lr_ref"): 1 / 1007.0, (1, "sigma"): 7.0},
        ),
    ],
    "rho": [({"rho": 60.0}, {(0, "rho"): 60.0, (0, "lr"): 1 / 61.0, (0, "lr_ref"): 1 / 61.0})],
    "lr": [({"lr": 0.02}, {(0, "lr"): 0.02, (0, "lr_ref"): 0.02})],
    "preconditioner": [
        ({"preconditioner": "adagrad"}, {(0, "preconditioner"): "adagrad"}),
        ({**BY_ROLE, "preconditioner": "sisa"}, {(0, "preconditioner"): "sisa"}),  # the matrices' default
    ],
    "beta2": [({"beta2": 0.99}, {(0, "beta2"): 0.99})],
    "momentum": [
        ({"preconditioner": "nsisa", "momentum": 0.8}, {(0, "momentum"): 0.8}),
        ({**BY_ROLE, "momentum": 0.8}, {(0, "momentum"): 0.8, (1, "momentum"): 0.8}),
    ],
    "nesterov": [({"preconditioner": "nsisa", "nesterov": False}, {(0, "nesterov"): False})],
    "eps": [({"eps": 1e-6}, {(0, "eps"): 1e-6})],
    "l2_lambda": [({"l2_lambda": 0.01}, {(0, "l2_lambda"): 0.01})],
    "weight_decay": [({"weight_decay": 0.1}, {(0, "weight_decay"): 0.1})],
    "ns_steps": [({"preconditioner": "nsisa", "ns_steps": 3}, {(0, "ns_steps"): 3})],
    "ns_dtype": [({"preconditioner": "nsisa", "ns_dtype": "float32"}, {(0, "ns_dtype"): "float32"})],
    "implementation": [({"implementation": "foreach"}, {("optimizer", "implementation"): "foreach"})],
    "state_dtype": [
        ({"state_dtype": "bfloat16"}, {("optimizer", "state_dtype"): torch.bfloat16}),
        ({"state_dtype": "bf16"}, {("optimizer", "state_dtype"): torch.bfloat16}),
    ],
    "betas": [
        ({"preconditioner": "adamw", "lr": 1e-3, "betas": [0.8, 0.9]}, {(0, "betas"): (0.8, 0.9)}),
        ({**BY_ROLE, "betas": [0.8, 0.9]}, {(0, "betas"): (0.8, 0.9), (1, "betas"): (0.8, 0.9)}),
    ],
    "skip_nonfinite": [({"skip_nonfinite": False}, {("optimizer", "skip_nonfinite"): False})],
    "local_steps": [
        (
            {"local_steps": 4},
            {("optimizer", "local_steps"): 4, (0, "prox_sigma"): None, (0, "centred_dual"): False}
            | {(0, "local_calls"): 0, (0, "round_tokens"): 0.0},  # a round's position, kept in the groups
        )
    ],
    "anchor_device": [({**LOCAL, "anchor_device": "cpu"}, {("optimizer", "anchor_device"): torch.device("cpu")})],
    "prox_sigma": [({**LOCAL, "prox_sigma": 5.0}, {(0, "prox_sigma"): 5.0})],
    "centred_dual": [({**LOCAL, "centred_dual": True}, {(0, "centred_dual"): True})],
    "param_groups": "see test_by_role_groups_route_block_matrices_and_the_rest",
    "matrix_preconditioner": [({**BY_ROLE, "matrix_preconditioner": "sisa"}, {(0, "preconditioner"): "sisa"})],
    "other_preconditioner": [
        (
            {**BY_ROLE, "other_preconditioner": "sisa"},  # no auxiliary lr then: PISA's 1/(σ+ρ)
            {(1, "preconditioner"): "sisa", (1, "lr"): 1 / 1001.0, (1, "lr_ref"): 1 / 1001.0},
        )
    ],
    "other_options": [
        (
            {**BY_ROLE, "other_options": {"lr": 7e-4, "weight_decay": 0.05}},
            {(1, "lr"): 7e-4, (1, "lr_ref"): 7e-4, (1, "weight_decay"): 0.05},
        )
    ],
    "agents": [({"agents": 3}, {("spec", "agents"): 3})],  # used by initialize (mode B; test_mode_b_agents_*)
    "routing_bytes": [({"preconditioner": "nsisa", "routing_bytes": 4096}, {("spec", "routing_bytes"): 4096})],
    # other_options.<key>: the auxiliary group (1) only
    "other_options.lr": [({**BY_ROLE, "other_options": {"lr": 7e-4}}, {(1, "lr"): 7e-4, (1, "lr_ref"): 7e-4})],
    "other_options.sigma": [
        (
            {**BY_ROLE, "other_preconditioner": "sisa", "other_options": {"sigma": 7.0}},
            {(1, "sigma"): 7.0, (1, "lr"): 1 / 1007.0, (1, "lr_ref"): 1 / 1007.0},
        )
    ],
    "other_options.rho": [
        (
            {**BY_ROLE, "other_preconditioner": "sisa", "other_options": {"rho": 60.0}},
            {(1, "rho"): 60.0, (1, "lr"): 1 / 61.0, (1, "lr_ref"): 1 / 61.0},
        )
    ],
    "other_options.betas": [({**BY_ROLE, "other_options": {"betas": [0.8, 0.9]}}, {(1, "betas"): (0.8, 0.9)})],
    "other_options.eps": [({**BY_ROLE, "other_options": {"eps": 1e-6}}, {(1, "eps"): 1e-6})],
    "other_options.weight_decay": [({**BY_ROLE, "other_options": {"weight_decay": 0.05}}, {(1, "weight_decay"): 0.05})],
    "other_options.beta2": [
        ({**BY_ROLE, "other_preconditioner": "sisa", "other_options": {"beta2": 0.99}}, {(1, "beta2"): 0.99})
    ],
    "other_options.momentum": [
        ({**BY_ROLE, "other_preconditioner": "nsisa", "other_options": {"momentum": 0.8}}, {(1, "momentum"): 0.8})
    ],
    "other_options.nesterov": [
        ({**BY_ROLE, "other_preconditioner": "nsisa", "other_options": {"nesterov": False}}, {(1, "nesterov"): False})
    ],
    "other_options.l2_lambda": [
        ({**BY_ROLE, "other_preconditioner": "sisa", "other_options": {"l2_lambda": 0.01}}, {(1, "l2_lambda"): 0.01})
    ],
    "other_options.ns_steps": [
        ({**BY_ROLE, "other_preconditioner": "nsisa", "other_options": {"ns_steps": 3}}, {(1, "ns_steps"): 3})
    ],
    "other_options.ns_dtype": [
        (
            {**BY_ROLE, "other_preconditioner": "nsisa", "other_options": {"ns_dtype": "float32"}},
            {(1, "ns_dtype"): "float32"},
        )
    ],
}
# The tiny GPT-2's block matrices, by name: what "by_role" routes to the matrix preconditioner (group 0).
BLOCK_MATRICES = {
    f"transformer.h.{i}.{m}.weight" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
}
JSON_KEYS = sorted(
    {*pds.PISA_KEYS, *ds_config.GROUPING_KEYS, *(f"other_options.{k}" for k in ds_config.GROUP_OPTION_KEYS), *ROWS}
)


def _without(params: dict, key: str) -> dict:
    """``params`` less ``key`` (``"other_options.lr"``: the lr of other_options)."""
    out = json.loads(json.dumps(params))
    if key.startswith("other_options."):
        out["other_options"].pop(key.split(".", 1)[1])
    else:
        out.pop(key)
    return out


def _built(model, params: dict):
    """build_optimizer's PISA for ``params`` (with local steps: initialize's path, on a one-agent topology, as
    build_optimizer has no agents to give it)."""
    if params.get("local_steps", 1) > 1:
        from pisa_zero.consensus import AgentTopology

        factory = ds_engine.optimizer_factory(pds.parse_pisa_params(params), model, consensus=AgentTopology())
        return factory(list(model.parameters()))
    return pds.build_optimizer(model, C.ds_config(2, 2, params=params))[0]


def _settings(opt, params: dict) -> dict:
    """Everything a row can set: each group's options, the optimizer's own attributes, the spec's agents."""
    out = {(i, k): v for i, g in enumerate(opt.param_groups) for k, v in g.items() if k != "params"}
    rounds = opt._rounds
    attrs = {"implementation": opt.implementation, "state_dtype": opt.state_dtype, "local_steps": opt.local_steps}
    attrs |= {"skip_nonfinite": opt.skip_nonfinite, "anchor_device": rounds.anchor_device if rounds else None}
    out.update({("optimizer", k): v for k, v in attrs.items()})
    out[("spec", "agents")] = pds.parse_pisa_params(params).agents
    out[("spec", "routing_bytes")] = pds.parse_pisa_params(params).routing_bytes
    return out


def test_optimizer_params_keys_are_the_pisa_keywords():
    """PISA_KEYS are PISA's constructor keywords but the ones a JSON cannot hold (objects)."""
    import inspect

    keywords = set(inspect.signature(PISA.__init__).parameters) - {"self", "params", "consensus", "orthogonalizer"}
    assert set(pds.PISA_KEYS) == keywords


@pytest.mark.parametrize("key", JSON_KEYS)
def test_every_optimizer_params_key_sets_exactly_its_value(key):
    """optimizer.params.<key> at a non-default value → the param groups / optimizer attributes hold exactly that
    value and nothing else changes (a misread key is invisible to the equality tests)."""
    accepted = {*pds.PISA_KEYS, *ds_config.GROUPING_KEYS, *(f"other_options.{k}" for k in ds_config.GROUP_OPTION_KEYS)}
    if key not in accepted:
        pytest.fail(f"ROWS[{key!r}]: not a key optimizer.params accepts (any more?)", pytrace=False)
    if key not in ROWS:
        pytest.fail(f"optimizer.params.{key} has no row in ROWS: add one (a non-default value -> what it sets)")
    if key == "param_groups":
        assert ROWS[key] == "see test_by_role_groups_route_block_matrices_and_the_rest"
        return
    model = C.make_model()
    for params, expected in ROWS[key]:
        base = _without(params, key)
        got, before = _built(model, params), _built(model, base)
        assert [[id(p) for p in g["params"]] for g in got.param_groups] == [
            [id(p) for p in g["params"]] for g in before.param_groups
        ], params
        new, old = _settings(got, params), _settings(before, base)
        missing = object()
        changed = {k: new.get(k, missing) for k in new.keys() | old.keys()}
        changed = {k: v for k, v in changed.items() if v != old.get(k, missing)}
        assert changed == expected, params


def test_by_role_groups_route_block_matrices_and_the_rest():
    """``"param_groups": "by_role"``: group 0 = the block matrices (nsisa), group 1 = everything else, once (AdamW at
    lr 3e-3 without weight decay unless other_options says otherwise)."""
    model = C.make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    opt = pds.build_optimizer(model, C.ds_config(2, 2, params=BY_ROLE))[0]
    assert len(opt.param_groups) == 2
    matrices, rest = ({names[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert matrices == BLOCK_MATRICES and len(opt.param_groups[0]["params"]) == 8
    assert rest == set(names.values()) - BLOCK_MATRICES and len(opt.param_groups[1]["params"]) == len(rest)
    g0, g1 = opt.param_groups
    assert g0["preconditioner"] == "nsisa" and (g0["sigma"], g0["rho"], g0["lr"]) == (1.0, 1000.0, 1 / 1001.0)
    assert g1["preconditioner"] == "adamw" and (g1["lr"], g1["weight_decay"], g1["betas"]) == (3e-3, 0.0, (0.9, 0.95))
    single = pds.build_optimizer(model, C.ds_config(2, 2, params={}))[0]  # without it: one sisa group of everything
    assert [g["preconditioner"] for g in single.param_groups] == ["sisa"]
    assert len(single.param_groups[0]["params"]) == len(names)


# ------------------------------------------------------------------------------------------ 2 CPU ranks
# Each test below is one launch of 2 ranks running all of its configurations (tests/distributed.run_scenarios), and
# reports one test id per configuration: a failing configuration no longer hides the others.
SCHED_COSINE = {
    "type": "WarmupCosineLR",
    "params": {"total_num_steps": 20, "warmup_num_steps": 5, "warmup_min_ratio": 0.1},
}
STAGE_CFGS = {
    "z1": C.ds_config(1, 2),
    "z2": C.ds_config(2, 2),
    "z3": C.ds_config(3, 2, zero={"sub_group_size": 3000}),
    "z2_accum_clip_sched": C.ds_config(2, 2, accum=2, gradient_clipping=0.5, scheduler=SCHED_COSINE),
}
NSISA_CFGS = {
    "z1": C.ds_config(1, 2, params=NSISA),
    "z2": C.ds_config(2, 2, params=NSISA),
    "z3": C.ds_config(3, 2, params=NSISA, zero={"sub_group_size": 3000}),
}
SCHEDS = {
    "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 4, "warmup_type": "linear"},
    "WarmupDecayLR": {"total_num_steps": 8, "warmup_min_lr": 0.0, "warmup_max_lr": 0.02, "warmup_num_steps": 3},
    "WarmupCosineLR": {"total_num_steps": 8, "warmup_num_steps": 3, "warmup_min_ratio": 0.0},
}
SCHED_CFGS = {name: C.ds_config(2, 2, scheduler={"type": name, "params": p}) for name, p in SCHEDS.items()}
SCHED_CFGS["fp32_z3"] = C.ds_config(3, 2, params=NSISA)
SCHED_CFGS["bf16_z3"] = C.ds_config(3, 2, params=NSISA, bf16={"enabled": True})
SCHED_CFGS["bf16_z2"] = C.ds_config(2, 2, params=NSISA, bf16={"enabled": True})  # gets check_grad_overflow
SCHED_CFGS["off_z2"] = C.ds_config(2, 2, zero={"offload_optimizer": {"device": "cpu"}})
SCHED_CFGS["off_z3"] = C.ds_config(3, 2, zero={"offload_optimizer": {"device": "cpu"}})
SCHED_CFGS["fp32_z2"] = C.ds_config(2, 2)
SCHED_STEPS = {name: 8 for name in SCHEDS} | {"fp32_z3": 20, "bf16_z3": 20, "bf16_z2": 20, "off_z2": 10, "off_z3": 10}
SCHED_STEPS["fp32_z2"] = 10


def _job(fn, **kwargs):
    return lambda rank, world: getattr(K, fn)(rank, world, **kwargs)


# bf16 at ZeRO-1/2 with a NaN in one element of rank 1's gradient at step 2 (tests/ds_scripts/checks.py nan_step):
# the run, the same run that never saw step 2's batch, and (ZeRO-2) the run with check_grad_overflow set off.
NAN_STEPS, NAN_AT = 4, (2, 1)  # (step, rank)
NAN_CFGS = {
    "z1": C.ds_config(1, 2, bf16={"enabled": True}),
    "z2": C.ds_config(2, 2, bf16={"enabled": True}),
    "z2_off": C.ds_config(2, 2, bf16={"enabled": True, "check_grad_overflow": False}),
}
NAN_JOBS = {f"nan_{k}": _job("nan_step", cfg=c, steps=NAN_STEPS, nan_at=NAN_AT) for k, c in NAN_CFGS.items()}
NAN_JOBS |= {
    f"nan_{k}_ref": _job("nan_step", cfg=NAN_CFGS[k], steps=NAN_STEPS, leave_out=NAN_AT[0]) for k in ("z1", "z2")
}

LAUNCHES = {
    "stages": lambda: {k: _job("train_and_gather", cfg=c, steps=20) for k, c in STAGE_CFGS.items()},
    "nsisa": lambda: (
        {k: _job("train_and_gather", cfg=c, steps=10) for k, c in NSISA_CFGS.items()}
        | {"unhooked": _job("unhooked_nsisa", cfg=C.ds_config(2, 2))}
    ),
    "schedulers": lambda: (
        {k: _job("train_and_gather", cfg=c, steps=SCHED_STEPS[k], path=k == "fp32_z3") for k, c in SCHED_CFGS.items()}
        | NAN_JOBS
    ),
}


@pytest.fixture(scope="module")
def ds_runs():
    runs = {}

    def results(launch, name, every_rank=False):
        if launch not in runs:
            try:
                runs[launch] = run_scenarios(LAUNCHES[launch](), 2, timeout=400)
            except Exception as e:  # kept: the launch's other tests fail with it instead of relaunching to timeout
                runs[launch] = e
        if isinstance(runs[launch], Exception):
            raise runs[launch]
        return runs[launch][name] if every_rank else runs[launch][name][0]

    return results


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_CFGS))
def test_zero_stages_match_single_process(ds_runs, name):
    """ZeRO-1/2/3 fp32 (sisa) == single-process PISA after 20 steps; ZeRO-2 also with gradient accumulation,
    clipping and a DeepSpeed WarmupCosineLR schedule; ZeRO-3 with several sub-groups."""
    w, losses, hyper, info = ds_runs("stages", name)
    ref, ref_losses, _ = reference(STAGE_CFGS[name], 20, C.sisa_reference)
    err = C.rel_err(w, ref)
    assert err <= FP32_TOL, (name, err)
    assert info["basic_type"] == "PISA" and info["state_keys"] == ["dual", "second_moment", "step"], info
    if name == "z3":
        assert info["n_partitions"] > 2  # several ZeRO-3 sub-groups, each its own step() call
        assert info["optimizer_type"] == "DeepSpeedZeroOptimizer_Stage3"
    if name == "z1":
        assert info["optimizer_type"] == "DeepSpeedZeroOptimizer"
    if name == "z2":
        assert losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*NSISA_CFGS, "unhooked"])
def test_nsisa_whole_matrices_on_zero_1_2_3(ds_runs, name):
    """NSISA (block matrices) + auxiliary AdamW (the rest) on ZeRO-1/2/3 == single-process, 10 steps; and the
    unhooked path (plain deepspeed.initialize with a PISA nsisa callable) refuses the flat partitions."""
    if name == "unhooked":
        message = ds_runs("nsisa", name)
        assert message is not None and "flat 1-D partition" in message
        return
    w, losses, _, info = ds_runs("nsisa", name)
    ref, _, ref_opt = reference(NSISA_CFGS[name], 10, nsisa_reference)
    assert [g["preconditioner"] for g in ref_opt.param_groups] == ["nsisa", "adamw"]
    err = C.rel_err(w, ref)
    assert err <= FP32_TOL, (name, err)
    assert {"momentum", "exp_avg", "exp_avg_sq", "dual"} <= set(info["state_keys"]), info


@pytest.mark.slow
@pytest.mark.parametrize("name", [*SCHEDS, "bf16_z3", "bf16_z2", "off_z2", "off_z3"])
def test_schedulers_bf16_and_offload(ds_runs, name):
    """DeepSpeed's WarmupLR / WarmupDecayLR / WarmupCosineLR drive σ, ρ through lr; bf16 ZeRO-2 and ZeRO-3 track
    fp32 tensor by tensor within bf16's bound (`assert_bf16_tracks`); CPU offload at ZeRO-2 and ZeRO-3 == no offload
    (bit-identical)."""
    res = lambda k: ds_runs("schedulers", k)  # noqa: E731
    if name in SCHEDS:
        sigma, rho = 2.0, 50.0
        lr_ref = 1.0 / (sigma + rho)
        w, _, hyper, _ = res(name)
        lrs = [h[0] for h in hyper]
        assert lrs[0] == 0.0 and max(lrs) > 0 and len(set(lrs)) > 3, (name, lrs)
        for lr, s, r in hyper:
            if lr > 0:
                assert s == pytest.approx(sigma * lr_ref / lr, rel=1e-12) and r == pytest.approx(rho * lr_ref / lr)
        ref, _, _ = reference(SCHED_CFGS[name], 8, C.sisa_reference)
        assert C.rel_err(w, ref) <= FP32_TOL, name
    elif name in ("bf16_z3", "bf16_z2"):  # every tensor within its bf16 bound of the fp32 ZeRO-3 run
        fp32_w, _, _, fp32_info = res("fp32_z3")
        assert_bf16_tracks(res(name)[0], fp32_w, fp32_info["path"], bf16_step_roundings(C.MICRO), name)
        if name == "bf16_z3":
            loss_gap = max(abs(a - b) for a, b in zip(res("bf16_z3")[1], res("fp32_z3")[1]))
            assert loss_gap <= BF16_LOSS_TOL, loss_gap
            assert res("bf16_z3")[1][-1] < res("bf16_z3")[1][0] - 0.3
    else:  # off_z2, off_z3
        assert res(name)[3]["offload"]
        w = res(name)[0]
        assert all(torch.equal(w[n], res("fp32_z2")[0][n]) for n in w), name


def test_bf16_check_grad_overflow_is_set_at_zero_1_2():
    """initialize's config: bf16 at ZeRO-1/2 gets ``bf16.check_grad_overflow: true`` (not at ZeRO-3, whose own
    check is always on, nor without bf16); a user's explicit false is kept."""
    spec = ds_config.parse_pisa_params({})
    for stage, bf16, expected in ((1, True, True), (2, True, True), (3, True, None), (2, False, None)):
        cfg = ds_config.prepare_config(C.ds_config(stage, 2, bf16={"enabled": bf16}), spec)
        assert cfg["bf16"].get("check_grad_overflow") is expected, (stage, bf16)
    cfg = ds_config.prepare_config(NAN_CFGS["z2_off"], spec)
    assert cfg["bf16"]["check_grad_overflow"] is False


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["z1", "z2"])
def test_bf16_nonfinite_gradient_skipped_on_every_rank(ds_runs, stage):
    """bf16 ZeRO-1/2 (sisa), a NaN in one element of rank 1's gradient at step 2: after the reduce-scatter only one
    rank's partition holds it. The ranks run with DeepSpeed's own default for bf16 ``check_grad_overflow`` turned
    off (as before DeepSpeed had the option), so the check is the one pisa_zero's config sets: DeepSpeed's global
    overflow test skips the step on both ranks before PISA sees it. Both ranks count one skipped step, their PISA
    step counters agree, and the weights are bit-identical to the same run that never saw step 2's batch."""
    runs = ds_runs("schedulers", f"nan_{stage}", every_rank=True)
    ref = ds_runs("schedulers", f"nan_{stage}_ref", every_rank=True)
    for r, q in zip(runs, ref):
        assert all(torch.equal(r["weights"][n], q["weights"][n]) for n in q["weights"]), stage
    for r in runs:
        assert (r["ds_skipped"], r["pisa_skipped"], r["pisa_steps"]) == (1, 0, [NAN_STEPS - 1]), r
        assert r["check_grad_overflow"] is True and r["finite"]


@pytest.mark.slow
def test_bf16_without_check_grad_overflow_ranks_diverge(ds_runs):
    """What the setting prevents: the same NaN with ``check_grad_overflow: false`` (explicit) reaches PISA, whose
    skip is the rank's own (no topology in mode A): the rank holding the NaN skips, the other steps; the step
    counters disagree and the weights leave the never-saw-it reference."""
    off = ds_runs("schedulers", "nan_z2_off", every_rank=True)
    ref = ds_runs("schedulers", "nan_z2_ref")
    assert all(r["check_grad_overflow"] is False and r["ds_skipped"] == 0 for r in off)
    assert sorted(r["pisa_skipped"] for r in off) == [0, 1]
    assert sorted(r["pisa_steps"][0] for r in off) == [NAN_STEPS - 1, NAN_STEPS]
    assert C.rel_err(off[0]["weights"], ref["weights"]) > 1e-3


def _offload_config(offload: str, params: dict, folder: str) -> dict:
    """ZeRO-3 in fp32 with the offload of configs/pisa_zero3_nvme.json (optimizer state and parameters on NVMe,
    its aio block; ``nvme_path`` set to ``folder``) or of pisa_zero3_offload.json (``offload="cpu"``)."""
    with open(os.path.join(ROOT, "configs", f"pisa_zero3_{'nvme' if offload == 'nvme' else 'offload'}.json")) as f:
        shipped = json.load(f)
    zero = {k: dict(v) for k, v in shipped["zero_optimization"].items() if k.startswith("offload_")}
    for block in zero.values():
        if block["device"] == "nvme":
            block["nvme_path"] = folder
    return C.ds_config(3, 2, params=params, zero=zero, **({"aio": shipped["aio"]} if "aio" in shipped else {}))


@pytest.mark.slow
@pytest.mark.parametrize("params", [C.SISA_PARAMS, C.NSISA_PARAMS], ids=["sisa", "nsisa_adamw"])
def test_nvme_offload_equals_cpu_offload_and_resumes_bit_for_bit(tmp_path, params):
    """ZeRO-Infinity as configs/pisa_zero3_nvme.json ships it: optimizer state and parameters on NVMe (a folder,
    through DeepSpeed's async I/O op) == CPU offload bit for bit over 6 steps; a save after step 3, loaded by fresh
    processes (new ranks, another init), continues bit for bit, PISA's step counters included. Each rank's
    partition is over DeepSpeed's 1 MiB min_aio_bytes (checks.NVME_WIDTH), so the state is really swapped; the swap
    folder is emptied before the resume, so everything comes from the checkpoint."""
    from deepspeed.accelerator import get_accelerator

    from tests.distributed import skip_or_fail

    if not get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False):
        skip_or_fail("needs DeepSpeed's async I/O op: apt-get install libaio-dev")
    weights = {}
    for offload in ("cpu", "nvme"):
        swap, ckpt = str(tmp_path / offload / "swap"), str(tmp_path / offload / "ckpt")
        cfg = _offload_config(offload, params, swap)
        (weights[offload],) = run_distributed(K.offload_run, 2, cfg, ckpt, 3, 6, timeout=600)[:1]
        shutil.rmtree(swap, ignore_errors=True)
        resumed = run_distributed(K.offload_resume, 2, cfg, ckpt, 3, 6, timeout=600)
        for r in resumed:
            assert r["steps_after_load"] == [3], (offload, r["steps_after_load"])
            assert all(torch.equal(r["weights"][n], weights[offload][n]) for n in weights[offload]), offload
    assert all(torch.equal(weights["nvme"][n], weights["cpu"][n]) for n in weights["cpu"])
    moved = max((weights["cpu"][n] - w).abs().max().item() for n, w in C.make_model(0, K.NVME_WIDTH).named_parameters())
    assert moved > 1e-3  # the six steps changed the weights


@pytest.mark.slow
def test_checkpoint_resume_convert_and_export():
    """Same world size: save/resume bit-identical (ZeRO-2, ZeRO-3 nsisa). 2 → 1 ranks through the PISA-aware
    conversion keeps π, v (and the nsisa momentum, AdamW moments) — not zeros — and continues identically;
    zero_to_fp32 exports the consensus weights."""

    tmp = tempfile.mkdtemp(prefix="pisa_ds_ckpt_")
    try:
        cfgs = {"z2": C.ds_config(2, 2), "z3n": C.ds_config(3, 2, params=NSISA, zero={"sub_group_size": 3000})}
        jobs = [
            (k, "save_resume", {"cfg": c, "ckpt_dir": os.path.join(tmp, k), "steps_before": 4, "steps_after": 4})
            for k, c in cfgs.items()
        ]
        res = run_distributed(_many, 2, jobs, timeout=400)[0]
        jobs1 = []
        for k, cfg in cfgs.items():
            r = res[k]
            assert all(torch.equal(r["run_a"][n], r["run_b"][n]) for n in r["run_a"]), k
            for n, st in r["states_at_save"].items():
                for key, t in st.items():
                    assert torch.equal(t, r["loaded_states"][n][key]), (k, n, key)
            exported = r["exported"]
            assert all(torch.equal(exported[n], r["at_save"][n]) for n in r["at_save"]), k
            # convert with the CLI, then load at 1 rank (same global batch: 2 micro-batches accumulated)
            out = os.path.join(tmp, k + "_uni")
            subprocess.run(
                [sys.executable, os.path.join(ROOT, "scripts", "pisa_ds_to_universal.py"), "--input_folder",
                 os.path.join(tmp, k), "--tag", "t", "--output_folder", out],
                check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120,
            )  # fmt: skip
            cfg1 = dict(cfg, train_batch_size=C.MICRO * 2, gradient_accumulation_steps=2)
            jobs1.append((k, "load_converted", {"cfg": cfg1, "folder": out, "steps_after": 4, "start": 4}))
        _nonfinite_checkpoints_are_refused(os.path.join(tmp, "z2"), os.path.join(tmp, "z2_uni"))
        res1 = run_distributed(_many_k, 1, jobs1, timeout=300)[0]
        for k in cfgs:
            r, r1 = res[k], res1[k]
            keys = set()
            for n, st in r["states_at_save"].items():
                for key, t in st.items():
                    keys.add(key)
                    assert torch.equal(t, r1["loaded_states"][n][key]), (k, n, key)
            nonzero = {key: any(float(st[key].abs().max()) > 0 for st in r1["loaded_states"].values() if key in st)
                       for key in keys}  # fmt: skip
            assert all(nonzero.values()), nonzero
            expected = {"dual", "second_moment"} if k == "z2" else {"dual", "momentum", "exp_avg", "exp_avg_sq"}
            assert keys == expected, keys
            assert all(torch.equal(r1["loaded_weights"][n], r["at_save"][n]) for n in r["at_save"])
            assert r1["global_steps"] == 8
            err = C.rel_err(r1["final"], r["run_a"])
            assert err <= FP32_TOL, (k, err)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _nonfinite_checkpoints_are_refused(zero_dir, converted):
    """A NaN in a ZeRO file is not converted, and a NaN in a converted file is not loaded: both named."""
    from pisa_zero.integrations.deepspeed import checkpoint as ds_checkpoint

    bad = zero_dir + "_nan"
    shutil.copytree(zero_dir, bad)
    optim_file = sorted(glob.glob(os.path.join(bad, "t", "*optim_states.pt")))[0]
    sd = torch.load(optim_file, weights_only=False)
    state = sd["optimizer_state_dict"]["base_optimizer_state"]["state"]
    with torch.no_grad():
        next(iter(state.values()))["dual"].view(-1)[0] = float("nan")
    torch.save(sd, optim_file)
    with pytest.raises(ValueError, match=r"dual holds inf/NaN; refusing to convert"):
        ds_checkpoint.convert_checkpoint(bad, bad + "_uni", tag="t")
    assert not os.path.exists(bad + "_uni")
    name = sorted(os.listdir(os.path.join(converted, "zero")))[0]
    file = os.path.join(converted + "_nan", "zero", name, "fp32.pt")
    shutil.copytree(converted, converted + "_nan")
    t = torch.load(file)["param"].detach()
    t.view(-1)[0] = float("inf")
    torch.save({"param": t}, file)
    with pytest.raises(ValueError, match=re.escape(file) + r" holds inf/NaN"):
        ds_checkpoint._read_param(converted + "_nan", name)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_unchanged_user_script_with_register_under_deepspeed_launcher(tmp_path):
    """Must-show: `DS_ACCELERATOR=cpu deepspeed --num_gpus 2 <plain script + register()> --deepspeed_config
    configs/pisa_zero3.json` trains with PISA (loss falls) and matches single-process PISA (shipped config: bf16 and
    clipping → every tensor within its bf16 bound, `assert_bf16_tracks`; the same config in fp32 without clipping →
    ≤ 1e-6)."""
    script = os.path.join(ROOT, "tests", "ds_scripts", "user_train.py")
    with open(os.path.join(ROOT, "configs", "pisa_zero3.json")) as f:
        shipped = json.load(f)
    fp32 = json.loads(json.dumps(shipped))
    fp32["bf16"] = {"enabled": False}
    fp32["gradient_clipping"] = 0.0  # DeepSpeed's and torch's clipping round differently (1 ulp, then amplified)
    fp32_path = tmp_path / "pisa_zero3_fp32.json"
    fp32_path.write_text(json.dumps(fp32))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    steps = 20
    results = {}
    for name, cfg_path in (("shipped", os.path.join(ROOT, "configs", "pisa_zero3.json")), ("fp32", str(fp32_path))):
        out = tmp_path / f"{name}.pt"
        with HeldPort() as held:  # no other run can take the port before rank 0 binds it
            cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(held.port), script,
                   "--deepspeed_config", cfg_path, "--steps", str(steps), "--out", str(out)]  # fmt: skip
            # generous: a 20-step launch took > 240 s on a loaded 2-core machine (the test's own timeout is 1500 s)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
            results[name] = torch.load(out, weights_only=False)
            # DeepSpeed's CPU all-reduce buffers (67 MB of RAM per rank) never outlive the run: initialize unlinks
            # them. Their exact names (csrc/cpu/comm/shm.cpp: uid, the run's MASTER_ADDR and MASTER_PORT, rank), read
            # while the port is still held: another user's or another run's buffers cannot match.
            addr, port = results[name]["master"]
            assert port == str(held.port), (port, held.port)
            names = [f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}" for rank in range(2)]
            left = [n for n in names if os.path.exists(os.path.join("/dev/shm", n))]
            assert left == [], left
    for name, cfg in (("shipped", shipped), ("fp32", fp32)):
        r = results[name]
        assert r["optimizer"] == "PISA" and r["preconditioners"] == ["nsisa", "adamw"]
        losses = r["losses"]
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses  # loss falls
        world = 2
        mb, accum = cfg["train_micro_batch_size_per_gpu"], cfg.get("gradient_accumulation_steps", 1)
        trajectory = []
        with one_thread():
            ref_model, _, _ = _user_reference(cfg, steps, world * mb * accum, trajectory)
        ref = {n: p.detach() for n, p in ref_model.named_parameters()}
        if name == "fp32":
            err = C.rel_err(r["weights"], ref)
            assert err <= FP32_TOL, (name, err)
        else:  # bf16 and clipping: every tensor within its bf16 bound of single-process (fp32) PISA
            roundings = bf16_step_roundings(mb, clipping=cfg["gradient_clipping"] > 0)
            errors = assert_bf16_tracks(r["weights"], ref, C.path_lengths(trajectory), roundings, "user script")
            err = max(e for e, _ in errors.values())
        print(f"user script {name}: largest relative tensor difference to single-process PISA {err:.2e}")


def _shipped_reference(model, params):
    """The shipped config's ``optimizer.params`` as plain PISA keywords, key by key by hand (not through the JSON
    parser): NSISA on the block matrices and the auxiliary AdamW on the rest."""
    by_hand = {"preconditioner", "sigma", "rho", "momentum", "ns_steps", "param_groups", "other_preconditioner"}
    by_hand |= {"other_options"}
    assert set(params) <= by_hand, f"{sorted(set(params) - by_hand)}: a key this reference does not map yet"
    other = params["other_options"]
    assert params["param_groups"] in ("by_role", "auto") and set(other) <= {"lr", "betas", "weight_decay"}, params
    groups = pisa_zero.param_groups(
        model,
        matrix_preconditioner=params["preconditioner"],
        other_preconditioner=params["other_preconditioner"],
        other_options={"lr": other["lr"], "betas": tuple(other["betas"]), "weight_decay": other["weight_decay"]},
    )
    return PISA(
        groups,
        sigma=params["sigma"],
        rho=params["rho"],
        preconditioner=params["preconditioner"],
        momentum=params["momentum"],
        ns_steps=params["ns_steps"],
    )


def _user_reference(cfg, steps, global_batch, trajectory=None):
    """Single-process PISA on the user script's batches; ``trajectory`` (a list) gets the weights before the first
    step and after every step."""
    from tests.ds_scripts import user_train as U

    snapshot = lambda: {n: p.detach().clone() for n, p in model.named_parameters()}  # noqa: E731
    model = U.build_model()
    if trajectory is not None:
        trajectory.append(snapshot())
    opt = _shipped_reference(model, cfg["optimizer"]["params"])
    sched = C.ds_scheduler(cfg, opt)
    clip = cfg.get("gradient_clipping", 0.0)
    mb = cfg["train_micro_batch_size_per_gpu"]
    n_chunks = global_batch // mb
    for step in range(steps):
        x = U.global_batch(step, global_batch)
        for chunk in x.split(mb):
            (model(chunk, labels=chunk).loss / n_chunks).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        if trajectory is not None:
            trajectory.append(snapshot())
    return model, None, opt


def _many(rank, world, jobs):

    return K.many(rank, world, jobs)


_many_k = _many


def _nsisa_adamw_by_hand(names):
    """`C.NSISA_PARAMS` written out by hand as `pisa_zero.reference` keywords (not through the JSON parser or
    `pisa_zero.param_groups`): nsisa (σ 30, ρ 100, momentum 0.95 Nesterov, 5 NS steps) on the block matrices by
    name, AdamW (lr 3e-3, betas (0.9, 0.95), eps 1e-8, no weight decay) on every other tensor."""
    by_role = {"param_groups": "by_role", "other_options": {"lr": 3e-3}}
    assert C.NSISA_PARAMS == {"sigma": 30.0, "rho": 100.0, "preconditioner": "nsisa", **by_role}, C.NSISA_PARAMS
    kinds = ["nsisa" if n in BLOCK_MATRICES else "adamw" for n in names]
    return {"sigma": 30.0, "rho": 100.0, "preconditioner": kinds, "adamw_lr": 3e-3, "betas": (0.9, 0.95)}


def _mode_b_reference(agents, k, steps, params, dtype):
    """The m-agent `pisa_zero.reference` fed the same per-agent batches (agent gradient = mean of its k ranks').
    ``params``: the reference's keywords, or a function of the parameter names that returns them."""
    from pisa_zero.reference import ReferencePISA

    model = C.make_model().to(dtype)
    names = [n for n, _ in model.named_parameters()]
    if callable(params):
        hp = params(names)
    else:
        hp = {k_: v for k_, v in params.items() if k_ not in ("implementation", "agents")}
    ref = ReferencePISA([p.detach() for p in model.parameters()], agents, dtype=dtype, **hp)
    for step in range(steps):
        fns = []
        for a in range(agents):
            x = C.batch(step * agents + a, C.MICRO * k)

            def grad_fn(w, x=x):
                ps = {n: wi.detach().requires_grad_() for n, wi in zip(names, w)}
                call = torch.func.functional_call
                loss = sum(call(model, ps, (xb,), {"labels": xb}).loss for xb in x.split(C.MICRO)) / k
                return torch.autograd.grad(loss, list(ps.values()))

            fns.append(grad_fn)
        ref.step(fns, alphas=[1.0] * agents)
    return dict(zip(names, ref.w))


@pytest.mark.slow
def test_mode_b_agents_under_deepspeed():
    """4 ranks = 2 agents × 2: DeepSpeed shards/averages inside an agent (AgentMPU as its mpu), PISA runs the
    consensus across agents. ZeRO-2 sisa (topology=), ZeRO-3 nsisa ("agents": 2 in the JSON) and ZeRO-2 NSISA +
    auxiliary AdamW (the "by_role" JSON) == the 2-agent float64 reference within 3× the reference's own fp32
    round-off; every rank holds the same consensus; same-topology save/resume is bit-identical. Clipping is refused
    in mode B."""
    sisa = {"sigma": 2.0, "rho": 50.0, "implementation": "foreach"}
    nsisa = {"sigma": 30.0, "rho": 100.0, "preconditioner": "nsisa", "implementation": "foreach"}
    tmp = tempfile.mkdtemp(prefix="pisa_ds_modeb_")
    try:
        jobs = [
            ("z2", "mode_b", {"cfg": C.ds_config(2, 2, params=sisa), "agents": 2, "steps": 6}),
            ("z3n", "mode_b", {"cfg": C.ds_config(3, 2, params=dict(nsisa, agents=2), zero={"sub_group_size": 3000}),
                               "agents": 2, "steps": 6, "via_json": True, "ckpt_dir": os.path.join(tmp, "ck")}),
            ("auto", "mode_b", {"cfg": C.ds_config(2, 2, params=dict(NSISA, agents=2)), "agents": 2, "steps": 4,
                                "via_json": True}),
            # local steps (H = 2): rounds close at calls 2, 4, 6; the checkpoint at call 3 is mid-round
            ("z2local", "mode_b", {"cfg": C.ds_config(2, 2, params=dict(sisa, agents=2, local_steps=2)), "agents": 2,
                                   "steps": 6, "via_json": True, "ckpt_dir": os.path.join(tmp, "ckl")}),
        ]  # fmt: skip
        res = run_distributed(_many, 4, jobs, timeout=400)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # "auto": NSISA + the auxiliary AdamW ("by_role" groups) in mode B: AdamW's step on the agents' averaged
    # gradient (the reference's H = 1 rule), against the reference built by hand from the keywords
    cases = (("z2", sisa, 6), ("z3n", nsisa, 6), ("z2local", dict(sisa, local_steps=2), 6))
    for name, params, steps in (*cases, ("auto", _nsisa_adamw_by_hand, 4)):
        w = [r[name]["weights"] for r in res]
        assert all(all(torch.equal(w[i][n], w[0][n]) for n in w[0]) for i in range(4)), name
        assert (res[0][name]["dp"], res[0][name]["mp"]) == (2, 2)
        with one_thread():
            r64 = _mode_b_reference(2, 2, steps, params, torch.float64)
            r32 = _mode_b_reference(2, 2, steps, params, torch.float32)
        err, roundoff = C.rel_err(w[0], r64), C.rel_err(r32, r64)
        assert err <= max(2e-6, 3 * roundoff), (name, err, roundoff)
    for name in ("z3n", "z2local"):  # z2local: saved mid-round, resumed bit-identically
        r = res[0][name]
        assert all(torch.equal(r["weights"][n], r["resumed"][n]) for n in r["weights"]), name
    # local steps: inside a round (calls 1, 3) no collective leaves the agent; the round's call 2 has them
    for r in res:
        calls = r["z2local"]["cross_agent_calls"]
        assert calls[0] == 0 and calls[2] == 0 and calls[1] > 0, calls
    with pytest.raises(ValueError, match="gradient_clipping"):
        pds.initialize(model=torch.nn.Linear(2, 2), config=C.ds_config(2, 2, params=dict(sisa, agents=2),
                                                                       gradient_clipping=1.0))  # fmt: skip
