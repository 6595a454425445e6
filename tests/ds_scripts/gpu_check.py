"""GPU checks of the DeepSpeed integration that the CPU machine cannot run (fp16 loss scaling needs an accelerator
with fp16; NCCL; CPU-offloaded partitions with an NCCL process group). One rank:

    DS_ACCELERATOR=cuda RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29555 \
        python tests/ds_scripts/gpu_check.py OUT.json

Prints and writes a JSON dict of measurements; exits non-zero when a check fails.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.ds_scripts import common as C  # noqa: E402

NSISA = C.NSISA_PARAMS


def run(cfg, steps):
    engine = C.ds_engine(cfg)
    losses = C.ds_train(engine, steps)
    info = {"skipped_steps": int(engine.skipped_steps), "device": str(engine.device)}
    scale = getattr(engine.optimizer, "loss_scale", None)
    info["loss_scale"] = float(scale) if scale is not None else None
    return C.consensus_weights(engine), losses, info


def nsisa_reference(model):
    """`NSISA` as plain PISA keywords (not through the JSON parser, which the DeepSpeed runs use)."""
    import pisa_zero

    other = {"lr": 3e-3, "weight_decay": 0.0}
    groups = pisa_zero.param_groups(
        model, matrix_preconditioner="nsisa", other_preconditioner="adamw", other_options=other
    )
    return pisa_zero.PISA(groups, sigma=30.0, rho=100.0, preconditioner="nsisa")


def single(cfg, steps, device="cuda"):
    model = C.make_model().to(device)
    opt = nsisa_reference(model)
    for step in range(steps):
        x = C.batch(step, C.MICRO).to(device)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().float().cpu() for n, p in model.named_parameters()}


def main(out_path: str) -> int:
    import deepspeed

    deepspeed.init_distributed()
    steps = 20
    res, ok = {}, True
    w32, l32, _ = run(C.ds_config(2, 1, params=NSISA), steps)
    ref = single(C.ds_config(2, 1, params=NSISA), steps)
    res["fp32_z2_nsisa_vs_single_rel"] = C.rel_err({k: v.cpu() for k, v in w32.items()}, ref)
    ok &= res["fp32_z2_nsisa_vs_single_rel"] <= 1e-3  # bf16 Newton–Schulz on CUDA in both
    w16, l16, info16 = run(C.ds_config(2, 1, params=NSISA, fp16={"enabled": True, "initial_scale_power": 16}), steps)
    res["fp16_z2_vs_fp32_rel"] = C.rel_err({k: v.cpu() for k, v in w16.items()}, {k: v.cpu() for k, v in w32.items()})
    res["fp16_info"] = info16
    res["fp16_loss_first_last"] = (l16[0], l16[-1])
    ok &= info16["loss_scale"] is not None and l16[-1] < l16[0] - 0.3
    wb, lb, infob = run(C.ds_config(3, 1, params=NSISA, bf16={"enabled": True}), steps)
    res["bf16_z3_vs_fp32_rel"] = C.rel_err({k: v.cpu() for k, v in wb.items()}, {k: v.cpu() for k, v in w32.items()})
    ok &= res["bf16_z3_vs_fp32_rel"] < 0.1 and lb[-1] < lb[0] - 0.3
    # Offloaded partitions step on the CPU, where Newton–Schulz runs in fp32 (bf16 on CUDA): compare with a
    # single-process run on the CPU, and report the distance to the GPU run.
    ref_cpu = single(C.ds_config(2, 1, params=NSISA), steps, device="cpu")
    for stage in (2, 3):
        wo, _, _ = run(C.ds_config(stage, 1, params=NSISA, zero={"offload_optimizer": {"device": "cpu"}}), steps)
        wo = {k: v.cpu() for k, v in wo.items()}
        res[f"offload_z{stage}_vs_single_cpu_rel"] = C.rel_err(wo, ref_cpu)
        res[f"offload_z{stage}_vs_gpu_fp32_rel"] = C.rel_err(wo, {k: v.cpu() for k, v in w32.items()})
        ok &= res[f"offload_z{stage}_vs_single_cpu_rel"] <= 1e-3
    res["ok"] = bool(ok)
    print(json.dumps(res, indent=1))
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    code = main(sys.argv[1])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)
