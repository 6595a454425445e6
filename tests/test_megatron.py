"""Megatron-core: PISA in Megatron's DistributedOptimizer, the GPT launch script, checkpoints.

Three tiers (see tests/README.md):

- CPU, no shim: parallel-state groups, GPTModel forward/backward (TP=1 == TP=2), PISA param groups from Megatron's
  helpers with config overrides, the factory's argument validation, the launch script's ``--help`` (its flag checks,
  stops and damaged-checkpoint refusals: tests/test_megatron_launch.py).
- CPU under ``tests/megatron_shim.py`` (device placement only; Megatron's DDP/DistributedOptimizer/dist_checkpointing
  are CUDA-only): one 2-rank run checks DistributedOptimizer PISA == single-process PISA, the agreed non-finite skip,
  save → load → continue bit-exact with per-parameter steps (dp_reshardable and fully_reshardable); one 1-rank run
  loads the 2-rank checkpoint (DP 2 → 1) and continues; the launch script trains, saves and resumes on 2 ranks.
- ``gpu``-marked in tests/test_megatron_gpu.py: the same on CUDA/NCCL, unpatched.

Multi-rank runs are spawned once per world size (module-scoped fixtures); each scenario is its own test id.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from distributed import require, run_distributed  # noqa: E402

megatron = require("megatron.core", "megatron-core", extra="megatron")

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16"]
PISA_OPTIONS = dict(preconditioner="sisa", other_preconditioner="adamw", sigma=30.0, rho=100.0)
NSISA_OPTIONS = dict(preconditioner="nsisa", other_preconditioner="adamw", sigma=30.0, rho=100.0)


def _quiet():
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("megatron").setLevel(logging.ERROR)


def _tiny_model(seed: int, tp: int = 1, vocab: int = 128, fp16: bool = False):
    """A 2-layer GPTModel, fp32 (or fp16 in Megatron's Float16Module), CPU-initialised from ``seed``."""
    import pretrain_gpt_pisa as script

    args = script.parse_args([*TINY, "--tensor-model-parallel-size", str(tp), *(["--fp16"] if fp16 else [])])
    torch.manual_seed(seed)
    return script.build_model(args, vocab, on_gpu=False)


def _batch(step: int, rows: slice | None = None):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, 128, (4, 17), generator=g)
    tokens = tokens if rows is None else tokens[rows]
    x, y = tokens[:, :-1], tokens[:, 1:]
    return x, torch.arange(16).expand(len(x), 16), y


def _opt_config(**kw):
    from megatron.core.optimizer import OptimizerConfig

    base = dict(lr=1e-3, min_lr=1e-4, weight_decay=0.1, clip_grad=1.0, use_distributed_optimizer=True)
    return OptimizerConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------- CPU, no shim
def _no_shim_body(rank, world):
    _quiet()
    from megatron.core import parallel_state as ps

    from pisa_zero.integrations.megatron import pisa_param_groups

    out = {}
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    out["groups"] = {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
    }
    x, pos, y = _batch(0)
    losses = {}
    for tp in (2, 1):
        if tp == 1:
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=1)
        _, model = _tiny_model(seed=0, tp=tp)
        loss = model(x, pos, None, labels=y).mean()
        loss.backward()
        norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None))
        losses[tp] = (loss.item(), norm.item() if tp == 1 else None)
    out["loss"] = losses

    # Megatron's param-group helpers + config overrides → PISA groups.
    from megatron.core.optimizer import ParamKey
    from megatron.core.optimizer_param_scheduler import ParamGroupOverride

    _, model = _tiny_model(seed=0)
    config = _opt_config(decoupled_lr=5e-4)
    overrides = {
        ParamKey(name="*.bias"): ParamGroupOverride(wd_mult=0.0),
        ParamKey(attr="is_embedding_or_output_parameter"): {"max_lr": 5e-4},
    }
    groups = pisa_param_groups([model], config, overrides, other_preconditioner="adamw", other_options={"eps": 1e-6})
    names = {id(p): n for n, p in model.named_parameters()}

    def summary(groups):
        return [
            {
                "preconditioner": g["preconditioner"],
                "wd_mult": g["wd_mult"],
                "lr": g["lr"],
                "schedule": (g["max_lr"], g["min_lr"]),
                "weight_decay": g["weight_decay"],
                "eps": g.get("eps"),
                "names": sorted(names[id(p)] for p in g["params"]),
            }
            for g in groups
        ]

    out["param_groups"] = summary(groups)
    aux = pisa_param_groups([model], _opt_config(), None, other_preconditioner="adamw", other_options={"lr": 2e-3})
    out["aux_lr_groups"] = summary(aux)
    # the auxiliary AdamW takes Megatron's adam_beta1/2 and adam_eps; other_options overrides them by key
    adam = _opt_config(adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-5)
    out["adam_groups"] = [
        [(g["preconditioner"], g.get("betas"), g.get("eps")) for g in pisa_param_groups([model], adam, None, **kw)]
        for kw in ({"other_preconditioner": "adamw"}, {"other_preconditioner": "adamw", "other_options": {"eps": 1e-4}})
    ]
    try:
        pisa_param_groups([model], config, overrides, other_preconditioner="adamw", other_options={"lr": 2e-3})
    except ValueError as e:
        out["aux_lr_conflict"] = str(e)
    out["n_params"] = len(names)
    return out


