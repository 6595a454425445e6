"""What a resumed run does with each setting that differs from its checkpoint's: it honours it, or refuses it.

``RESUME_FLAGS`` is the one table: setting → (how the message names it, decision). Every decision is one of
``HONOURED`` (this run's value is used from the resumed step on, and the log names each one that differs, with both
values) or ``REFUSED`` (ValueError before anything is built or loaded, naming the flag and both values).

Two places compare: ``check`` (before the model is built) compares this run's settings with the checkpoint's
``run.json``, which `engine.checkpoints.save` writes from `settings`; ``load`` (the back end's load) compares the
optimizer's param groups before and after the load — a load would bring back the checkpoint's σ, ρ, lr, ... — and puts
this run's back. ``check`` also refuses a checkpoint whose files cannot be verified (no recorded SHA-256) unless
``--allow-unverified-checkpoint``, naming the file, and verifies DeepSpeed checkpoints against ``run.json``'s sums.
Checkpoints written before a setting was recorded are not compared on it.
"""

from __future__ import annotations

import copy
import inspect
import json
import os

from pisa_zero import checkpoint

RUN_FILE = "run.json"
HONOURED, REFUSED = "honoured", "refused"
#: world and agents: DCP reshards ranks and merges/splits agents (pisa_zero.checkpoint); ZeRO files are per rank
_RESHARDED = {"deepspeed": REFUSED, "*": HONOURED}

#: setting → (name in messages, decision); a dict decision is per back end ("*": the others)
RESUME_FLAGS = {
    # what the checkpoint's tensors are: loading them into another run cannot work, or would reinterpret them
    "backend": ("--backend", REFUSED),
    "model": ("--model", REFUSED),
    "size": ("--size", REFUSED),
    "vocab_size": ("--vocab-size / --data", REFUSED),
    "block_size": ("--block-size", REFUSED),
    "optimizer": ("--optimizer", REFUSED),
    "matrix_preconditioner": ("--matrix-preconditioner", REFUSED),  # nsisa keeps a momentum b, sisa a moment v
    "other_preconditioner": ("--other-preconditioner", REFUSED),
    "local_steps": ("--local-steps", REFUSED),  # the round's position and each agent's w_i are counted in H
    "centred_dual": ("--centred-dual", REFUSED),  # the saved duals would mean something else
    "world": ("the number of ranks", _RESHARDED),
    "agents": ("--agents", _RESHARDED),
    # the data stream and the schedule: this run's values from the resumed step on (the batches then differ from
    # the uninterrupted run's; the lr follows this run's schedule at the resumed step)
    "batch_size": ("--batch-size", HONOURED),
    "grad_accum": ("--grad-accum", HONOURED),
    "seed": ("--seed", HONOURED),
    "heterogeneity": ("--heterogeneity", HONOURED),
    "dropout": ("--dropout", HONOURED),
    "max_steps": ("--max-steps", HONOURED),
    "warmup_steps": ("--warmup-steps", HONOURED),
    "schedule": ("--schedule", HONOURED),
    "min_lr_ratio": ("--min-lr-ratio", HONOURED),
    "clip_grad": ("--clip-grad", HONOURED),
    # optimizer hyper-parameters (param-group keys): the load brings back the checkpoint's; this run's are put back
    "sigma": ("--sigma", HONOURED),
    "rho": ("--rho", HONOURED),
    "lr_ref": ("PISA's reference lr (1/(σ+ρ), or optimizer.params.lr)", HONOURED),
    "lr": ("--lr", HONOURED),
    "aux_lr": ("--aux-lr", HONOURED),
    "momentum": ("--momentum", HONOURED),
    "beta2": ("--beta2", HONOURED),
    "l2_lambda": ("--l2-lambda", HONOURED),
    "weight_decay": ("--weight-decay", HONOURED),
    "aux_weight_decay": ("--aux-weight-decay", HONOURED),
    "prox_sigma": ("--prox-sigma", HONOURED),
    "betas": ("optimizer.params.betas", HONOURED),
    "eps": ("optimizer.params.eps", HONOURED),
    "nesterov": ("optimizer.params.nesterov", HONOURED),
    "ns_steps": ("optimizer.params.ns_steps", HONOURED),
}
#: settings of run.json taken from the command line as they are
_ARG_SETTINGS = ("batch_size", "grad_accum", "seed", "heterogeneity", "dropout")
_ARG_SETTINGS += ("max_steps", "warmup_steps", "schedule", "min_lr_ratio", "clip_grad")
#: param-group keys compared before/after a load (``lr`` is the schedule's; ``local_calls``/``round_tokens`` are state)
GROUP_KEYS = ("sigma", "rho", "lr_ref", "momentum", "beta2", "l2_lambda", "weight_decay", "prox_sigma", "betas")
GROUP_KEYS += ("eps", "nesterov", "ns_steps", "centred_dual")


