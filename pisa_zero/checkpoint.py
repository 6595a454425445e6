"""Save / resume / reshard PISA training state with ``torch.distributed.checkpoint`` (DCP): FSDP2 or one process.

    checkpoint.save(path, model, optimizer, extra={"step": t, "rng": torch.get_rng_state(), "data": pos})
    extra = checkpoint.load(path, model, optimizer)

Layout (a directory): DCP shards of ``{"model": ..., "optim_agent<i>": ...}`` (model and optimizer state from
``get_state_dict``, keyed by parameter FQN), ``pisa_meta.json`` (agent count and the agents' last weights α) and
``extra/rank<r>.pt`` (each rank's ``extra``). In mode B every agent's π_i, v_i, b_i are saved under that agent's own
key — they are not replicas, so none is dropped. The model is the consensus w, identical on all agents (saved once).

Atomic: everything is written to ``<path>.v-<id>``; after a barrier rank 0 points the symlink ``<path>`` at it with
one ``os.replace`` and then removes the version it replaced. A writer killed at any moment leaves ``<path>`` pointing
at the previous complete checkpoint (an orphaned ``<path>.v-*`` directory may remain).

Verified: ``save`` refuses (ValueError naming the tensor, nothing written) when a weight or state tensor is inf/NaN,
so a diverged run never replaces the last good checkpoint. ``pisa_meta.json`` records the SHA-256 of every other file
(``sha256sum`` can check them by hand); ``load`` re-hashes them before reading any tensor (each rank a share of the
files) and refuses a corrupted or missing file by name, then refuses a non-finite loaded tensor by name. A checkpoint
whose ``pisa_meta.json`` records no checksums cannot be verified: ``load`` refuses it, naming that file, unless
``allow_unverified=True`` (then it warns, and only the finite check guards the tensors). ``file_checksums`` and
``verify_checksums`` are the same two steps for any folder (the engine checksums DeepSpeed's checkpoints with them).

Resharding on load:
- the shard count k changes freely (DCP reshards DTensors and plain tensors; 4 ranks → 2 → 1 process);
- the agent count changes by the rule below (``agent_mapping``), where m = saved agents, m' = agents now:
  * m' = m: agent i loads agent i's state;
  * m' < m, m' divides m (merge): agent i' takes old agents i'·(m/m') … (i'+1)·(m/m') − 1 and sets each floating
    state tensor (π, v, b, AdamW's moments) to their α-weighted average (α renormalised within the block; at the
    fixed point π_j = −∇F_j(w*), so the average is minus the merged agent's gradient); step counters are copied;
  * m' > m, m divides m' (split): agent i' copies old agent i'·m/m' (its new sub-agents start from the parent's duals);
  * anything else raises ValueError.

Local steps (``PISA(local_steps=H)``, a save mid-round): ``model`` holds the consensus w (the round's anchor) and each
agent's optimizer state holds its w_i as ``local_weights`` beside π_i, v_i / b_i, the step counters and the position in
the round (param-group keys ``local_calls``, ``round_tokens``); load puts w_i back into the parameters and w into the
anchor, so the run continues bit-identically. Merge and split treat ``local_weights`` like π (α-weighted average /
copy); the anchor, being the model, is shared. A checkpoint without local weights loaded into a local-steps run
starts a round at w; local weights loaded into a ``local_steps=1`` run are ignored (it continues from w).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ._utils import dist_on
from ._utils import local as _local

META = "pisa_meta.json"
FORMAT = 1


def _rank() -> int:
    return dist.get_rank() if dist_on() else 0


def _barrier() -> None:
    if dist_on():
        dist.barrier()


def _all_ranks(value) -> list:
    """Every rank's ``value`` (a small picklable object), in rank order."""
    if not dist_on():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _first_nonfinite(tree, prefix: str = "") -> str | None:
    """The key of the first floating tensor of a state-dict tree (this rank's shards) holding inf/NaN, or None."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif isinstance(tree, torch.Tensor) and tree.is_floating_point():
        return None if bool(torch.isfinite(_local(tree)).all()) else prefix
    else:
        return None
    for key, value in items:
        found = _first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def _raise_if_nonfinite(tree, what: str) -> None:
    """Collective: ValueError on every rank when any rank holds a non-finite tensor (named, with its rank)."""
    bad = [(rank, key) for rank, key in enumerate(_all_ranks(_first_nonfinite(tree))) if key is not None]
    if bad:
        rank, key = bad[0]
        raise ValueError(f"{what}: non-finite values (inf/NaN) in {key!r} on rank {rank}")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _checkpoint_files(version: str, skip: tuple[str, ...] = (META,)) -> list[str]:
    """Every file of a checkpoint but ``skip`` (its META), relative and sorted (the same list on every rank)."""
    found = []
    for root, _, names in os.walk(version):
        found += [os.path.relpath(os.path.join(root, n), version) for n in names]
    return sorted(f for f in found if f not in skip)


def _my_share(files: list[str]) -> list[str]:
    """The files this rank hashes: the work is split over the ranks."""
    world = dist.get_world_size() if dist_on() else 1
    return files[_rank() :: world]


def _agents(optimizer) -> tuple[int, int, float]:
    topo = getattr(optimizer, "consensus", None)
    if topo is None:
        return 1, 0, 1.0
    return topo.agents, topo.agent_index, float(topo.alpha)


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes a single process when torch.distributed is off: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _state_dicts(model: nn.Module, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    for o in optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]:
        if hasattr(o, "init_state"):  # PISA: every state tensor exists (zeros for parameters that never stepped)
            o.init_state()
    return get_state_dict(model, optimizer)


def save(path: str | os.PathLike, model: nn.Module, optimizer, extra: dict | None = None) -> str:
    """Write model + optimizer (+ ``extra``) to ``path`` atomically; every rank calls it. Returns the version dir."""
    import torch.distributed.checkpoint as dcp

    if extra is not None and not isinstance(extra, dict):
        raise ValueError(f"checkpoint.save: invalid extra={type(extra).__name__}: expected a dict or None")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.islink(path) and not os.path.isdir(path):
        raise ValueError(f"checkpoint.save: path={path!r} exists and is not a checkpoint directory")
    local = getattr(optimizer, "local_steps", 1) > 1
    # Local steps: the model is saved as the consensus w (the same on every agent, what export wants) and each
    # agent's w_i as its optimizer state "local_weights" (see pisa_zero.local_steps).
    with optimizer.consensus_weights() if local else contextlib.nullcontext():
        model_sd, optim_sd = _state_dicts(model, optimizer)
        # before anything is written: a diverged model must never replace the last good checkpoint
        _raise_if_nonfinite({"model": model_sd, "optimizer": optim_sd}, f"checkpoint.save: refusing to write {path!r}")
        agents, agent_index, alpha = _agents(optimizer)
        version = [f"{path}.v-{uuid.uuid4().hex[:12]}"]
        alphas = [alpha]
        if dist_on():
            dist.broadcast_object_list(version, src=0)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (agent_index, alpha))
            alphas = [dict(gathered)[i] for i in range(agents)]
        version = version[0]

        with _quiet():
            dcp.save({"model": model_sd, f"optim_agent{agent_index}": optim_sd}, checkpoint_id=version)
    os.makedirs(os.path.join(version, "extra"), exist_ok=True)
    torch.save(extra or {}, os.path.join(version, "extra", f"rank{_rank()}.pt"))
    _barrier()  # every rank's files are in place
    sums = file_checksums(version)
    if _rank() == 0:  # META last: its presence marks a complete checkpoint
        with open(os.path.join(version, META), "w") as f:
            meta = {"format": FORMAT, "agents": agents, "alphas": alphas, "local_weights": local}
            json.dump({**meta, "sha256": dict(sorted(sums.items()))}, f)
    _barrier()
    if _rank() == 0:
        _publish(path, version)
    _barrier()
    return version


def _publish(path: str, version: str) -> None:
    """Point ``path`` at ``version`` in one atomic rename; remove what it pointed to before."""
    previous = os.path.realpath(path) if os.path.islink(path) else None
    link = f"{path}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.basename(version), link)
    if os.path.isdir(path) and not os.path.islink(path):  # a plain directory from elsewhere: move it aside first
        aside = f"{path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(path, aside)
        os.replace(link, path)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(link, path)
    if previous and previous != os.path.realpath(version) and os.path.isdir(previous):
        shutil.rmtree(previous, ignore_errors=True)


def agent_mapping(saved_agents: int, agents: int, agent_index: int, alphas: list[float]) -> list[tuple[int, float]]:
    """[(old agent, weight)] that new agent ``agent_index`` of ``agents`` is built from (see the module doc)."""
    if agents == saved_agents:
        return [(agent_index, 1.0)]
    if agents < saved_agents and saved_agents % agents == 0:
        block = saved_agents // agents
        sources = list(range(agent_index * block, (agent_index + 1) * block))
        total = sum(alphas[j] for j in sources)
        return [(j, alphas[j] / total) for j in sources]
    if agents > saved_agents and agents % saved_agents == 0:
        return [(agent_index * saved_agents // agents, 1.0)]
    raise ValueError(
        f"checkpoint.load: cannot map the saved agents={saved_agents} onto agents={agents}: "
        "one agent count must divide the other (merge by α-weighted average, or split by copy)"
    )


def _empty_like_tree(tree):
    if isinstance(tree, dict):
        return {k: _empty_like_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_empty_like_tree(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    return tree


def file_checksums(folder: str, skip: tuple[str, ...] = (META,)) -> dict[str, str]:
    """Collective: {relative name: SHA-256} of every file under ``folder`` but ``skip``, each rank hashing a share
    (every rank must see the same files: a shared folder, after a barrier)."""
    sums = {f: _sha256(os.path.join(folder, f)) for f in _my_share(_checkpoint_files(folder, skip))}
    return dict(sorted((f, h) for share in _all_ranks(sums) for f, h in share.items()))


def verify_checksums(folder: str, sums: dict, what: str = "checkpoint.load", record: str = "the checkpoint") -> None:
    """Collective: ValueError on every rank, naming each file, unless every file in ``sums`` exists under ``folder``
    with the SHA-256 recorded for it in ``record`` (each rank hashes a share)."""
    problems = []
    for name in _my_share(sorted(sums)):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            problems.append(f"{file} is missing")
        elif _sha256(file) != sums[name]:
            problems.append(f"{file} is corrupted (its SHA-256 differs from the one recorded in {record} at save time)")
    problems = [p for share in _all_ranks(problems) for p in share]
    if problems:
        raise ValueError(f"{what}: {folder!r} failed verification: " + "; ".join(problems))


def _verify_files(path: str, meta_path: str, sums: dict | None, allow_unverified: bool) -> None:
    """Collective: every file listed in META exists and has its recorded SHA-256. A META without ``sha256`` (lost,
    or written before checksums existed) cannot be verified: refused unless ``allow_unverified``."""
    if sums is None:
        if not allow_unverified:
            raise ValueError(
                f"checkpoint.load: {meta_path} records no sha256 checksums, so the files of {path!r} cannot be "
                "verified; refusing to load them (pass allow_unverified=True to load them anyway, guarded only by "
                "the finite check)"
            )
        warnings.warn(
            f"checkpoint.load: {meta_path} records no sha256 checksums; loading unverified files", stacklevel=3
        )
        return
    verify_checksums(path, sums, record=META)


def load(path: str | os.PathLike, model: nn.Module, optimizer, *, allow_unverified: bool = False) -> dict:
    """Load ``path`` into ``model`` and ``optimizer`` (every rank calls it); returns this rank's ``extra``
    (rank 0's when the checkpoint had fewer ranks). ``allow_unverified``: load a checkpoint whose META records no
    checksums (with a warning) instead of refusing it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = os.fspath(path)
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise ValueError(f"checkpoint.load: path={path!r} is not a complete pisa_zero checkpoint (no {META})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint.load: cannot read {meta_path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint.load: unsupported format in {meta_path}")
    _verify_files(path, meta_path, meta.get("sha256"), allow_unverified)
    agents, agent_index, _ = _agents(optimizer)
    sources = agent_mapping(meta["agents"], agents, agent_index, meta["alphas"])

    model_sd, optim_template = _state_dicts(model, optimizer)
    for per_param in optim_template["state"].values():  # the anchor is the saved model (w); w_i is local_weights
        anchor = per_param.pop("anchor", None)
        if anchor is not None and meta.get("local_weights"):
            per_param["local_weights"] = anchor
    merged = None
    with _quiet():
        for n, (j, weight) in enumerate(sources):  # the same number of loads on every rank (DCP is collective)
            optim_sd = _empty_like_tree(optim_template)
            state = {f"optim_agent{j}": optim_sd}
            if n == 0:
                state["model"] = model_sd
            dcp.load(state, checkpoint_id=path)
            optim_sd = state[f"optim_agent{j}"]
            if len(sources) == 1:
                merged = optim_sd
                break
            if merged is None:
                merged = optim_sd
                for per_param in merged["state"].values():
                    for key, t in per_param.items():
                        if key != "step" and t.is_floating_point():
                            _local(t).mul_(weight)
            else:
                for fqn, per_param in optim_sd["state"].items():
                    for key, t in per_param.items():
                        if key != "step" and t.is_floating_point():
                            _local(merged["state"][fqn][key]).add_(_local(t), alpha=weight)
    _raise_if_nonfinite({"model": model_sd, "optimizer": merged}, f"checkpoint.load: {path!r} is unusable")
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=merged)
    if getattr(optimizer, "local_steps", 1) > 1:
        optimizer._rounds.restore_after_load()
    extra_dir = os.path.join(path, "extra")
    mine = os.path.join(extra_dir, f"rank{_rank()}.pt")
    return torch.load(mine if os.path.exists(mine) else os.path.join(extra_dir, "rank0.pt"), weights_only=False)
