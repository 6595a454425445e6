"""A plain DeepSpeed training script whose only PISA line is ``pisa_zero.deepspeed.register()``.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/ds_scripts/user_train.py --deepspeed_config configs/pisa_zero3.json

Trains a tiny GPT-2 on a learnable token pattern, logs the rank-averaged loss, saves a DeepSpeed checkpoint and
exports the consensus weights with DeepSpeed's own zero_to_fp32 (rank 0 writes ``--out``).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

VOCAB, SEQ = 64, 16


def build_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, use_cache=False)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def global_batch(step: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


def main() -> None:
    import deepspeed
    import torch.distributed as dist

    import pisa_zero.deepspeed

    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args()

    pisa_zero.deepspeed.register()  # the only PISA-specific line

    torch.set_num_threads(1)
    model = build_model()
    engine, optimizer, _, scheduler = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
    world, rank = dist.get_world_size(), dist.get_rank()
    mb, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    losses = []
    for step in range(args.steps):
        x = global_batch(step, mb * accum * world)
        total = torch.zeros(())
        for a in range(accum):
            lo = (a * world + rank) * mb
            chunk = x[lo : lo + mb].to(engine.device)
            loss = engine(chunk, labels=chunk).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach().float().cpu() / accum
        dist.all_reduce(total)
        losses.append(float(total) / world)
        if rank == 0 and step % 10 == 0:
            print(f"step {step} loss {losses[-1]:.4f}", flush=True)
    ckpt = tempfile.mkdtemp(prefix="user_ckpt_") if rank == 0 else None
    box = [ckpt]
    dist.broadcast_object_list(box)
    engine.save_checkpoint(box[0], tag="final")
    dist.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(box[0], tag="final")
        basic = engine.basic_optimizer
        if args.out:
            torch.save(
                {
                    "losses": losses,
                    "weights": {k: v.clone() for k, v in weights.items() if k != "lm_head.weight"},
                    "optimizer": type(basic).__name__,
                    "preconditioners": [g["preconditioner"] for g in basic.param_groups],
                    # what names the run's /dev/shm buffers (DeepSpeed's CPU all-reduce): the test checks them
                    "master": (os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")),
                },
                args.out,
            )
        print(f"final loss {losses[-1]:.4f} (first {losses[0]:.4f}); optimizer {type(basic).__name__}", flush=True)
        import shutil

        shutil.rmtree(box[0], ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