def _checkpoint_writer_body(rank, world):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    queue = filesystem_async._get_write_results_queue()  # what every dist_checkpointing save starts
    return queue._manager._process.pid


def test_megatron_checkpoint_writer_process_does_not_outlive_the_rank():
    """dist_checkpointing starts a multiprocessing Manager per rank that only atexit stops; ranks end with os._exit
    (gloo), so without the harness's cleanup each run left one orphaned ~270 MB process per rank."""
    psutil = require("psutil", extra="megatron")
    pids = run_distributed(_checkpoint_writer_body, 2, timeout=240)
    for pid in pids:
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, f"the checkpoint writer's manager (pid {pid}) outlived its rank"


@pytest.fixture(scope="module")
def no_shim():
    return run_distributed(_no_shim_body, 2, timeout=240)


def test_megatron_parallel_state_groups(no_shim):
    assert [r["groups"] for r in no_shim] == [{"tp": 2, "dp": 1, "tp_rank": 0}, {"tp": 2, "dp": 1, "tp_rank": 1}]


def test_megatron_gpt_forward_backward_tp2_equals_tp1(no_shim):
    for r in no_shim:
        loss_tp2, _ = r["loss"][2]
        loss_tp1, grad_norm = r["loss"][1]
        assert abs(loss_tp2 - loss_tp1) < 1e-5, (loss_tp2, loss_tp1)
        assert 4.0 < loss_tp1 < 6.0 and grad_norm > 0  # ~ln(128) at init; the backward reached the parameters


def test_megatron_pisa_param_groups_from_config_overrides(no_shim):
    groups = no_shim[0]["param_groups"]
    assert sum(len(g["names"]) for g in groups) == no_shim[0]["n_params"]  # every parameter exactly once
    assert any(g["names"] for g in groups if g["preconditioner"] == "sisa")
    for g in groups:  # (a split may be empty here: every rank keeps both halves of every Megatron group)
        matrices = [n for n in g["names"] if n.endswith("weight") and ("linear" in n)]
        if g["preconditioner"] == "sisa":
            assert g["names"] == matrices
            if g["names"]:
                assert g["wd_mult"] == 1.0 and g["weight_decay"] == pytest.approx(0.1) and g["lr"] == 1e-3
        else:
            assert g["preconditioner"] == "adamw" and g["eps"] == 1e-6 and not matrices
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["embedding.word_embeddings.weight"]["schedule"] == (5e-4, 1e-4)  # decoupled lr (embedding/output)
    bias = next(n for n in by_name if n.endswith("linear_qkv.bias"))
    assert by_name[bias]["wd_mult"] == 0.0 and by_name[bias]["weight_decay"] == 0.0
    norm = next(n for n in by_name if "layer_norm_weight" in n or "layernorm" in n)
    assert by_name[norm]["preconditioner"] == "adamw"


def test_megatron_aux_adamw_lr_moves_megatrons_schedule(no_shim):
    # the scheduler sets lr from max_lr/min_lr each step: an aux lr that only set 'lr' would be silently undone
    by_name = {n: g for g in no_shim[0]["aux_lr_groups"] for n in g["names"]}
    assert by_name["decoder.final_layernorm.weight"]["schedule"] == (2e-3, pytest.approx(2e-4))
    assert by_name["decoder.final_layernorm.weight"]["lr"] == 2e-3
    assert by_name["decoder.layers.0.mlp.linear_fc1.weight"]["schedule"] == (1e-3, 1e-4)
    assert "decoupled_lr" in no_shim[0]["aux_lr_conflict"]  # two lr sources for one parameter: refused