def decision(setting: str, backend: str) -> tuple[str, str]:
    """(name in messages, HONOURED | REFUSED) of ``setting`` on ``backend``."""
    name, decided = RESUME_FLAGS[setting]
    return name, decided.get(backend, decided["*"]) if isinstance(decided, dict) else decided


def _layout(args, ds_config: dict | None) -> dict:
    """The optimizer settings that decide the state's layout, as this run will build them (DeepSpeed: the JSON's)."""
    if args.optimizer != "pisa":
        return dict(matrix_preconditioner=None, other_preconditioner=None, local_steps=1, centred_dual=False)
    if ds_config is None:
        matrix, other, local_steps = args.matrix_preconditioner, args.other_preconditioner, args.local_steps
        centred = bool(args.centred_dual) and local_steps > 1
        return dict(
            matrix_preconditioner=matrix, other_preconditioner=other, local_steps=local_steps, centred_dual=centred
        )
    from pisa_zero import PISA
    from pisa_zero.deepspeed import parse_pisa_params

    spec = parse_pisa_params(ds_config["optimizer"].get("params"))
    if spec.auto_groups:
        matrix, other = spec.matrix_preconditioner, spec.other_preconditioner
    else:  # one group over every parameter
        matrix = spec.kwargs.get("preconditioner", inspect.signature(PISA).parameters["preconditioner"].default)
        other = None
    local_steps = spec.kwargs.get("local_steps", 1)
    centred = bool(spec.kwargs.get("centred_dual", False)) and local_steps > 1
    return dict(matrix_preconditioner=matrix, other_preconditioner=other, local_steps=local_steps, centred_dual=centred)


def settings(args, world: int, vocab_size: int, ds_config: dict | None = None) -> dict:
    """What this run is, as far as a checkpoint of it is concerned (written as the checkpoint's run.json)."""
    run = {"backend": args.backend, "model": args.model, "size": args.size, "vocab_size": vocab_size}
    run.update(block_size=args.block_size, optimizer=args.optimizer, world=world, agents=args.agents)
    run.update(_layout(args, ds_config))
    run.update({key: getattr(args, key) for key in _ARG_SETTINGS})
    return run


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _compare(path: str, saved: dict, run: dict) -> list[str]:
    """ValueError for the first refused difference; the honoured ones, described."""
    honoured = []
    for key, now in run.items():
        if key not in saved or saved[key] == now:
            continue
        name, decided = decision(key, run["backend"])
        if decided == REFUSED:
            raise ValueError(
                f"invalid --resume={path}: it was saved with {key}={saved[key]!r} ({name}), this run has "
                f"{key}={now!r}; resume with the same {name}, or start a new --out-dir"
            )
        honoured.append(f"{name} {now!r} (the checkpoint's: {saved[key]!r})")
    return honoured


