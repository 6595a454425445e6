"""The application's checkpoint folder: <out-dir>/checkpoints/step_NNNNNN, ``latest`` naming the newest complete one.

A checkpoint is complete when its ``run.json`` exists: it is written (atomically) after the back end's own files,
and ``latest`` only after that, also atomically (DeepSpeed is told not to write its own ``latest``, which it rewrites
in place). ``run.json`` holds what the run was (`engine.resume.settings`: model, size, vocabulary, optimizer, batch,
schedule, ...), so a resume can honour or refuse each difference (engine/resume.py); for DeepSpeed it also holds the
SHA-256 of every file of the checkpoint (pisa_zero.checkpoint's own ``pisa_meta.json`` holds them for FSDP2/single).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil

from engine.backends import barrier
from engine.resume import RUN_FILE
from pisa_zero import checkpoint
from pisa_zero.monitor import all_reduce_sum

_STEP = re.compile(r"step_\d{6}")


def root(args) -> str:
    return os.path.join(args.out_dir, "checkpoints")


def _complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RUN_FILE))


def resolve_resume(args, say=print) -> str | None:
    """The checkpoint --resume names: a directory, or ``latest`` — falling back to the newest complete checkpoint
    (with a message) when ``latest`` is empty, unreadable or names an incomplete one; None when nothing was saved."""
    if args.resume is None:
        return None
    if args.resume != "latest":
        if not os.path.isdir(args.resume):
            raise ValueError(f"invalid --resume={args.resume!r}: not a checkpoint directory")
        return os.path.abspath(args.resume).rstrip("/")
    folder = root(args)
    latest = os.path.join(folder, "latest")
    try:
        with open(latest) as f:
            tag = f.read().strip()
    except FileNotFoundError:
        tag = None
    except OSError:
        tag = ""
    if tag and _STEP.fullmatch(tag) and _complete(os.path.join(folder, tag)):
        return os.path.join(folder, tag)
    complete = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder) else []) if _STEP.fullmatch(n))
    complete = [n for n in complete if _complete(os.path.join(folder, n))]
    if tag is None and not complete:
        return None  # nothing saved yet: start fresh (so the same command both starts and resumes)
    if not complete:
        raise ValueError(f"invalid --resume: {latest} names {tag!r} and no complete checkpoint is in {folder}")
    say(f"[pisa_zero] {latest} names {tag!r}, not a complete checkpoint; resuming from the newest complete one")
    return os.path.join(folder, complete[-1])


def prune(folder: str, keep: int) -> None:
    """Keep the newest ``keep`` step_NNNNNN checkpoints (a directory, or a symlink to a versioned directory as
    pisa_zero.checkpoint writes them); remove older ones and orphaned versions of older steps."""
    names = sorted(n for n in os.listdir(folder) if _STEP.fullmatch(n))
    kept = names[-keep:]
    targets = {os.path.realpath(os.path.join(folder, n)) for n in kept}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        step = re.match(r"step_(\d{6})", name)
        if not step or name in kept or os.path.realpath(path) in targets or step.group(0) >= kept[0]:
            continue
        if os.path.islink(path):
            real = os.path.realpath(path)
            os.remove(path)
            shutil.rmtree(real, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _local_numel(backend) -> int:
    return sum(
        (p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p)).numel() for p in backend.params()
    )


def _remove_partial(path: str) -> None:
    """What a failed save leaves: DeepSpeed's ``<path>.partial``, pisa_zero.checkpoint's unpublished versions."""
    published = os.path.realpath(path) if os.path.islink(path) else None
    folder, name = os.path.split(path)
    for entry in os.listdir(folder):
        full = os.path.join(folder, entry)
        if entry == f"{name}.partial" or (entry.startswith(f"{name}.v-") and full != published):
            shutil.rmtree(full, ignore_errors=True)


def _no_space(folder: str, need: float, free: float) -> SystemExit:
    return SystemExit(
        f"[pisa_zero] no space left on {folder}: a checkpoint needs about {need / 2**20:,.0f} MiB, "
        f"{free / 2**20:,.0f} MiB are free. Free some space or use another --out-dir, then --resume."
    )


def save(backend, args, rank: int, step: int, extra: dict, run: dict) -> str:
    """Write checkpoints/step_NNNNNN, its run.json, then point ``latest`` at it (each atomically), then prune.

    Refused before writing anything when the disk lacks the space (estimated as 16 bytes per parameter: fp32
    weights and up to three fp32 state tensors); a save that fails anyway leaves nothing half-written behind."""
    folder = root(args)
    tag = f"step_{step:06d}"
    path = os.path.join(folder, tag)
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
    free = shutil.disk_usage(folder).free if rank == 0 else 0.0
    need, free = all_reduce_sum([16.0 * _local_numel(backend), free]).tolist()
    if free < need:
        raise _no_space(folder, need, free)
    try:
        backend.save(path, extra)
        barrier()
    except Exception as e:
        if rank == 0:
            _remove_partial(path)
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or shutil.disk_usage(folder).free < need:
            raise _no_space(folder, need, shutil.disk_usage(folder).free) from e
        raise
    if backend.name == "deepspeed":  # DeepSpeed records no checksums of its own: every rank hashes a share
        run = {**run, "sha256": checkpoint.file_checksums(path, skip=(RUN_FILE,))}
    if rank == 0:
        _write_atomically(os.path.join(path, RUN_FILE), json.dumps(run))
        _write_atomically(os.path.join(folder, "latest"), tag)
        prune(folder, args.keep_checkpoints)
    barrier()
    return path
