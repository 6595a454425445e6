"""The DeepSpeed JSON as engine/train.py reads it: the command line's explicit flags applied (each overrides only the
key it names), the optimizer block checked as DeepSpeed or PISA would check it, TensorBoard pointed at the run.

A JSON without an ``optimizer`` block trains the engine's documented default optimizer, built from its flags (PISA:
NSISA on the block matrices and the auxiliary AdamW on the rest, ``--sigma``/``--rho``/``--aux-lr``...; or the
``--optimizer adamw|muon`` baseline), and the log says so. (Before, the library's PISA defaults applied: sisa with
σ = 1, ρ = 1000 in one group over every parameter, with no notice.)
"""

from __future__ import annotations

import json

import torch

from engine.flags import BASELINE_FLAGS, PISA_FLAGS
from pisa_zero.integrations.deepspeed.config import BY_ROLE

#: --optimizer values and the DeepSpeed ``optimizer.type`` that selects each (case-insensitive, as DeepSpeed reads it)
DEEPSPEED_TYPES = {"pisa": "PISA", "adamw": "AdamW", "muon": "Muon"}
#: optimizer.params keys of DeepSpeed's Muon (engine.py ``_MUON_HALF_KEYS`` / ``_ADAM_HALF_KEYS`` and the lr overrides)
MUON_KEYS = ("lr", "momentum", "weight_decay", "ns_method", "betas", "eps", "muon_lr", "adam_lr")
#: optimizer.params keys DeepSpeed's AdamW takes besides torch.optim.AdamW's
ADAMW_DEEPSPEED_KEYS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")


def _implementation(args) -> str | None:
    return None if args.implementation == "auto" else args.implementation


def default_optimizer(args) -> dict:
    """The engine's documented optimizer from its flags, as a DeepSpeed ``optimizer`` block (for a JSON without one):
    PISA by role (``--matrix-preconditioner`` on the block matrices, ``--other-preconditioner`` with ``--aux-lr`` on
    the rest), or the ``--optimizer adamw|muon`` baseline. Only keys some group reads are written."""
    if args.optimizer == "adamw":
        return {"type": "AdamW", "params": {"lr": args.lr, "weight_decay": args.weight_decay, "betas": [0.9, 0.95]}}
    if args.optimizer == "muon":
        params = {"muon_lr": args.lr, "adam_lr": args.aux_lr, "momentum": args.momentum}
        return {"type": "Muon", "params": {**params, "weight_decay": args.weight_decay}}
    kinds = {args.matrix_preconditioner, args.other_preconditioner}
    params = {"param_groups": BY_ROLE, "matrix_preconditioner": args.matrix_preconditioner}
    params.update(other_preconditioner=args.other_preconditioner, sigma=args.sigma, rho=args.rho)
    params.update(l2_lambda=args.l2_lambda, weight_decay=args.weight_decay, agents=args.agents)
    params.update(local_steps=args.local_steps)
    if "nsisa" in kinds:
        params["momentum"] = args.momentum
    if "sisa" in kinds:
        params["beta2"] = args.beta2
    if args.other_preconditioner == "adamw":
        params["other_options"] = {"lr": args.aux_lr, "weight_decay": args.aux_weight_decay}
    if args.local_steps > 1:
        params.update(
            {"centred_dual": args.centred_dual}, **({"prox_sigma": args.prox_sigma} if args.prox_sigma else {})
        )
    if _implementation(args) is not None:
        params["implementation"] = _implementation(args)
    return {"type": "PISA", "params": params}


def _override(params: dict, explicit: set[str], args, pairs) -> None:
    """Write each explicitly given flag into its key: a flag overrides only what it names."""
    for flag, key in pairs:
        if flag in explicit:
            params[key] = getattr(args, flag)


