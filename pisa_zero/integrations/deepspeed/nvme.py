"""ZeRO-Infinity (``offload_optimizer.device: "nvme"``) with PISA: a resume that reads back every state.

DeepSpeed keeps a swapped optimizer state in one file per state tensor, named after the state's key and its flat
partition's ``ds_id``; a checkpoint copies those files (``<tag>/offloaded_tensors/rank<N>``), and loading copies them
back into the swap folder and skips the optimizer's state dict. The swapper reads a state's file only for the
states it knows of, and it learns of them from ``optimizer.state`` when the partition is next swapped in. PISA
creates its state at its first step, so after a load the swapper knew none: the step made fresh zeros and the
saved duals and moments were never read (nor the step counters, which are never swapped). And a partition under
DeepSpeed's ``min_aio_bytes`` (1 MiB) is never swapped at all: its fp32 master weights and states live only in the
state dict that loading skips, so the run went on from the freshly built engine's weights.

:func:`restore_swapped_state` — run after DeepSpeed's ``load_checkpoint`` by the engine :func:`wrap_load_checkpoint`
returns — puts every state the checkpoint holds back into ``optimizer.state``: a state DeepSpeed swapped (an empty
tensor in its state dict) as a placeholder of the partition's size that takes no memory (a broadcast zero), which the
next swap-in replaces with the file's contents; a state it kept in memory (the 0-d step counters, the states of
partitions under DeepSpeed's ``min_aio_bytes``) from the state dict; so are the fp32 master partitions DeepSpeed
kept in memory, copied into the model's bit16 partitions after.
"""

from __future__ import annotations

import functools
import os

import torch


def restore_swapped_state(engine, load_dir: str, tag) -> None:
    """This rank's PISA state of checkpoint ``load_dir/tag`` back in ``engine.basic_optimizer.state`` (see above)."""
    if tag is None:
        with open(os.path.join(load_dir, "latest")) as f:
            tag = f.read().strip()
    path = engine._get_zero_ckpt_name(load_dir, tag)
    zero_state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
    saved = zero_state["optimizer_state_dict"]
    zero_opt, pisa = engine.optimizer, engine.basic_optimizer
    # fp32 master partitions DeepSpeed kept in memory (under min_aio_bytes) have no swap file: from the state dict,
    # then into the bit16 partitions and the whole (persistent) parameters, in the order DeepSpeed's load uses
    zero_opt._partition_all_parameters()
    masters = zip(zero_opt.fp32_partitioned_groups_flat, zero_state["fp32_flat_groups"])
    for sub_group, (flat, kept) in enumerate(masters):
        if kept.numel() and kept.numel() == flat.numel():
            flat.data.copy_(kept)
            zero_opt._reassign_or_swap_out_partitioned_parameters(sub_group)
    zero_opt._post_step(set())  # collective: gathers the persistent parameters again
    # the state dict numbers the partitions as DeepSpeed listed them in it: group by group, sub-groups in order
    sub_groups = range(len(zero_opt.fp32_partitioned_groups_flat))
    order = [sg for g in range(len(pisa.param_groups)) for sg in sub_groups if zero_opt.sub_group_to_group_id[sg] == g]
    if set(saved["state"]) - set(range(len(order))):
        raise ValueError(f"pisa_zero: {path} holds the state of partitions {sorted(saved['state'])}; this rank has "
                         f"{len(order)}: not a checkpoint of this model at this world size")  # fmt: skip
    for index, state in saved["state"].items():
        sub_group = order[index]
        flat = zero_opt.fp32_partitioned_groups_flat[sub_group]
        numel = int(zero_opt.fp16_partitioned_groups_flat_numel[sub_group])
        restored = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.numel() == 0:  # swapped: its file holds it
                restored[key] = torch.zeros((), dtype=value.dtype).expand(numel)
            else:
                restored[key] = value.clone() if torch.is_tensor(value) else value
        pisa.state[flat] = restored


def wrap_load_checkpoint(engine) -> None:
    """``engine.load_checkpoint`` followed by :func:`restore_swapped_state` when it loaded the optimizer states."""
    load = engine.load_checkpoint

    @functools.wraps(load)
    def load_checkpoint(load_dir, tag=None, *args, **kwargs):
        result = load(load_dir, tag, *args, **kwargs)
        load_optimizer_states = kwargs.get("load_optimizer_states", args[1] if len(args) > 1 else True)
        load_module_only = kwargs.get("load_module_only", args[3] if len(args) > 3 else False)
        if result[0] is not None and load_optimizer_states and not load_module_only:
            restore_swapped_state(engine, load_dir, tag)
        return result

    engine.load_checkpoint = load_checkpoint
