"""Per-rank bodies of the DeepSpeed tests (run by tests/distributed.run_distributed on forked gloo CPU ranks)."""

from __future__ import annotations

import os

from tests.distributed import CrossAgentCalls

from . import common as C

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def train_and_gather(rank, world, cfg, steps, use_register=False, seed=0, path=False):
    """Train ``steps`` steps; return (consensus weights, rank-0 losses, effective (σ, ρ, lr) per step of group 0,
    info); ``path``: info["path"] holds every tensor's path length Σ_t ‖w_t − w_{t−1}‖ (common.path_lengths)."""
    engine = C.ds_engine(cfg, seed=seed, use_register=use_register)
    pisa = engine.basic_optimizer
    hyper, losses = [], []
    trajectory = [C.consensus_weights(engine)] if path else None
    for step in range(steps):
        g = pisa.param_groups[0]
        hyper.append((g["lr"], *pisa.effective_hyperparameters(g)) if g["lr"] else (0.0, float("inf"), float("inf")))
        losses += C.ds_train(engine, 1, start=step)
        if path:
            trajectory.append(C.consensus_weights(engine))
    info = {
        "optimizer_type": type(engine.optimizer).__name__,
        "basic_type": type(pisa).__name__,
        "n_partitions": len(C.consensus_partitions(engine)),
        "offload": bool(
            getattr(engine.optimizer, "cpu_offload", False) or getattr(engine.optimizer, "offload_optimizer", False)
        ),
        "state_keys": sorted({k for s in pisa.state.values() for k in s}),
        "path": C.path_lengths(trajectory) if path else None,
    }
    return C.consensus_weights(engine), losses, hyper, info


def save_resume(rank, world, cfg, ckpt_dir, steps_before, steps_after):
    """Train, save, train on (run A); fresh engine, load, train on (run B); also return the states at save time and
    the zero_to_fp32 export of the checkpoint."""
    import torch.distributed as dist

    engine = C.ds_engine(cfg)
    C.ds_train(engine, steps_before)
    engine.save_checkpoint(ckpt_dir, tag="t")
    at_save = C.consensus_weights(engine)
    states_at_save = C.pisa_states(engine)
    C.ds_train(engine, steps_after, start=steps_before)
    run_a = C.consensus_weights(engine)
    del engine
    engine = C.ds_engine(cfg, seed=123)  # different init: everything must come from the checkpoint
    engine.load_checkpoint(ckpt_dir, tag="t")
    loaded_states = C.pisa_states(engine)
    C.ds_train(engine, steps_after, start=steps_before)
    run_b = C.consensus_weights(engine)
    exported = None
    dist.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        exported = {k: v.clone() for k, v in get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag="t").items()}
    return {
        "at_save": at_save,
        "states_at_save": states_at_save,
        "loaded_states": loaded_states,
        "run_a": run_a,
        "run_b": run_b,
        "exported": exported,
    }


def load_converted(rank, world, cfg, folder, steps_after, start):
    """Fresh engine at this world size, load the converted folder, check the state, continue training."""
    from pisa_zero.deepspeed import load_universal

    engine = C.ds_engine(cfg, seed=321)
    meta = load_universal(engine, folder)
    loaded = C.pisa_states(engine)
    weights = C.consensus_weights(engine)
    C.ds_train(engine, steps_after, start=start)
    return {
        "loaded_states": loaded,
        "loaded_weights": weights,
        "final": C.consensus_weights(engine),
        "meta": meta,
        "global_steps": engine.global_steps,
    }


def many(rank, world, jobs):
    """Run several ``(name, function name, kwargs)`` checks in one process group (amortises process start-up)."""
    import sys

    out = {}
    module = sys.modules[__name__]
    for name, fn, kwargs in jobs:
        out[name] = getattr(module, fn)(rank, world, **kwargs)
    return out


def unhooked_nsisa(rank, world, cfg):
    """Plain ``deepspeed.initialize`` with a PISA(nsisa) callable and no pisa_zero hook: must refuse loudly."""
    import deepspeed

    from pisa_zero import PISA

    model = C.make_model()
    cfg = dict(cfg)
    cfg.pop("optimizer")
    cfg["zero_allow_untested_optimizer"] = True
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=lambda ps: PISA(ps, sigma=30.0, rho=100.0, preconditioner="nsisa"), config=cfg
    )
    try:
        C.ds_train(engine, 1)
    except ValueError as e:
        return str(e)
    return None


def _agent_train(engine, steps: int, start: int = 0, cross: list | None = None) -> None:
    """Each agent trains on its own data: agent a's batch at step t is batch(t·m + a), split over its k ranks.
    ``cross``: appended with the number of collectives reaching beyond this rank's agent inside each engine.step()."""
    topo = engine.basic_optimizer.consensus
    m, k = topo.agents, topo.shard_size
    for step in range(start, start + steps):
        x = C.batch(step * m + topo.agent_index, C.MICRO * k)
        xb = x[topo.shard_index * C.MICRO : (topo.shard_index + 1) * C.MICRO].to(engine.device)
        engine.backward(engine(xb, labels=xb).loss)
        if cross is None:
            engine.step()
            continue
        with CrossAgentCalls(range(topo.agent_index * k, (topo.agent_index + 1) * k)) as counter:
            engine.step()
        cross.append(counter.calls)