def _check_params(source: str, kind: str, params: dict) -> None:
    """Reject what DeepSpeed or PISA would reject (or silently ignore), naming the file and the key."""
    if kind == "pisa":
        from pisa_zero.deepspeed import parse_pisa_params

        try:
            parse_pisa_params(params)
        except ValueError as e:
            raise ValueError(f"invalid {source}: {e}") from e
        return
    if kind == "muon":
        unknown = sorted(set(params) - set(MUON_KEYS))
        if unknown:
            raise ValueError(f"invalid {source}: unknown key optimizer.params.{unknown[0]!r}; Muon takes {MUON_KEYS}")
        momentum = params.get("momentum", 0.95)
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"invalid {source}: optimizer.params.momentum={momentum!r}: expected a number in [0, 1)")
        params = {k: v for k, v in params.items() if k in ("lr", "weight_decay", "betas", "eps")}
    try:
        torch.optim.AdamW([torch.zeros(1)], **{k: v for k, v in params.items() if k not in ADAMW_DEEPSPEED_KEYS})
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid {source}: optimizer.params: {e}") from e


def _read(source: str) -> dict:
    with open(source) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid {source}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"invalid {source}: expected a JSON object, got {type(config).__name__}")
    return config


def _batch(config: dict, args, explicit: set[str], source: str, say) -> None:
    """Micro-batch and accumulation: an explicit flag wins, else the JSON's, else the flag's default; args follow."""
    if "batch_size" in explicit or "train_micro_batch_size_per_gpu" not in config:
        config["train_micro_batch_size_per_gpu"] = args.batch_size
    if "grad_accum" in explicit or "gradient_accumulation_steps" not in config:
        config["gradient_accumulation_steps"] = args.grad_accum
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"invalid {source}: {key}={value!r}: expected an integer >= 1")
    if config.pop("train_batch_size", None) is not None:
        say(
            "[pisa_zero] the config's train_batch_size is dropped: DeepSpeed derives it from "
            "train_micro_batch_size_per_gpu x gradient_accumulation_steps x data-parallel ranks"
        )
    args.batch_size = config["train_micro_batch_size_per_gpu"]
    args.grad_accum = config["gradient_accumulation_steps"]


def _optimizer_kind(config: dict, args, explicit: set[str], source: str, say) -> tuple[str, dict]:
    """(``--optimizer`` value, the optimizer block): the JSON's type decides; no block: the engine's default."""
    if "optimizer" not in config:
        config["optimizer"] = default_optimizer(args)
        say(
            f"[pisa_zero] {source} has no 'optimizer' block: training the engine's default from its flags, "
            f"{json.dumps(config['optimizer'])} (docs/engine.md, Optimizer defaults); write an 'optimizer' block "
            "in the JSON to choose another"
        )
    opt = config["optimizer"]
    kind = str(opt.get("type", "")).lower() if isinstance(opt, dict) else ""
    if kind not in DEEPSPEED_TYPES:
        shown = opt.get("type") if isinstance(opt, dict) else opt
        raise ValueError(f"invalid {source}: optimizer.type={shown!r}: expected one of PISA, AdamW, Muon")
    if "optimizer" in explicit and args.optimizer != kind:
        raise ValueError(
            f"--optimizer {args.optimizer} contradicts {source}'s optimizer.type={opt['type']!r}: "
            "under DeepSpeed the config's type selects the optimizer; change one of them"
        )
    args.optimizer = kind
    for flag in sorted(set(PISA_FLAGS if kind != "pisa" else BASELINE_FLAGS) & explicit):
        raise ValueError(f"--{flag.replace('_', '-')} has no effect with {source}'s optimizer.type={opt['type']!r}")
    if kind != "pisa" and args.agents > 1:
        raise ValueError(f"--agents {args.agents} is PISA's mode B; {source}'s optimizer.type={opt['type']!r}")
    return kind, opt.setdefault("params", {})


