"""The engine's size flags against what the model, the data and the machine can hold — before anything is allocated.

- ``--block-size`` against ``--init-from``'s positions (its config's ``n_positions`` / ``max_position_embeddings``)
  and against the data: a window of block-size + 1 tokens must fit in the validation split and in a training span.
- A lower bound of the bytes one rank needs against the memory available to it (device: free CUDA memory; host:
  ``MemAvailable``, or the cgroup's limit when lower, shared by the node's ranks):

  * weights, gradients and optimizer state: 12 bytes per parameter (the fp32 weight, its gradient and at least one
    fp32 state tensor; PISA keeps two, AdamW two), divided by the ranks for the sharded back ends (fsdp2, deepspeed);
    parameters counted on the meta device (nothing allocated), so GPT-2's position table of ``--block-size`` rows
    is in it; on the host with CPU offload;
  * logits: batch × block × vocabulary × 4 bytes (the loss is taken in fp32);
  * hidden states: batch × block × width × layers × 4 bytes (one per layer is kept for the backward);
  * the validation windows: ``--eval-windows`` × (block + 1) × 8 bytes, on the host.

  A run it refuses cannot fit; a run it passes may still run out of memory (attention, MLP activations, buffers).

Every rank checks and all agree (`engine.rundir.agree`); the message names the flags of the largest parts.
"""

from __future__ import annotations

import os

import torch

from engine.models import count_parameters, model_config
from engine.rundir import agree

BYTES_PER_PARAM = 12


def data_problem(args, corpus) -> str | None:
    window = args.block_size + 1
    if len(corpus.val) <= window:
        return (
            f"[pisa_zero] --block-size {args.block_size}: the validation split of {corpus.source} has only "
            f"{len(corpus.val):,} tokens; a window needs --block-size + 1 = {window:,}"
        )
    longest = max(end - start for _, start, end in corpus.segments)
    if longest <= window:
        return (
            f"[pisa_zero] --block-size {args.block_size}: longer than every span of the training data of "
            f"{corpus.source} (the longest has {longest:,} tokens; a window needs --block-size + 1 = {window:,})"
        )
    return None


def _config(args, vocab_size: int):
    if args.init_from:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(args.init_from, local_files_only=True)
    return model_config(args.model, args.size, vocab_size, args.block_size, args.dropout)


def positions_problem(args, config) -> str | None:
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if args.init_from and limit and args.block_size > limit:
        return (
            f"[pisa_zero] --block-size {args.block_size} exceeds the {limit} positions of --init-from "
            f"{args.init_from} (its config's n_positions / max_position_embeddings); use --block-size {limit} or less"
        )
    return None


def terms(args, config, n_params: int, world: int) -> list[tuple[float, str, str]]:
    """[(bytes per rank, "state" | "activations" | "host", what, naming its flags)] of the lower bound."""
    shards = world if args.backend in ("fsdp2", "deepspeed") else 1
    b, t, vocab = args.batch_size, args.block_size, config.vocab_size
    width, layers = config.hidden_size, config.num_hidden_layers
    where = f"--model {args.model} --size {args.size}" if not args.init_from else f"--init-from {args.init_from}"
    if getattr(config, "n_positions", None) and not args.init_from:
        where += f", a position table of --block-size {t} rows"
    share = f" / {shards} ranks" if shards > 1 else ""
    return [
        (BYTES_PER_PARAM * n_params / shards, "state",
         f"weights, gradients and optimizer state: {n_params / 1e6:,.1f}M parameters ({where}) x 12 bytes{share}"),
        (4.0 * b * t * vocab, "activations",
         f"logits: --batch-size {b} x --block-size {t} x vocabulary {vocab} x 4 bytes"),
        (4.0 * b * t * width * layers, "activations",
         f"hidden states: --batch-size {b} x --block-size {t} x width {width} x {layers} layers x 4 bytes"),
        (8.0 * args.eval_windows * (t + 1), "host",
         f"validation windows: --eval-windows {args.eval_windows} x (--block-size {t} + 1) x 8 bytes"),
    ]  # fmt: skip


def memory_problem(parts: list[tuple[float, str, str]], free: dict[str, float | None]) -> str | None:
    """The refusal when the parts placed on "device" or "host" exceed what ``free`` says is there (None: unknown)."""
    for memory in ("device", "host"):
        mine = sorted(((b, what) for b, where, what in parts if where == memory), reverse=True)
        need = sum(b for b, _ in mine)
        if free.get(memory) is None or need <= free[memory]:
            continue
        largest = "; ".join(f"{what} = {b / 2**30:,.1f} GiB" for b, what in mine[:2])
        return (
            f"[pisa_zero] this run cannot fit: one rank needs at least {need / 2**30:,.1f} GiB of {memory} memory "
            f"and {free[memory] / 2**30:,.1f} GiB are available to it. The largest parts: {largest}. Lower the flags "
            "named there (checked before anything is allocated; the estimate is a lower bound)."
        )
    return None


def host_available() -> float | None:
    """Bytes the host can still give: MemAvailable, or the cgroup's remaining limit when lower; None: unknown."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    return float(min(found)) if found else None


def _offload(args, ds_config: dict | None) -> str | None:
    """Where the state lives when not on the device: "cpu", "nvme" (neither counted), or None."""
    if args.cpu_offload:
        return "cpu"
    zero = (ds_config or {}).get("zero_optimization") or {}
    devices = {(zero.get(k) or {}).get("device", "none") for k in ("offload_optimizer", "offload_param")}
    return "cpu" if "cpu" in devices else ("nvme" if "nvme" in devices else None)


def _placed(parts, device: torch.device, offload: str | None):
    """Each part on "device" or "host" (a CPU run holds everything on the host); NVMe-offloaded state on neither."""
    placed = []
    for b, kind, what in parts:
        if kind == "state" and offload == "nvme":
            continue
        on_device = device.type == "cuda" and (kind == "activations" or (kind == "state" and offload is None))
        placed.append((b, "device" if on_device else "host", what))
    return placed


def check(args, corpus, world: int, device: torch.device, ds_config: dict | None = None) -> None:
    """Collective, before the model is built: SystemExit on every rank naming the flag when a size cannot work."""
    problem = data_problem(args, corpus)
    config = None
    if problem is None and (not args.init_from or os.path.isdir(args.init_from)):  # else build_model names it
        config = _config(args, corpus.vocab_size)
        problem = positions_problem(args, config)
    if problem is None and config is not None:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            n_params = count_parameters(AutoModelForCausalLM.from_config(config))
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        host = host_available()
        free = {"host": host / local_ranks if host is not None else None, "device": None}
        if device.type == "cuda":
            free["device"] = float(torch.cuda.mem_get_info(device)[0])
        parts = _placed(terms(args, config, n_params, world), device, _offload(args, ds_config))
        problem = memory_problem(parts, free)
    agree(problem)
