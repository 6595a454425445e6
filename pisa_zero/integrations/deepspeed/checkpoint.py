"""Resharding DeepSpeed ZeRO checkpoints of PISA: N ranks → M ranks with every optimizer state kept.

DeepSpeed's universal-checkpoint converter (``deepspeed.checkpoint.ds_to_universal``) extracts only Adam's
``exp_avg``/``exp_avg_sq`` (KeyError on anything else) and its ZeRO-3 loader hard-codes them too. This module is the
PISA-aware replacement for the data-parallel case (no tensor/pipeline parallelism):

- :func:`convert_checkpoint` reads the per-rank ZeRO-1/2/3 files of one tag and writes, for every parameter, its whole
  fp32 weight and every per-tensor optimizer state under PISA's own names (``dual``, ``second_moment``, ``momentum``,
  ``exp_avg``, ``exp_avg_sq`` — whatever the groups used; never renamed) plus ``step``, in DeepSpeed's universal
  layout ``<out>/zero/<param name>/<key>.pt`` (each a ``{"param": tensor}`` dict), and ``<out>/pisa_universal.pt``
  with the param-group hyper-parameters, the LR-scheduler state and the engine counters.
- :func:`load_universal` fills a freshly built engine (any world size, ZeRO stage 1/2/3) from that folder: fp32
  master partitions, the model's bit16 weights, PISA's state on each flat partition, param-group lr, scheduler state
  and ``global_steps``/``global_samples``/``skipped_steps``.

CLI: ``python scripts/pisa_ds_to_universal.py --input_folder CKPT [--tag TAG] --output_folder OUT``.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile

import torch

FORMAT = "pisa-universal-v1"
META_FILE = "pisa_universal.pt"


def _load(path: str):
    return torch.load(path, map_location="cpu", weights_only=False)


def _rank_of(path: str) -> int:
    m = re.search(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$", path)
    if m is None:
        raise ValueError(f"pisa_zero: unexpected ZeRO file name {path!r}")
    if int(m.group(2)) != 0:
        raise ValueError("pisa_zero: checkpoints with model (tensor) parallelism are not supported by this converter")
    return int(m.group(1))


def _fragment(addr) -> tuple[int, int]:
    """(start, numel) of a DeepSpeed ``fragment_address``."""
    return int(addr.start), int(addr.numel)


def _tensor_state_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]


def _consolidate_zero12(optim: list[dict], param_shapes: list[dict]) -> tuple[dict, list[dict]]:
    """name -> {"fp32": T, key: T, "step": 0-d T}; and the inner optimizer's param_groups."""
    out: dict[str, dict] = {}
    base0 = optim[0]["base_optimizer_state"]
    if isinstance(base0, list):
        raise ValueError("pisa_zero: elastic_checkpoint ZeRO-1/2 files are not supported; save with elastic off")
    groups = base0["param_groups"]
    for i, shapes in enumerate(param_shapes):
        per_rank = []
        for sd in optim:
            state = sd["base_optimizer_state"]["state"].get(i, {})
            flat = {"fp32": sd["single_partition_of_fp32_groups"][i]}
            flat.update({k: state[k] for k in _tensor_state_keys(state)})
            per_rank.append((flat, state.get("step"), sd["param_slice_mappings"][i]))
        for name, shape in shapes.items():
            pieces: dict[str, list[torch.Tensor]] = {}
            step = None
            for flat, rank_step, mapping in per_rank:
                if name not in mapping:
                    continue
                start, numel = _fragment(mapping[name])
                for key, t in flat.items():
                    pieces.setdefault(key, []).append(t[start : start + numel])
                if step is None and rank_step is not None:
                    step = rank_step
            entry = {k: torch.cat(v).reshape(shape).clone() for k, v in pieces.items()}
            if step is not None:
                entry["step"] = torch.as_tensor(step).clone()
            out[name] = entry
    return out, groups