def _check_verifiable(path: str, saved: dict | None, backend: str, allow: bool, say) -> None:
    """Refuse (naming the file) a checkpoint that records no checksums, unless allowed; verify DeepSpeed's files."""
    if backend == "deepspeed":
        record, sums = os.path.join(path, RUN_FILE), (saved or {}).get("sha256")
    else:
        record = os.path.join(path, checkpoint.META)
        meta = _read_json(record)
        if meta is None:
            return  # not a pisa_zero checkpoint: its load names what is missing
        sums = meta.get("sha256") if isinstance(meta, dict) else None
    if sums is None:
        if not allow:
            raise ValueError(
                f"invalid --resume={path}: {record} records no sha256 checksums, so the checkpoint's files cannot be "
                "verified; refusing it (pass --allow-unverified-checkpoint to resume from it anyway, guarded only by "
                "the check that its tensors are finite)"
            )
        say(f"[pisa_zero] warning: {record} records no sha256 checksums; resuming from unverified files")
    elif backend == "deepspeed":
        checkpoint.verify_checksums(path, sums, what=f"invalid --resume={path}", record=record)


def check(path: str, run: dict, args, say=print) -> None:
    """Before the model is built: refuse what the table refuses, log what it honours, refuse unverifiable files."""
    saved = _read_json(os.path.join(path, RUN_FILE))
    honoured = _compare(path, saved, run) if saved is not None else []
    if honoured:
        say(f"[pisa_zero] resuming with this run's {'; '.join(honoured)}, from the resumed step on")
    _check_verifiable(path, saved, run["backend"], args.allow_unverified_checkpoint, say)


def _group_setting(group: dict, key: str, optimizer: str) -> str:
    """The table's setting for param-group key ``key`` of ``group`` (the auxiliary AdamW has its own flags)."""
    aux = group.get("preconditioner") == "adamw" or (optimizer == "muon" and group.get("name") == "adamw")
    if key == "lr_ref":
        return "aux_lr" if aux else ("lr" if optimizer != "pisa" else "lr_ref")
    if key == "weight_decay":
        return "aux_weight_decay" if aux else "weight_decay"
    return key


def _reads(group: dict, key: str) -> bool:
    """Whether ``group``'s update reads ``key`` (PISA's groups carry every default; only those read are logged)."""
    if group.get("preconditioner") == "adamw":
        return key in ("lr_ref", "weight_decay", "betas", "eps")
    return key != "betas" or "preconditioner" not in group


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def load(backend, path: str, args, say=print) -> dict:
    """``backend.load(path)`` with this run's optimizer hyper-parameters put back where the load replaced them
    (HONOURED in the table; a REFUSED one raises), each change logged once with both values and its groups."""
    before = [{k: copy.deepcopy(g[k]) for k in GROUP_KEYS if k in g} for g in backend.param_groups]
    extra = backend.load(path, allow_unverified=args.allow_unverified_checkpoint)
    groups = backend.param_groups
    if len(groups) != len(before):
        raise ValueError(f"invalid --resume={path}: it holds {len(groups)} param groups, this run builds {len(before)}")
    changes: dict[tuple, list[str]] = {}
    for i, (group, mine) in enumerate(zip(groups, before)):
        differ = [k for k, value in mine.items() if _plain(group.get(k)) != _plain(value)]
        for key in differ:
            value, setting = mine[key], _group_setting(group, key, args.optimizer)
            if not _reads(group, key) or (setting == "lr_ref" and {"sigma", "rho"} & set(differ)):
                group[key] = value  # unread here; or a PISA group's 1/(σ+ρ), which follows the σ, ρ reported
                continue
            name, decided = decision(setting, args.backend)
            if decided == REFUSED:
                raise ValueError(
                    f"invalid --resume={path}: it was saved with {key}={group.get(key)!r} ({name}), this run has "
                    f"{key}={value!r}; resume with the same {name}, or start a new --out-dir"
                )
            label = str(group.get("preconditioner", group.get("name", i)))
            changes.setdefault((name, repr(_plain(value)), repr(_plain(group.get(key)))), []).append(label)
            group[key] = value
    if changes:
        described = [f"{n} {now} (the checkpoint's: {was}; {'/'.join(g)})" for (n, now, was), g in changes.items()]
        say(f"[pisa_zero] resuming with this run's {'; '.join(described)}")
    return extra