def test_megatron_aux_adamw_takes_adam_beta1_beta2_eps(no_shim):
    """OptimizerConfig's adam_beta1/2 and adam_eps reach the auxiliary AdamW groups (and only them);
    other_options' eps wins over adam_eps for its key alone."""
    from_config, overridden = no_shim[0]["adam_groups"]
    for groups, eps in ((from_config, 1e-5), (overridden, 1e-4)):
        assert {g[0] for g in groups} == {"sisa", "adamw"}
        for precond, betas, group_eps in groups:
            if precond == "adamw":
                assert (betas, group_eps) == ((0.8, 0.9), eps)
            else:
                assert (betas, group_eps) == (None, None)


@pytest.mark.parametrize(
    "kwargs, config, match",
    [
        ({"preconditioner": "nsisa"}, {}, "nsisa' needs other_preconditioner"),
        ({"preconditioner": "sisa", "other_preconditioner": "nsisa"}, {}, "nsisa is for the block matrices"),
        ({"other_preconditioner": "muon"}, {}, "other_preconditioner='muon'"),
        ({"sigmaa": 1.0}, {}, "unknown PISA option.*sigmaa"),
        ({"other_options": {"lr": 1e-3, "wd": 0.1}}, {}, "unknown keys \\['wd'\\]"),
        ({}, {"use_distributed_optimizer": False}, "use_distributed_optimizer=False"),
        ({}, {"lr": 0.0}, "config.lr=0.0"),
    ],
)
def test_megatron_factory_rejects_bad_arguments_before_any_work(kwargs, config, match):
    from pisa_zero.integrations.megatron import get_pisa_optimizer

    with pytest.raises(ValueError, match=match):
        get_pisa_optimizer(_opt_config(**config), [object()], **kwargs)  # the model chunk is never touched


def test_megatron_factory_rejects_bad_group_values():
    from pisa_zero.integrations.megatron.distributed_optimizer import check_sharding_type

    with pytest.raises(ValueError, match="fully_sharded_model_space"):
        check_sharding_type("fully_sharded_model_space")


def test_megatron_launch_script_help_lists_every_argument():
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "pretrain_gpt_pisa.py"), "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    import pretrain_gpt_pisa as script

    for action in script.parser()._actions:
        for flag in action.option_strings:
            assert flag in out.stdout, flag
        assert action.help, action.option_strings  # every flag explained
    for flag in ("--pisa-sigma", "--pisa-rho", "--pisa-preconditioner", "--tensor-model-parallel-size", "--bf16"):
        assert flag in out.stdout


# ------------------------------------------------------------------------------------ CPU under the device shim
def _megatron_pisa(
    seed: int, pisa: dict = PISA_OPTIONS, vocab: int = 128, experts: bool = False, fp16_model: bool = False, **config
):
    """GPTModel + Megatron DDP (distributed optimizer) + PISA from the factory, on the current parallel state.
    ``experts``: the MLP fc1 weights are marked expert-parallel (``allreduce=False``, as Megatron's MoE experts)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from pisa_zero.integrations.megatron import get_pisa_optimizer

    tconfig, model = _tiny_model(seed, vocab=vocab, fp16=fp16_model)
    for name, p in model.named_parameters():
        if experts and name.endswith("linear_fc1.weight"):
            p.allreduce = False
    ddp = DistributedDataParallel(
        tconfig, DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True), model
    )
    return ddp, get_pisa_optimizer(_opt_config(**config), [ddp], **pisa)


def _megatron_step(ddp, optimizer, step: int, rank: int, world: int):
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    per_rank = 4 // world
    x, pos, y = _batch(step, slice(rank * per_rank, (rank + 1) * per_rank))
    optimizer.scale_loss(ddp(x, pos, None, labels=y).float().mean()).backward()
    ddp.finish_grad_sync()
    return optimizer.step()


def _weights(module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def _steps(optimizer) -> list:
    """Every PISA shard's step tensor (value, identity) across the chained distributed optimizers."""
    return [
        (float(s["step"]), id(s["step"])) for opt in optimizer.chained_optimizers for s in opt.optimizer.state.values()
    ]


def _save(ddp, optimizer, path: str, fmt: str):
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(path)
    torch.distributed.barrier()
    model_sd = ddp.module.sharded_state_dict()
    sd = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata={"distrib_optim_sharding_type": fmt}),
    }
    dist_checkpointing.save(sd, path)
    torch.distributed.barrier()