def _consolidate_zero3(optim: list[dict], param_shapes: list[dict]) -> tuple[dict, list[dict]]:
    world = len(optim)
    inner0 = optim[0]["optimizer_state_dict"]
    groups = inner0["param_groups"]
    flats, steps = [], []
    present: dict[str, set[int]] = {}  # state key -> sub-groups that have it (nsisa and adamw groups differ)
    for sd in optim:
        inner = sd["optimizer_state_dict"]
        fp32 = sd["fp32_flat_groups"]
        keys: dict[str, list] = {"fp32": list(fp32)}
        sg_steps = []
        for sg in range(len(fp32)):
            state = inner["state"].get(sg, {})
            for k in _tensor_state_keys(state):
                keys.setdefault(k, [None] * len(fp32))[sg] = state[k]
                present.setdefault(k, set()).add(sg)
            sg_steps.append(state.get("step"))
        flats.append(
            {k: torch.cat([(x if x is not None else torch.zeros_like(fp32[j])).reshape(-1) for j, x in enumerate(v)])
             for k, v in keys.items()}
        )  # fmt: skip
        steps.append(sg_steps)
    present["fp32"] = set(range(len(optim[0]["fp32_flat_groups"])))
    sub_group_bounds = [0]
    for t in optim[0]["fp32_flat_groups"]:
        sub_group_bounds.append(sub_group_bounds[-1] + t.numel())
    out: dict[str, dict] = {}
    offset = 0
    for name, shape in ((n, s) for d in param_shapes for n, s in d.items()):
        numel = int(torch.Size(shape).numel())
        pn = -(-numel // world)
        sg = max(j for j, b in enumerate(sub_group_bounds[:-1]) if b <= offset)
        entry = {
            k: torch.cat([f[k][offset : offset + pn] for f in flats])[:numel].reshape(shape).clone()
            for k in flats[0]
            if sg in present.get(k, ())
        }
        if steps[0][sg] is not None:
            entry["step"] = torch.as_tensor(steps[0][sg]).clone()
        out[name] = entry
        offset += pn
    if offset != sub_group_bounds[-1]:
        raise ValueError(f"pisa_zero: consumed {offset} of {sub_group_bounds[-1]} ZeRO-3 elements; layout mismatch")
    return out, groups


def convert_checkpoint(checkpoint_dir: str, output_dir: str, tag: str | None = None) -> str:
    """Consolidate the ZeRO checkpoint ``checkpoint_dir/tag`` into a world-size-free folder (see module doc).

    Written to a temporary folder next to ``output_dir`` and renamed into place, so a failure leaves nothing
    half-written. Returns ``output_dir``.
    """
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"pisa_zero: no tag given and no {latest}")
        with open(latest) as f:
            tag = f.read().strip()
    folder = os.path.join(checkpoint_dir, tag)
    optim_files = sorted(glob.glob(os.path.join(folder, "*zero_pp_rank_*_mp_rank_*_optim_states.pt")), key=_rank_of)
    if not optim_files:
        raise ValueError(f"pisa_zero: no ZeRO optimizer files in {folder}")
    if [_rank_of(f) for f in optim_files] != list(range(len(optim_files))):
        raise ValueError(f"pisa_zero: ZeRO optimizer files of {folder} do not cover ranks 0..N-1")
    optim = [_load(f)["optimizer_state_dict"] for f in optim_files]
    model_file = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.exists(model_file):
        model_file = os.path.join(folder, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    model_state = _load(model_file)
    stage = int(optim[0].get("zero_stage", 0))
    if stage in (1, 2):
        params, groups = _consolidate_zero12(optim, model_state["param_shapes"])
    elif stage == 3:
        params, groups = _consolidate_zero3(optim, model_state["param_shapes"])
    else:
        raise ValueError(f"pisa_zero: unsupported zero_stage {stage!r} in {folder}")
    if model_state.get("frozen_param_shapes"):
        raise ValueError("pisa_zero: checkpoints with frozen parameters are not supported by this converter yet")
    for name, entry in params.items():  # a diverged or corrupted checkpoint is not converted into a usable-looking one
        for key, t in entry.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"pisa_zero: {folder}: {name} {key} holds inf/NaN; refusing to convert it")
    meta = {
        "format": FORMAT,
        "source_world_size": len(optim),
        "source_zero_stage": stage,
        "tag": tag,
        "param_names": list(params),
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in groups],
        "lr_scheduler": model_state.get("lr_scheduler"),
        "global_steps": model_state.get("global_steps"),
        "global_samples": model_state.get("global_samples"),
        "skipped_steps": model_state.get("skipped_steps"),
    }
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".pisa_universal_", dir=parent)
    try:
        for name, entry in params.items():
            d = os.path.join(tmp, "zero", name)
            os.makedirs(d)
            for key, t in entry.items():
                torch.save({"param": t}, os.path.join(d, f"{key}.pt"))
        torch.save(meta, os.path.join(tmp, META_FILE))
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def _read_param(folder: str, name: str) -> dict[str, torch.Tensor]:
    d = os.path.join(folder, "zero", name)
    if not os.path.isdir(d):
        raise ValueError(f"pisa_zero: parameter {name!r} is not in the converted checkpoint {folder}")
    entry = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".pt"):
            t = _load(os.path.join(d, f))["param"]
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"pisa_zero: {os.path.join(d, f)} holds inf/NaN (corrupted, or from a diverged run)")
            entry[f[:-3]] = t
    return entry