def _pisa_overrides(config: dict, params: dict, args, explicit: set[str], say) -> None:
    _override(params, explicit, args, [(k, k) for k in ("sigma", "rho", "momentum", "beta2", "l2_lambda")])
    _override(params, explicit, args, [(k, k) for k in ("weight_decay", "agents", "local_steps")])
    _override(params, explicit, args, [(k, k) for k in ("prox_sigma", "centred_dual")])
    _override(params, explicit, args, [(k, k) for k in ("matrix_preconditioner", "other_preconditioner")])
    if "implementation" in explicit:
        params["implementation"] = _implementation(args)
    if {"aux_lr", "aux_weight_decay"} & explicit:
        _override(params.setdefault("other_options", {}), explicit, args, [("aux_lr", "lr")])
        _override(params["other_options"], explicit, args, [("aux_weight_decay", "weight_decay")])
    if params.get("agents", 1) > 1 and "clip_grad" in explicit and args.clip_grad > 0:
        raise ValueError(
            f"--clip-grad {args.clip_grad}: {args.deepspeed_config} trains mode B (optimizer.params.agents="
            f"{params['agents']}), whose agents each have their own gradient; DeepSpeed would clip every agent with "
            "one agent's norm (no clipping in mode B)"
        )
    if params.get("agents", 1) > 1 and config.get("gradient_clipping", 0):
        say(
            "[pisa_zero] mode B: the config's gradient_clipping is turned off (DeepSpeed would clip every agent "
            "with one agent's gradient norm)"
        )
        config["gradient_clipping"] = 0.0


def _baseline_overrides(config: dict, kind: str, params: dict, args, explicit: set[str], source: str) -> None:
    if kind == "adamw":
        _override(params, explicit, args, [("lr", "lr"), ("weight_decay", "weight_decay")])
        return
    _override(params, explicit, args, [("lr", "muon_lr"), ("aux_lr", "adam_lr"), ("momentum", "momentum")])
    _override(params, explicit, args, [("weight_decay", "weight_decay")])
    config.setdefault("zero_allow_untested_optimizer", True)  # the Muon object is handed to DeepSpeed built
    zero = config.setdefault("zero_optimization", {})
    if int(zero.get("stage", 0)) == 3 and zero.setdefault("reduce_scatter", False):
        raise ValueError(f"invalid {source}: DeepSpeed's Muon at ZeRO-3 needs zero_optimization.reduce_scatter false")


def deepspeed_config(args, explicit: set[str], logdir: str | None, say=print) -> dict:
    """The JSON config with the command line's explicit flags applied (each overrides only the key it names) and
    TensorBoard turned on. ``optimizer.type`` (PISA, AdamW or Muon) selects the optimizer; it is read exactly as
    `pisa_zero.deepspeed.build_optimizer` (PISA) or DeepSpeed (AdamW, Muon) read it. No ``optimizer`` block: the
    engine's default optimizer from its flags (`default_optimizer`), logged."""
    source = args.deepspeed_config
    config = _read(source)
    _batch(config, args, explicit, source, say)
    _override(config, explicit, args, [("clip_grad", "gradient_clipping")])
    kind, params = _optimizer_kind(config, args, explicit, source, say)
    if kind == "pisa":
        _pisa_overrides(config, params, args, explicit, say)
    else:
        _baseline_overrides(config, kind, params, args, explicit, source)
    _check_params(source, kind, params)
    # DeepSpeed's own monitor writes its Train/Samples/* scalars next to ours (or nowhere with --no-tensorboard)
    config["tensorboard"] = {"enabled": bool(logdir), "output_path": logdir or "", "job_name": "deepspeed"}
    if args.schedule != "config" and config.pop("scheduler", None) is not None:
        say(
            f"[pisa_zero] the lr schedule comes from --schedule {args.schedule} / --warmup-steps / --max-steps; "
            "the config's 'scheduler' is ignored (use --schedule config to keep it)"
        )
    if "dtype" in explicit:
        config["bf16"] = {**config.get("bf16", {}), "enabled": args.dtype == "bf16"}
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config