def _load(ddp, optimizer, path: str, fmt: str):
    from megatron.core import dist_checkpointing

    model_sd = ddp.module.sharded_state_dict()
    metadata = {"distrib_optim_sharding_type": fmt}
    template = {"model": model_sd, "optimizer": optimizer.sharded_state_dict(model_sd, True, metadata=metadata)}
    loaded = dist_checkpointing.load(template, path)
    ddp.load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])


def _single_process_pisa(options: dict, world: int, clip: float, vocab: int = 128, steps: int = 3):
    """The reference: one process, plain PISA on the whole GPTModel, each half-batch's gradient halved and summed
    (DDP's arithmetic), torch's clip_grad_norm_; returns (model, pre-clip grad norms)."""
    from pisa_zero import PISA
    from pisa_zero.integrations.megatron import pisa_param_groups

    options = dict(options)
    kinds = {k: options.pop(k) for k in ("preconditioner", "other_preconditioner")}
    _, reference = _tiny_model(seed=0, vocab=vocab)
    optimizer = PISA(pisa_param_groups([reference], _opt_config(), None, **kinds), **options)
    norms = []
    for step in range(steps):
        halves = []
        for r in range(world):
            reference.zero_grad()
            x, pos, y = _batch(step, slice(r * 4 // world, (r + 1) * 4 // world))
            reference(x, pos, None, labels=y).mean().backward()
            halves.append({id(p): p.grad * (1.0 / world) for p in reference.parameters()})
        for p in reference.parameters():
            p.grad = halves[0][id(p)] + halves[1][id(p)] if world == 2 else halves[0][id(p)]
        norms.append(torch.nn.utils.clip_grad_norm_(reference.parameters(), clip or float("inf")).item())
        optimizer.step()
    return reference, norms


def _max_diff(a, b) -> float:
    wa, wb = _weights(a), _weights(b)
    return max((wa[n] - wb[n]).abs().max().item() for n in wa)


def _shim_body(rank, world, tmp):
    import megatron_shim

    megatron_shim.install()
    _quiet()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    out = {}
    # 1. Megatron DistributedOptimizer PISA on 2 ranks == one process running plain PISA on the same gradients
    #    (each half-batch's gradient halved, then summed: DDP's arithmetic), without and with gradient clipping.
    out["vs_single_process"] = {}
    for clip in (0.0, 1.0):
        ddp, optimizer = _megatron_pisa(seed=0, clip_grad=clip)
        norms = [_megatron_step(ddp, optimizer, step, rank, world)[1] for step in range(3)]
        reference, ref_norms = _single_process_pisa(PISA_OPTIONS, world, clip)
        out["vs_single_process"][clip] = {"max_diff": _max_diff(ddp.module, reference), "norms": (norms, ref_norms)}
        out["vs_single_process"][clip]["weights"] = (_weights(ddp.module), _weights(reference))
    out["moved"] = _max_diff(reference, _tiny_model(seed=0)[1])
    shards = [p for o in optimizer.chained_optimizers for g in o.optimizer.param_groups for p in g["params"]]
    out["shard_numel"] = sum(p.numel() for p in shards)
    out["model_numel"] = sum(p.numel() for p in ddp.module.parameters())
    out["state_keys"] = sorted({k for o in optimizer.chained_optimizers for s in o.optimizer.state.values() for k in s})

    # 1a. Expert-parallel parameters (DDP's allreduce=False; here the MLP fc1 weights, EP=1) get their own
    #     distributed optimizer over the expert-data-parallel group, chained after the dense one, as Megatron does.
    ddp, optimizer = _megatron_pisa(seed=0, experts=True, clip_grad=1.0)
    for step in range(3):
        assert _megatron_step(ddp, optimizer, step, rank, world)[0]
    reference, _ = _single_process_pisa(PISA_OPTIONS, world, 1.0)
    out["experts"] = {
        "max_diff": _max_diff(ddp.module, reference),
        "chained": [
            sorted({g["is_expert_parallel"] for g in o.optimizer.param_groups}) for o in optimizer.chained_optimizers
        ],
    }

    # 1b. NSISA + auxiliary AdamW: Newton–Schulz on whole matrices routed over the DP group == single process.
    #     Vocabulary 4096: the embedding fills rank 1's whole range, so rank 1 holds no matrix shard and must still
    #     take part in the routing collective.
    ddp, optimizer = _megatron_pisa(seed=0, pisa=NSISA_OPTIONS, vocab=4096, clip_grad=0.0)
    for step in range(3):
        assert _megatron_step(ddp, optimizer, step, rank, world)[0]
    reference, _ = _single_process_pisa(NSISA_OPTIONS, world, 0.0, vocab=4096)
    inner = optimizer.chained_optimizers[0].optimizer
    out["nsisa"] = {
        "max_diff": _max_diff(ddp.module, reference),
        "moved": _max_diff(reference, _tiny_model(0, vocab=4096)[1]),
        "matrix_shards": sum(len(g["params"]) for g in inner.param_groups if g["preconditioner"] == "nsisa"),
        "state_keys": sorted({k for s in inner.state.values() for k in s}),
    }
    path = os.path.join(tmp, "nsisa")
    _save(ddp, optimizer, path, "dp_reshardable")
    for step in range(3, 5):
        _megatron_step(ddp, optimizer, step, rank, world)
    uninterrupted = _weights(ddp.module)
    ddp2, optimizer2 = _megatron_pisa(seed=1, pisa=NSISA_OPTIONS, vocab=4096, clip_grad=0.0)
    _load(ddp2, optimizer2, path, "dp_reshardable")
    for step in range(3, 5):
        _megatron_step(ddp2, optimizer2, step, rank, world)
    out["nsisa"]["resume_bit_exact"] = all(torch.equal(uninterrupted[n], w) for n, w in _weights(ddp2.module).items())

    # 1c. fp16 with Megatron's dynamic loss scaler from 2**22: overflowing steps are skipped on every rank and leave
    #     weights and PISA untouched; the scaler backs off until steps go through.
    ddp, optimizer = _megatron_pisa(seed=0, fp16_model=True, fp16=True, initial_loss_scale=2.0**22)
    fp16 = []
    for step in range(10):
        before = _weights(ddp.module)
        ok, _, _ = _megatron_step(ddp, optimizer, step, rank, world)
        fp16.append((ok, all(torch.equal(before[n], w) for n, w in _weights(ddp.module).items())))
    out["fp16"] = {"steps": fp16, "scale": optimizer.get_loss_scale().item()}

    # 2. A NaN in one rank's shard only: every rank skips the step, nothing changes.
    ddp, optimizer = _megatron_pisa(seed=0)
    _megatron_step(ddp, optimizer, 0, rank, world)
    before, steps_before = _weights(ddp.module), _steps(optimizer)
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    x, pos, y = _batch(9, slice(rank * 2, rank * 2 + 2))
    ddp(x, pos, None, labels=y).mean().backward()
    ddp.finish_grad_sync()
    if rank == 0:
        dist_opt = optimizer.chained_optimizers[0]
        param = dist_opt.model_fp32_groups[0][0]
        param.main_grad.view(-1)[dist_opt._get_model_param_range_map(param)["param"].start] = float("nan")
    out["nonfinite_step"] = optimizer.step()
    out["nonfinite_unchanged"] = all(torch.equal(before[n], w) for n, w in _weights(ddp.module).items())
    out["nonfinite_steps_unchanged"] = [v for v, _ in _steps(optimizer)] == [v for v, _ in steps_before]
    out["skipped_counter"] = optimizer.chained_optimizers[0].optimizer.nonfinite_steps_skipped

    # 3. save after 3 steps → continue 2 steps; a fresh run (other init) loads and continues: bit-exact.
    out["resume"] = {}
    for fmt in ("dp_reshardable", "fully_reshardable"):
        ddp, optimizer = _megatron_pisa(seed=0)
        for step in range(3):
            _megatron_step(ddp, optimizer, step, rank, world)
        path = os.path.join(tmp, fmt)
        _save(ddp, optimizer, path, fmt)
        for step in range(3, 5):
            _megatron_step(ddp, optimizer, step, rank, world)
        uninterrupted = _weights(ddp.module)
        ddp2, optimizer2 = _megatron_pisa(seed=1)
        _load(ddp2, optimizer2, path, fmt)
        loaded_steps = _steps(optimizer2)
        for step in range(3, 5):
            _megatron_step(ddp2, optimizer2, step, rank, world)
        resumed = _weights(ddp2.module)
        out["resume"][fmt] = {
            "bit_exact": all(torch.equal(uninterrupted[n], resumed[n]) for n in resumed),
            "loaded_steps": sorted({v for v, _ in loaded_steps}),
            "distinct_step_tensors": len({i for _, i in loaded_steps}) == len(loaded_steps),
            "steps_after": sorted({v for v, _ in _steps(optimizer2)}),
        }
        if fmt == "dp_reshardable":
            out["resume_weights"] = {n: w for n, w in uninterrupted.items()}
    return out


def _reshard_body(rank, world, tmp, resume_weights):
    import megatron_shim

    megatron_shim.install()
    _quiet()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    ddp, optimizer = _megatron_pisa(seed=1)
    _load(ddp, optimizer, os.path.join(tmp, "dp_reshardable"), "dp_reshardable")
    steps = sorted({v for v, _ in _steps(optimizer)})
    for step in range(3, 5):
        _megatron_step(ddp, optimizer, step, rank, world)
    got = _weights(ddp.module)
    return {
        "steps": steps,
        "max_diff": max((got[n] - resume_weights[n]).abs().max().item() for n in got),
    }


def _unshimmed_reference_body(rank, world):
    """The single-process references of `_shim_body` part 1 computed without the device shim."""
    import megatron_shim

    assert not megatron_shim._installed  # forked from the test process, which never installs it
    _quiet()
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel()
    out = {}
    for clip in (0.0, 1.0):
        reference, norms = _single_process_pisa(PISA_OPTIONS, 2, clip)
        out[clip] = (_weights(reference), norms)
    return out


@pytest.fixture(scope="module")
def shim_runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("megatron_ckpt"))
    two = run_distributed(_shim_body, 2, tmp, timeout=300)
    one = run_distributed(_reshard_body, 1, tmp, two[0]["resume_weights"], timeout=300)
    return two, one


def test_megatron_shim_changes_no_numbers(shim_runs):
    """The shim moves tensors only: the single-process reference computed under it is bit-identical to the one
    computed without it (this process never installs it), and so Megatron's DistributedOptimizer PISA under the shim
    meets the unshimmed reference at the same bounds as the shimmed one."""
    two, _ = shim_runs
    (plain,) = run_distributed(_unshimmed_reference_body, 1, timeout=300)
    for clip, bound in ((0.0, 1e-7), (1.0, 1e-6)):
        weights, norms = plain[clip]
        for r in two:
            megatron, shimmed = r["vs_single_process"][clip]["weights"]
            assert all(torch.equal(shimmed[n], weights[n]) for n in weights), clip
            assert r["vs_single_process"][clip]["norms"][1] == norms
            assert max((megatron[n] - weights[n]).abs().max().item() for n in weights) < bound, clip


def test_megatron_distributed_optimizer_2_ranks_equals_single_process_pisa(shim_runs):
    two, _ = shim_runs
    for r in two:
        assert r["moved"] > 1e-3  # three steps really changed the weights (a lost weight decay alone is ~6e-6)
        assert r["vs_single_process"][0.0]["max_diff"] < 1e-7, r["vs_single_process"]
        # Clipping: Megatron sums the squared norm shard by shard, torch tensor by tensor; the clip factors differ
        # in the last bits (measured 2.5e-7 after 3 steps).
        assert r["vs_single_process"][1.0]["max_diff"] < 1e-6, r["vs_single_process"]
        norms, ref_norms = r["vs_single_process"][1.0]["norms"]
        assert norms == pytest.approx(ref_norms, rel=1e-6) and min(norms) > 1.0  # the clip was active
        assert r["state_keys"] == ["dual", "exp_avg", "exp_avg_sq", "second_moment", "step"]
    # ZeRO-1: each rank's PISA holds about half of the parameters (padding aside)
    assert sum(r["shard_numel"] for r in two) == pytest.approx(two[0]["model_numel"], rel=0.01)
    assert all(r["shard_numel"] < 0.6 * r["model_numel"] for r in two)


def test_megatron_expert_parallel_params_get_their_own_chained_optimizer(shim_runs):
    for r in shim_runs[0]:
        assert r["experts"]["chained"] == [[False], [True]]
        assert r["experts"]["max_diff"] < 1e-6, r["experts"]


def test_megatron_nsisa_whole_matrices_routed_equals_single_process(shim_runs):
    two, _ = shim_runs
    assert two[0]["nsisa"]["matrix_shards"] > 0 and two[1]["nsisa"]["matrix_shards"] == 0  # rank 1: embedding only
    for r in two:
        assert r["nsisa"]["moved"] > 1e-3
        assert r["nsisa"]["max_diff"] < 1e-7, r["nsisa"]  # measured 0.0: the same arithmetic, routed
        assert r["nsisa"]["resume_bit_exact"]
    assert two[0]["nsisa"]["state_keys"] == ["dual", "exp_avg", "exp_avg_sq", "momentum", "step"]


def test_megatron_fp16_loss_scaler_skips_overflow_then_trains(shim_runs):
    for r in shim_runs[0]:
        oks = [ok for ok, _ in r["fp16"]["steps"]]
        assert not oks[0] and oks[-1], oks  # 2**22 overflows fp16 first; the scaler halves it until steps go through
        assert all(unchanged for ok, unchanged in r["fp16"]["steps"] if not ok)
        assert not any(unchanged for ok, unchanged in r["fp16"]["steps"] if ok)
        assert r["fp16"]["scale"] < 2.0**22
    assert shim_runs[0][0]["fp16"] == shim_runs[0][1]["fp16"]  # the same decisions on both ranks


def test_megatron_nonfinite_shard_on_one_rank_skips_on_all_ranks(shim_runs):
    for r in shim_runs[0]:
        assert r["nonfinite_step"] == (False, None, None)
        assert r["nonfinite_unchanged"] and r["nonfinite_steps_unchanged"] and r["skipped_counter"] == 1


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable"])
def test_megatron_checkpoint_resume_bit_exact_with_per_param_steps(shim_runs, fmt):
    for r in shim_runs[0]:
        res = r["resume"][fmt]
        assert res["bit_exact"]
        assert res["loaded_steps"] == [3.0] and res["distinct_step_tensors"]
        assert res["steps_after"] == [5.0]  # +1 per step, not +N (Megatron hands all params one step tensor)


def test_megatron_checkpoint_saved_at_2_ranks_loads_at_1(shim_runs):
    _, one = shim_runs
    assert one[0]["steps"] == [3.0]
    assert one[0]["max_diff"] < 1e-6, one[0]["max_diff"]  # continues as the 2-rank run did (DP-sum rounding only)


# --------------------------------------------------------------------------------------- the launch script (shim)
LAUNCH_ITERS, LAUNCH_SAVE_AT = 8, 4  # the uninterrupted run; the first half saved, then resumed to the end


def _launch_body(rank, world, tmp):
    import contextlib
    import io

    import megatron_shim

    megatron_shim.install()
    _quiet()
    import pretrain_gpt_pisa as script

    common = [*TINY, "--micro-batch-size", "2", "--global-batch-size", "8", "--data-path", os.path.join(tmp, "data")]
    common += [
        "--bf16",
        "--pisa-preconditioner",
        "nsisa",
        "--pisa-aux-lr",  # the embeddings and output layer hold the bigrams to learn
        "1e-2",
        "--lr-warmup-iters",
        "1",
        "--lr-decay-iters",
        str(LAUNCH_ITERS),
        "--eval-interval",
        str(LAUNCH_SAVE_AT),
        "--eval-iters",
        "2",
        "--no-progress",
    ]
    board = ["--tensorboard-dir", os.path.join(tmp, "tb"), "--pisa-diagnostics-interval", "2"]
    iters, save_at, ckpt = str(LAUNCH_ITERS), str(LAUNCH_SAVE_AT), os.path.join(tmp, "ckpt")
    uninterrupted = script.main([*common, "--train-iters", iters, *board])
    first = script.main([*common, "--train-iters", save_at, "--save", ckpt])
    resumed = script.main([*common, "--train-iters", iters, "--load", ckpt, "--save", ckpt])
    # TP=2 (DP=1): Megatron's tensor-parallel layers with PISA on each TP rank's shards; nsisa is refused there
    tp2 = _tp_args(tmp, 2)
    tensor_parallel = script.main(tp2)
    err, refused = io.StringIO(), None
    try:
        with contextlib.redirect_stderr(err):
            script.main([*tp2, "--pisa-preconditioner", "nsisa"])
    except SystemExit:  # refused by the flag check, before any work
        refused = err.getvalue()
    return {
        "uninterrupted": uninterrupted,
        "first": first,
        "resumed": resumed,
        "tp2": tensor_parallel,
        "tp2_nsisa_refused": refused,
    }


def _tp_args(tmp, tp: int) -> list[str]:
    """The tensor-parallel run (fp32 sisa + AdamW, DP = 1 at either TP: the same batches)."""
    args = [*TINY, "--micro-batch-size", "2", "--data-path", os.path.join(tmp, "data"), "--no-progress"]
    args += ["--make-vocab-size-divisible-by", str(128 // tp)]  # Megatron pads to a multiple of this × TP: 128 both
    return [
        *args,
        "--tensor-model-parallel-size",
        str(tp),
        "--train-iters",
        "3",
        "--eval-interval",
        "3",
        "--eval-iters",
        "2",
    ]


def _tp1_body(rank, world, tmp):
    import megatron_shim

    megatron_shim.install()
    _quiet()
    import pretrain_gpt_pisa as script

    return script.main(_tp_args(tmp, 1))


@pytest.fixture(scope="module")
def launch_run(tmp_path_factory):
    """Learnable data: a fixed cycle through a permutation of the 100 tokens (every token has one successor), so
    the loss can fall far below ln(100) ≈ 4.6 — uniform random tokens cannot go below it."""
    import numpy as np

    tmp = tmp_path_factory.mktemp("megatron_launch")
    os.makedirs(tmp / "data")
    cycle = np.random.default_rng(0).permutation(100).astype(np.uint16)
    np.save(tmp / "data" / "train.npy", np.tile(cycle, 200))
    np.save(tmp / "data" / "val.npy", np.tile(np.roll(cycle, 37), 20))
    return tmp, run_distributed(_launch_body, 2, str(tmp), timeout=300)


def _train_losses(tmp) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_megatron_launch_script_trains_bf16_nsisa_on_2_ranks(launch_run):
    tmp, results = launch_run
    for r in results:
        u = r["uninterrupted"]
        assert u["iteration"] == LAUNCH_ITERS and u["val_loss"] is not None
    assert results[0]["uninterrupted"] == results[1]["uninterrupted"]  # logged values agree across ranks
    losses = _train_losses(tmp)
    # learnable data: the loss falls, below ln(100) — the best any model does on uniform random tokens of 100
    assert losses[LAUNCH_ITERS] < min(losses[1] - 0.5, math.log(100) - 0.2), losses
    assert losses[LAUNCH_ITERS] == pytest.approx(results[0]["uninterrupted"]["loss"], rel=1e-6)


def test_megatron_launch_script_tensor_parallel_2(launch_run):
    """TP = 2 (the two ranks hold halves of every parallel layer) == the same run at TP = 1 on one rank, within
    fp32 round-off: PISA's sisa and AdamW are elementwise, so sharding a tensor changes only reduction orders."""
    tmp, results = launch_run
    assert results[0]["tp2"] == results[1]["tp2"]  # both TP ranks report the same (DP-reduced) loss
    assert "tensor parallelism" in results[0]["tp2_nsisa_refused"]
    tp2, (tp1,) = results[0]["tp2"], run_distributed(_tp1_body, 1, str(tmp), timeout=300)
    assert tp2["iteration"] == tp1["iteration"] == 3
    assert tp2["loss"] == pytest.approx(tp1["loss"], rel=1e-5), (tp2, tp1)
    assert tp2["val_loss"] == pytest.approx(tp1["val_loss"], rel=1e-5), (tp2, tp1)


def test_megatron_launch_script_resume_matches_uninterrupted(launch_run):
    tmp, results = launch_run
    for r in results:
        assert r["first"]["iteration"] == LAUNCH_SAVE_AT
        assert r["first"]["checkpoint"].endswith(f"iter_{LAUNCH_SAVE_AT:07d}")
        assert r["resumed"]["iteration"] == LAUNCH_ITERS
        assert r["resumed"]["loss"] == r["uninterrupted"]["loss"]  # bit-exact continuation (bf16 model, fp32 main)
        assert r["resumed"]["val_loss"] == r["uninterrupted"]["val_loss"]
    ckpt = tmp / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(LAUNCH_ITERS)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        f"iter_{LAUNCH_SAVE_AT:07d}",
        f"iter_{LAUNCH_ITERS:07d}",
        "latest_checkpointed_iteration.txt",
    ]


def test_megatron_launch_script_writes_tensorboard_scalars(launch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, _ = launch_run
    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/skipped_step", "val/loss"} <= tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, LAUNCH_ITERS + 1))
    assert {"pisa/nsisa/primal_residual", "pisa/nsisa/dual_norm", "pisa/adamw/update_rms"} <= tags
    assert events.Scalars("train/lr")[0].value == 0.0  # warmup starts at lr 0 (PISA leaves everything as is)


def test_megatron_internals_the_wrapper_uses_exist():
    from pisa_zero.integrations.megatron.factory import check_megatron

    check_megatron()  # raises naming the missing attribute after a Megatron upgrade that renames one