@torch.no_grad()
def load_universal(engine, folder: str, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True):
    """Load a folder written by :func:`convert_checkpoint` into ``engine`` (any world size, ZeRO 1/2/3)."""
    from ...optimizer import PISA
    from .layout import partition_layouts

    meta = _load(os.path.join(folder, META_FILE))
    if meta.get("format") != FORMAT:
        raise ValueError(f"pisa_zero: {folder} is not a {FORMAT} folder")
    pisa = engine.basic_optimizer
    if not isinstance(pisa, PISA):
        raise ValueError("pisa_zero: the engine's optimizer is not PISA")
    if engine.zero_optimization_stage() == 0:
        raise ValueError("pisa_zero: load_universal needs a ZeRO engine (stage 1, 2 or 3)")
    zero_opt = engine.optimizer
    layouts = partition_layouts(engine)
    stage = engine.zero_optimization_stage()
    flats = (
        list(zero_opt.single_partition_of_fp32_groups)
        if stage in (1, 2)
        else list(zero_opt.fp32_partitioned_groups_flat)
    )
    cache: dict[str, dict[str, torch.Tensor]] = {}
    for index, flat in enumerate(flats):
        layout = layouts[id(flat)]
        pieces = layout.pieces[layout.rank]
        keys: set[str] | None = None
        steps = set()
        new_state: dict[str, torch.Tensor] = {}
        for pc in pieces:
            if pc.name not in cache:
                cache[pc.name] = _read_param(folder, pc.name)
            entry = cache[pc.name]
            if tuple(entry["fp32"].shape) != tuple(pc.shape):
                raise ValueError(f"pisa_zero: {pc.name}: checkpoint shape {tuple(entry['fp32'].shape)} != {pc.shape}")
            tensor_keys = {k for k, v in entry.items() if k != "step"}
            if keys is None:
                keys = tensor_keys
            elif keys != tensor_keys:
                raise ValueError(f"pisa_zero: {pc.name} has states {sorted(tensor_keys)}, its partition {sorted(keys)}")
            if "step" in entry:
                steps.add(float(entry["step"]))
            for key in tensor_keys:
                dst = flat if key == "fp32" else new_state.setdefault(key, torch.zeros_like(flat))
                src = entry[key].reshape(-1)[pc.param_start : pc.param_start + pc.numel]
                dst[pc.local_start : pc.local_start + pc.numel] = src.to(dst.dtype)
        if load_optimizer_states and keys and keys != {"fp32"}:
            if len(steps) > 1:
                raise ValueError(f"pisa_zero: parameters sharing partition {index} have different steps {steps}")
            state = {"step": torch.tensor(steps.pop() if steps else 0.0)}
            group = pisa.param_groups[layout.param_group]
            dtype = pisa.state_dtype if group["preconditioner"] != "adamw" else flat.dtype
            state.update({k: v.to(dtype) for k, v in new_state.items()})
            pisa.state[flat] = state
    # bit16 (model) weights from the fp32 masters.
    if stage in (1, 2):
        for group in zero_opt.round_robin_bit16_groups:
            for p in group:
                p.data.copy_(cache[engine.param_names[p]]["fp32"].to(p.dtype))
    else:
        for sg, flat in enumerate(flats):
            zero_opt.fp16_partitioned_groups_flat[sg].data.copy_(
                flat.to(zero_opt.fp16_partitioned_groups_flat[sg].dtype)
            )
    for group, saved in zip(pisa.param_groups, meta["param_groups"]):
        for key in ("lr", "lr_ref"):
            if key in saved:
                group[key] = saved[key]
    if load_lr_scheduler_states and engine.lr_scheduler is not None and meta.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    for key in ("global_steps", "global_samples", "skipped_steps"):
        if meta.get(key) is not None:
            setattr(engine, key, meta[key])
    return meta