def mode_b(rank, world, cfg, agents, steps, via_json=False, ckpt_dir=None):
    """Mode B under DeepSpeed: ZeRO inside each agent (AgentMPU), PISA's consensus across agents. Returns the
    consensus weights, the engine's dp/mp sizes and, with ``ckpt_dir``, a same-topology save/resume check."""
    import pisa_zero.deepspeed as pds
    from pisa_zero.consensus import AgentTopology

    def build(seed=0):
        model = C.make_model(seed)
        if via_json:
            return pds.initialize(model=model, config=cfg)[0]
        return pds.initialize(model=model, config=cfg, topology=AgentTopology.build(agents))[0]

    engine = build()
    if ckpt_dir is None:
        _agent_train(engine, steps)
        return {"weights": C.consensus_weights(engine), "dp": engine.dp_world_size, "mp": engine.mp_world_size}
    half = steps // 2
    cross = []
    _agent_train(engine, half, cross=cross)
    engine.save_checkpoint(ckpt_dir, tag="b")
    _agent_train(engine, steps - half, start=half)
    run_a = C.consensus_weights(engine)
    engine = build(seed=7)
    engine.load_checkpoint(ckpt_dir, tag="b")
    _agent_train(engine, steps - half, start=half)
    run_b = C.consensus_weights(engine)
    out = {"weights": run_a, "resumed": run_b, "dp": engine.dp_world_size, "mp": engine.mp_world_size}
    return {**out, "cross_agent_calls": cross}


def _deepspeed_bf16_default_off() -> None:
    """DeepSpeed before 0.16.x had no bf16 ``check_grad_overflow`` (0.19.8 defaults it to true): turn its default
    off in this rank, so that a check that is on comes from the config pisa_zero prepared (an explicit key wins)."""
    from deepspeed.runtime import config as ds_runtime_config
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config

    def bf16_config(param_dict):
        return DeepSpeedBF16Config(**{"check_grad_overflow": False, **(param_dict.get("bf16") or {})})

    ds_runtime_config.get_bfloat16_config = bf16_config


#: where `nan_step` puts its NaN: one element, so that after the reduce-scatter one rank's partition holds it
NAN_PARAM = "transformer.h.1.mlp.c_fc.weight"


def nan_step(rank, world, cfg, steps, nan_at=None, leave_out=None):
    """Train ``steps`` steps; at ``nan_at = (step, rank)`` one element of that rank's `NAN_PARAM` gradient is NaN.
    ``leave_out``: a step whose batch is not fed at all (the reference: that step never happened). Returns the
    gathered fp32 weights, each rank's PISA step counters and skip count, and DeepSpeed's skipped steps."""
    import torch

    _deepspeed_bf16_default_off()
    engine = C.ds_engine(cfg)
    param = dict(engine.module.named_parameters())[NAN_PARAM]
    poison = [False]

    def hook(grad):
        if not poison[0]:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    param.register_hook(hook)
    for step in range(steps):
        if step == leave_out:
            continue
        poison[0] = nan_at == (step, rank)
        C.ds_train(engine, 1, start=step)
    poison[0] = False
    pisa = engine.basic_optimizer
    counters = sorted({int(s["step"]) for s in pisa.state.values() if "step" in s})
    return {
        "weights": C.consensus_weights(engine),
        "pisa_steps": counters,
        "pisa_skipped": pisa.nonfinite_steps_skipped,
        "ds_skipped": engine.skipped_steps,
        "check_grad_overflow": engine.optimizer.check_grad_overflow,
        "finite": all(bool(torch.isfinite(p).all()) for p in engine.module.parameters()),
    }


#: ZeRO-Infinity scenarios: a model wide enough (GPT-2 width 192, 0.9M parameters) that each rank's partition is
#: over DeepSpeed's 1 MiB ``min_aio_bytes``, so its optimizer state is really swapped to the NVMe folder
NVME_WIDTH = 192


def module_weights(engine) -> dict:
    """The model's (bit16) weights, gathered whole: the fp32 masters of an NVMe-swapped partition hold no data."""
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone().float()
    return out


def offload_run(rank, world, cfg, ckpt_dir, save_at, steps):
    """``steps`` steps with a save after ``save_at``; the weights at the end."""
    engine = C.ds_engine(cfg, width=NVME_WIDTH)
    C.ds_train(engine, save_at)
    engine.save_checkpoint(ckpt_dir, tag="t")
    C.ds_train(engine, steps - save_at, start=save_at)
    return module_weights(engine)


def offload_resume(rank, world, cfg, ckpt_dir, save_at, steps):
    """A fresh engine (another init) loads the save and trains on to ``steps``; the weights and PISA's step counters."""
    engine = C.ds_engine(cfg, seed=123, width=NVME_WIDTH)
    engine.load_checkpoint(ckpt_dir, tag="t")
    counters = sorted({int(s["step"]) for s in engine.basic_optimizer.state.values() if "step" in s})
    C.ds_train(engine, steps - save_at, start=save_at)
    return {"weights": module_weights(engine), "steps_after_load": counters}
