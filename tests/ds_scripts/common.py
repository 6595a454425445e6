"""Shared pieces of the DeepSpeed tests: a tiny GPT-2, deterministic batches, configs, DeepSpeed and
single-process training loops, and the consensus weights of an engine gathered from its fp32 partitions.

The single-process references build PISA from plain keyword arguments (`sisa_reference`), never from the JSON
through ``pisa_zero.deepspeed``: a key the JSON parser misread would otherwise be misread in the reference too."""

from __future__ import annotations

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

VOCAB, SEQ, MICRO = 64, 16, 2


def make_model(seed: int = 0, width: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=2,
        n_embd=width,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=SEQ,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(cfg)
    model.config.use_cache = False
    return model


def batch(step: int, global_batch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    # a learnable pattern (token t+1 = token t + 1 mod VOCAB, random start) so the loss can fall
    start = torch.randint(0, VOCAB, (global_batch, 1), generator=g)
    return (start + torch.arange(SEQ)) % VOCAB


#: The ``optimizer.params`` of `ds_config` unless told otherwise; `sisa_reference` is the same optimizer in Python.
SISA_PARAMS = {"sigma": 2.0, "rho": 50.0, "implementation": "foreach"}
#: NSISA on the block matrices, the auxiliary AdamW on the rest (the shipped JSONs' grouping)
NSISA_PARAMS = {
    "sigma": 30.0,
    "rho": 100.0,
    "preconditioner": "nsisa",
    "param_groups": "by_role",
    "other_options": {"lr": 3e-3},
}


def sisa_reference(model):
    """`SISA_PARAMS` as plain PISA keywords (one group, sisa by default), not through the JSON parser."""
    from pisa_zero import PISA

    return PISA(model.parameters(), sigma=2.0, rho=50.0, implementation="foreach")


def ds_config(stage: int, world: int, *, accum: int = 1, params: dict | None = None, **extra) -> dict:
    cfg = {
        "train_batch_size": MICRO * accum * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "PISA",
            "params": params if params is not None else dict(SISA_PARAMS),
        },
    }
    for k, v in extra.items():
        if k == "zero":
            cfg["zero_optimization"].update(v)
        else:
            cfg[k] = v
    return cfg


def ds_engine(cfg: dict, seed: int = 0, use_register: bool = False, width: int = 32):
    import deepspeed

    import pisa_zero.deepspeed as pds

    model = make_model(seed, width)
    if use_register:
        pds.register()
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    else:
        engine, *_ = pds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def ds_train(engine, steps: int, start: int = 0) -> list[float]:
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    accum = engine.gradient_accumulation_steps()
    losses = []
    for step in range(start, start + steps):
        x = batch(step, MICRO * accum * world)
        for a in range(accum):
            lo = (a * world + rank) * MICRO
            xb = x[lo : lo + MICRO].to(engine.device)
            loss = engine(xb, labels=xb).loss
            engine.backward(loss)
            engine.step()
            losses.append(float(loss))
    return losses


def consensus_partitions(engine) -> list[torch.Tensor]:
    zero_opt = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2):
        return list(zero_opt.single_partition_of_fp32_groups)
    return list(zero_opt.fp32_partitioned_groups_flat)


def gather_full(layout, local: torch.Tensor) -> dict[str, torch.Tensor]:
    """All-gather a flat partition over the layout's group; returns ``name -> whole tensor`` for every parameter
    that has a piece in it (in the parameter's shape)."""
    from pisa_zero._utils import comm_device

    device = comm_device(local.device, layout.group)
    src = local.detach().to(device)
    chunks = [torch.empty_like(src) for _ in range(layout.world)]
    torch.distributed.all_gather(chunks, src.contiguous(), group=layout.group)
    full: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for r, pieces in enumerate(layout.pieces):
        for pc in pieces:
            if pc.name not in full:
                full[pc.name] = torch.zeros(torch.Size(pc.shape).numel(), dtype=local.dtype, device=local.device)
                shapes[pc.name] = pc.shape
            full[pc.name][pc.param_start : pc.param_start + pc.numel] = chunks[r][
                pc.local_start : pc.local_start + pc.numel
            ].to(local.device)
    return {n: t.view(shapes[n]) for n, t in full.items()}


