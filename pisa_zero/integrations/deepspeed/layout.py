"""ZeRO partition layouts: how DeepSpeed's flat fp32 partitions map onto parameters.

This is the one file that reads DeepSpeed's ZeRO internals for the optimizer (ZeRO-1/2: ``round_robin_bit16_offsets``
/ ``partition_size``; ZeRO-3: per-parameter ``ds_tensor`` partitions of a sub-group). The attributes read are checked
at install time (:func:`_check_deepspeed_internals`), so a DeepSpeed upgrade that renames them fails loudly at
``initialize`` (and in ``tests/test_deepspeed.py``); a DeepSpeed upgrade touches this file only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

#: DeepSpeed versions whose ZeRO internals the NSISA partition layout and the checkpoint conversion were checked on.
TESTED_DEEPSPEED = ((0, 19),)


def check_deepspeed_version() -> None:
    import deepspeed

    major_minor = tuple(int(x) for x in deepspeed.__version__.split(".")[:2])
    if major_minor not in TESTED_DEEPSPEED:
        raise ValueError(
            f"pisa_zero.deepspeed: preconditioner 'nsisa' under ZeRO reads DeepSpeed's partition layout, checked on "
            f"DeepSpeed {TESTED_DEEPSPEED}; installed {deepspeed.__version__}. Run tests/test_deepspeed.py on this "
            "version and add it to pisa_zero.integrations.deepspeed.layout.TESTED_DEEPSPEED, or use 'sisa'."
        )


@dataclass(frozen=True)
class PartitionPiece:
    """The part of one parameter that lies in one rank's flat partition."""

    name: str
    shape: tuple[int, ...]
    local_start: int  # offset in the rank's flat partition
    param_start: int  # offset in the flattened parameter
    numel: int


@dataclass(frozen=True)
class PartitionLayout:
    """How one flat fp32 partition (one ZeRO-1/2 param group or one ZeRO-3 sub-group) maps onto parameters, for
    every rank of its data-parallel group (partitions have the same numel on every rank)."""

    pieces: tuple[tuple[PartitionPiece, ...], ...]  # pieces[rank]
    numel: int  # numel of each rank's partition
    rank: int
    group: object  # the data-parallel process group
    param_group: int

    @property
    def world(self) -> int:
        return len(self.pieces)


def _zero12_pieces(names, shapes, offsets, partition_size: int, rank: int) -> tuple[PartitionPiece, ...]:
    lo, hi = rank * partition_size, (rank + 1) * partition_size
    out = []
    for name, shape, off in zip(names, shapes, offsets):
        numel = int(torch.Size(shape).numel())
        start, end = max(off, lo), min(off + numel, hi)
        if start < end:
            out.append(PartitionPiece(name, tuple(shape), start - lo, start - off, end - start))
    return tuple(out)


def _zero3_pieces(names, shapes, rank: int, world: int) -> tuple[tuple[PartitionPiece, ...], int]:
    out, local = [], 0
    for name, shape in zip(names, shapes):
        numel = int(torch.Size(shape).numel())
        pn = -(-numel // world)
        start, end = rank * pn, min((rank + 1) * pn, numel)
        if start < end:
            out.append(PartitionPiece(name, tuple(shape), local, start, end - start))
        local += pn
    return tuple(out), local


def _check_deepspeed_internals(zero_opt, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not hasattr(zero_opt, n)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"pisa_zero.deepspeed: DeepSpeed {deepspeed.__version__} {type(zero_opt).__name__} lacks {missing}; "
            "the partition layout pisa_zero reads has changed (update pisa_zero/integrations/deepspeed/layout.py)"
        )


ZERO12_INTERNALS = (
    "round_robin_bit16_groups",
    "round_robin_bit16_offsets",
    "partition_size",
    "single_partition_of_fp32_groups",
    "real_dp_process_group",
    "bit16_groups_flat",
    "parallel_partitioned_bit16_groups",
)
ZERO3_INTERNALS = (
    "fp16_groups",
    "fp32_partitioned_groups_flat",
    "fp16_partitioned_groups_flat_numel",
    "sub_group_to_group_id",
    "dp_process_group",
)


def partition_layouts(engine) -> dict[int, PartitionLayout]:
    """``id(flat fp32 partition) -> PartitionLayout`` for every partition the engine's ZeRO optimizer owns."""
    zero_opt = engine.optimizer
    names = engine.param_names
    stage = engine.zero_optimization_stage()
    layouts: dict[int, PartitionLayout] = {}
    if stage in (1, 2):
        if type(zero_opt).__name__ != "DeepSpeedZeroOptimizer":
            raise ValueError(
                f"pisa_zero.deepspeed: ZeRO stage {stage} wrapped the optimizer in {type(zero_opt).__name__} "
                "(bf16 at stage 1 with fp32 gradient accumulation selects BF16_Optimizer); "
                "nsisa and resharding support DeepSpeedZeroOptimizer only — use stage 2 or a bf16 grad_accum_dtype"
            )
        _check_deepspeed_internals(zero_opt, ZERO12_INTERNALS)
        for i, group in enumerate(zero_opt.round_robin_bit16_groups):
            pg = zero_opt.real_dp_process_group[i]
            world, rank = dist.get_world_size(pg), dist.get_rank(pg)
            shapes = (
                [tuple(m.shape) for m in zero_opt.round_robin_bit16_meta[i]]
                if hasattr(zero_opt, "round_robin_bit16_meta")
                else [tuple(p.shape) for p in group]
            )
            pnames = [names[p] for p in group]
            ps = int(zero_opt.partition_size[i])
            pieces = tuple(
                _zero12_pieces(pnames, shapes, zero_opt.round_robin_bit16_offsets[i], ps, r) for r in range(world)
            )
            flat = zero_opt.single_partition_of_fp32_groups[i]
            if flat.numel() != ps:
                raise RuntimeError(f"pisa_zero.deepspeed: partition numel {flat.numel()} != partition_size {ps}")
            layouts[id(flat)] = PartitionLayout(pieces, ps, rank, pg, i)
    elif stage == 3:
        _check_deepspeed_internals(zero_opt, ZERO3_INTERNALS)
        for sg, params in enumerate(zero_opt.fp16_groups):
            pg = (
                zero_opt.sub_group_process_groups[sg]
                if hasattr(zero_opt, "sub_group_process_groups")
                else (zero_opt.dp_process_group)
            )
            world, rank = dist.get_world_size(pg), dist.get_rank(pg)
            pnames = [names[p] for p in params]
            shapes = [tuple(p.ds_shape) for p in params]
            per_rank = [_zero3_pieces(pnames, shapes, r, world) for r in range(world)]
            numel = per_rank[0][1]
            flat = zero_opt.fp32_partitioned_groups_flat[sg]
            # the sub-group's size as DeepSpeed records it: an NVMe-swapped partition holds no data between steps
            held = int(zero_opt.fp16_partitioned_groups_flat_numel[sg])
            if held != numel:
                raise RuntimeError(f"pisa_zero.deepspeed: sub-group numel {held} != layout {numel}")
            layouts[id(flat)] = PartitionLayout(
                tuple(p for p, _ in per_rank), numel, rank, pg, zero_opt.sub_group_to_group_id[sg]
            )
    return layouts