def consensus_weights(engine) -> dict[str, torch.Tensor]:
    """Whole fp32 master weights (the consensus w) from the engine's flat partitions, on every rank."""
    from pisa_zero.integrations.deepspeed import partition_layouts

    zero_opt = engine.optimizer
    if engine.zero_optimization_stage() in (1, 2):
        flats = zero_opt.single_partition_of_fp32_groups
    else:
        flats = zero_opt.fp32_partitioned_groups_flat
    layouts = partition_layouts(engine)
    out = {}
    for flat in flats:
        out.update({k: v.clone() for k, v in gather_full(layouts[id(flat)], flat.detach().float()).items()})
    return out


def pisa_states(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Whole per-parameter optimizer state tensors (key -> tensor) gathered from the flat partitions."""
    from pisa_zero.integrations.deepspeed import partition_layouts

    zero_opt = engine.optimizer
    flats = (
        zero_opt.single_partition_of_fp32_groups
        if engine.zero_optimization_stage() in (1, 2)
        else zero_opt.fp32_partitioned_groups_flat
    )
    layouts = partition_layouts(engine)
    out: dict[str, dict[str, torch.Tensor]] = {}
    pisa = engine.basic_optimizer
    for flat in flats:
        state = pisa.state.get(flat, {})
        for key, t in state.items():
            if torch.is_tensor(t) and t.dim() > 0:
                for name, full in gather_full(layouts[id(flat)], t.float()).items():
                    out.setdefault(name, {})[key] = full.clone()
    return out


def ds_scheduler(cfg: dict, optimizer):
    """DeepSpeed's own scheduler class for ``cfg["scheduler"]`` (None without one), on ``optimizer``."""
    sched = cfg.get("scheduler")
    if not sched:
        return None
    from deepspeed.runtime import lr_schedules

    return getattr(lr_schedules, sched["type"])(optimizer, **sched.get("params", {}))


def single_train(cfg: dict, steps: int, world: int, make_optimizer, seed: int = 0, start_model=None):
    """Single-process ``make_optimizer(model)`` (plain PISA keywords, e.g. `sisa_reference`) on the same global
    batches, with the JSON's batch sizes, clipping and DeepSpeed scheduler; returns (model, losses, optimizer)."""
    model = start_model if start_model is not None else make_model(seed)
    opt = make_optimizer(model)
    sched = ds_scheduler(cfg, opt)
    clip = cfg.get("gradient_clipping", 0.0)
    accum = cfg.get("gradient_accumulation_steps", 1)
    losses = []
    for step in range(steps):
        x = batch(step, MICRO * accum * world)
        # the global batch, in the micro-batches the ranks see (same rounding of the per-chunk means)
        loss = 0.0
        for chunk in x.split(MICRO):
            part = model(chunk, labels=chunk).loss / (accum * world)
            part.backward()
            loss += float(part)
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(float(loss))
    return model, losses, opt


def pieces(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights by tensor, with each attention ``c_attn.bias`` cut into its query, key and value thirds."""
    out = {}
    for name, t in weights.items():
        if name.endswith("attn.c_attn.bias"):
            for part, piece in zip(("query", "key", "value"), t.chunk(3)):
                out[f"{name}.{part}"] = piece
        else:
            out[name] = t
    return out


def path_lengths(trajectory: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Σ_t ‖w_t − w_{t−1}‖ of every piece (`pieces`) along a run's weights after each step."""
    steps = [pieces(w) for w in trajectory]
    return {n: sum(float((b[n].double() - a[n].double()).norm()) for a, b in zip(steps, steps[1:])) for n in steps[0]}


def bf16_tensor_errors(got, ref, paths, roundings) -> dict[str, tuple[float, float]]:
    """``{piece: (relative error, its bound)}`` of a bf16 run's weights ``got`` against the fp32 run ``ref``, the
    bound from bf16's unit roundoff (tests/_consensus_common.bf16_bound; ``paths``: ``ref``'s `path_lengths`).
    Left out: the attention key biases, whose exact gradient is zero (softmax is unchanged when the same q·b_k is
    added to every logit of a query): each run's key bias is its own rounding noise, normalised by AdamW into
    full-sized steps, so no precision bound relates the two."""
    from tests._consensus_common import bf16_bound

    got, ref = pieces(got), pieces(ref)
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    out = {}
    for n, r in ref.items():
        if n.endswith("attn.c_attn.bias.key"):
            continue
        norm = float(r.double().norm())
        out[n] = (float((got[n].double() - r.double()).norm()) / norm, bf16_bound(roundings, paths[n], norm))
    return out


def rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in a)
    return (num / den) ** 0.5
