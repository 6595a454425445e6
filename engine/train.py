"""Pretrain a transformer with PISA on DeepSpeed, FSDP2 or one process.

    deepspeed --num_gpus 2 engine/train.py --deepspeed_config configs/pisa_zero3.json [flags]
    torchrun --nproc_per_node 2 engine/train.py --backend fsdp2 [--agents M] [flags]
    python engine/train.py --backend single [flags]

(CPU-only machine: prefix the deepspeed command with DS_ACCELERATOR=cpu.) With no --data it trains on the embedded
default corpus: the Python standard library's own source, byte-level (vocabulary 256), built once and cached.
Writes TensorBoard logs to <out-dir>/tensorboard and checkpoints to <out-dir>/checkpoints/step_NNNNNN
(``latest`` names the newest complete one). Ctrl-C stops cleanly after writing a final checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import logging
import math
import os
import signal
import sys
import time
import warnings

if __package__ in (None, ""):  # `python engine/train.py` / `deepspeed engine/train.py`: make `engine` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import backends, checkpoints
from engine.data import Batches, load_corpus, partition_domains, val_windows
from engine.models import FAMILIES, SIZES, build_model, count_parameters
from pisa_zero.monitor import TensorBoard, all_reduce_sum, peak_memory_mb

# torch's collectives warn on every call about their own renames; keep the console readable
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")


def progress_fields(train_loss: float, tokens_per_s: float, val_loss: float) -> dict:
    """The progress bar's fields; the validation loss shows "-" until the first evaluation."""
    val = "-" if math.isnan(val_loss) else f"{val_loss:.3f}"
    return dict(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", val=val)


# ----------------------------------------------------------------------------------------------------- flags


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = p.add_argument_group("back end")
    a.add_argument(
        "--backend",
        choices=("auto", "single", "fsdp2", "deepspeed"),
        default="auto",
        help="auto: deepspeed when --deepspeed_config is given, fsdp2 under torchrun, else single",
    )
    a.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON config (selects the deepspeed back end)")
    a.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's launcher convention; no effect")
    a.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher; the LOCAL_RANK environment variable is used otherwise",
    )
    a.add_argument(
        "--agents",
        type=int,
        default=1,
        help="fsdp2 or deepspeed: number of PISA agents M (mode B; world = M x shards); 1 = mode A",
    )
    a.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="fsdp2: compute dtype of the parameters (the fp32 shards stay the master weights)",
    )
    a.add_argument("--cpu-offload", action="store_true", help="fsdp2: keep parameters and optimizer state on CPU")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    a.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a collective may wait for a lost rank before the run fails",
    )

    m = p.add_argument_group("model")
    m.add_argument("--model", choices=FAMILIES, default="gpt2", help="model family (transformers config)")
    m.add_argument("--size", choices=SIZES, default="tiny", help="tiny trains in seconds per step on a CPU")
    m.add_argument("--init-from", default=None, help="a local Hugging Face checkpoint directory (never downloads)")
    m.add_argument("--block-size", type=int, default=128, help="context length in tokens")
    m.add_argument("--dropout", type=float, default=0.0, help="dropout probability")

    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default=None,
        help="text file or folder (byte-level), .bin/.npy token file, or folder with train/val token "
        "files; default: the Python standard library's source",
    )
    d.add_argument("--cache-dir", default=None, help="where built corpora are cached (default ~/.cache/pisa_zero)")
    d.add_argument("--token-dtype", default="uint16", help="dtype of a raw .bin token file")
    d.add_argument("--vocab-size", type=int, default=None, help="token files: vocabulary size (default max id + 1)")
    d.add_argument("--val-fraction", type=float, default=0.02, help="single token file: fraction held out")
    d.add_argument(
        "--heterogeneity",
        action="store_true",
        help="mode B: give each agent its own part of the corpus (by stdlib package / folder)",
    )
    d.add_argument("--batch-size", type=int, default=16, help="sequences per rank per micro-step")
    d.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")

    o = p.add_argument_group("optimizer")
    o.add_argument(
        "--optimizer",
        choices=("pisa", "adamw", "muon"),
        default="pisa",
        help="pisa; or a baseline on the same data, schedule, logs and checkpoints: adamw (torch's AdamW, fused on "
        "CUDA, foreach on CPU) or muon (torch.optim.Muon on the block matrices PISA gives nsisa, AdamW with --aux-lr "
        "on the rest). DeepSpeed: the config's optimizer.type (PISA | AdamW | Muon) decides",
    )
    o.add_argument(
        "--lr",
        type=float,
        default=None,
        help="baselines: the lr of AdamW (every parameter) or of Muon (the matrices); default 3e-3 / 0.02. "
        "PISA's lr is 1/(σ+ρ)",
    )
    o.add_argument("--sigma", type=float, default=30.0, help="σ, the ADMM penalty of the PISA groups")
    o.add_argument("--rho", type=float, default=100.0, help="ρ, the preconditioner weight of the PISA groups")
    o.add_argument("--matrix-preconditioner", default="nsisa", help="block matrices: nsisa | sisa | adagrad | identity")
    o.add_argument(
        "--other-preconditioner",
        default="adamw",
        help="embeddings, head, norms, biases: adamw (auxiliary) | sisa | ...",
    )
    o.add_argument("--aux-lr", type=float, default=3e-3, help="lr of the auxiliary AdamW group (PISA, Muon)")
    o.add_argument("--aux-weight-decay", type=float, default=0.0, help="weight decay of the auxiliary AdamW group")
    o.add_argument("--momentum", type=float, default=0.95, help="nsisa (and Muon) momentum μ")
    o.add_argument("--beta2", type=float, default=0.999, help="sisa second-moment β₂")
    o.add_argument("--l2-lambda", type=float, default=0.0, help="λ, the consensus ℓ2 term")
    o.add_argument(
        "--local-steps",
        type=int,
        default=1,
        help="mode B (--agents M > 1): H local steps per consensus round, the agents meet every H-th step "
        "(docs/ALGORITHM.md §6); evaluation uses the consensus weights; 1 = every step",
    )
    o.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="decoupled weight decay of the PISA groups (baselines: AdamW's, Muon's)",
    )
    o.add_argument(
        "--implementation",
        choices=("auto", "single", "foreach", "compiled"),
        default="auto",
        help="PISA kernels; auto: torch.compile'd when a compiler is available, else foreach",
    )

    s = p.add_argument_group("schedule")
    s.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    s.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop (with a final eval and checkpoint) after this many minutes of training",
    )
    s.add_argument("--warmup-steps", type=int, default=20, help="linear lr warm-up (σ, ρ scale by lr_ref/lr)")
    s.add_argument(
        "--schedule",
        choices=("cosine", "constant", "config"),
        default="cosine",
        help="lr after warm-up; config: keep the DeepSpeed config's own scheduler",
    )
    s.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the lr")
    s.add_argument("--seed", type=int, default=0, help="model init and data order")

    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument("--out-dir", default="runs/pisa", help="TensorBoard logs and checkpoints go here")
    e.add_argument("--eval-interval", type=int, default=100, help="steps between validation evals (0: end only)")
    e.add_argument("--eval-windows", type=int, default=64, help="size of the fixed held-out set, in sequences")
    e.add_argument("--log-interval", type=int, default=10, help="steps between train/* and perf/* scalars")
    e.add_argument("--diag-interval", type=int, default=10, help="steps between pisa/* diagnostics")
    e.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard logs")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (one line per log interval instead)")
    e.add_argument("--ckpt-interval", type=int, default=200, help="steps between checkpoints (0: only at the end)")
    e.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    e.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from <out-dir>/checkpoints/latest, or from the checkpoint directory given",
    )
    e.add_argument(
        "--max-nonfinite",
        type=int,
        default=10,
        help="stop after this many consecutive steps skipped for a non-finite loss or gradient",
    )
    e.add_argument(
        "--inject-nonfinite",
        default="",
        help="testing aid: comma-separated steps whose loss is made NaN on rank 0 "
        "(prefix 'grad:' to poison a gradient instead)",
    )
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.explicit = {
        a.dest
        for a in parser._actions
        for opt in a.option_strings
        if any(x == opt or x.startswith(opt + "=") for x in argv)
    }
    if args.backend == "auto":
        if args.deepspeed_config:
            args.backend = "deepspeed"
        else:
            args.backend = "fsdp2" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"
    if args.backend == "deepspeed" and not args.deepspeed_config:
        parser.error("--backend deepspeed needs --deepspeed_config")
    for name in ("max_steps", "batch_size", "grad_accum", "block_size", "agents", "eval_windows", "keep_checkpoints",
                 "local_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.schedule == "config" and args.backend != "deepspeed":
        parser.error("--schedule config needs the deepspeed back end (a 'scheduler' in its config)")
    if args.agents > 1 and args.backend not in ("fsdp2", "deepspeed"):
        parser.error(f"--agents {args.agents} needs --backend fsdp2 or deepspeed (mode B)")
    if args.optimizer != "pisa" and args.agents > 1:
        parser.error(f"--agents {args.agents} is PISA's mode B; --optimizer {args.optimizer} has no consensus")
    if args.lr is None:
        args.lr = 0.02 if args.optimizer == "muon" else 3e-3
    if args.local_steps > 1 and args.agents == 1:
        parser.error(f"--local-steps {args.local_steps} needs agents (--agents M, M > 1)")
    spec = args.inject_nonfinite
    args.inject_kind = "grad" if spec.startswith("grad:") else "loss"
    try:
        args.inject_steps = {int(x) for x in spec.removeprefix("grad:").split(",") if x}
    except ValueError:
        parser.error(f"--inject-nonfinite={spec!r}: expected comma-separated step numbers")
    return args


# ------------------------------------------------------------------------------------------------- helpers
def setup_distributed(args):
    """(rank, world, device); initialises the process group when launched with several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    if args.backend == "deepspeed":
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)  # keep the console for training lines
        deepspeed.init_distributed(timeout=timeout)
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1 or args.backend == "fsdp2":
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, device_id=device if use_cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "single" and world > 1:
        raise SystemExit("--backend single runs in one process; use --backend fsdp2 or deepspeed with several ranks")
    return rank, world, device


def lr_factor(step: int, args) -> float:
    """Multiplier of every group's reference lr at optimizer step ``step`` (1-based): warm-up, then cosine."""
    if step <= args.warmup_steps:
        return step / max(args.warmup_steps, 1)
    if args.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - args.warmup_steps) / max(args.max_steps - args.warmup_steps, 1))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lm_loss(logits, y, reduction="mean"):
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
    return loss.mean() if reduction == "mean" else loss.view(y.shape).mean(1)


@torch.no_grad()
def evaluate(backend, windows, rank, world, batch_size, device) -> float:
    """Mean loss over the fixed held-out windows; each rank takes every world-th window (padded to equal counts)."""
    backend.train(False)
    mine = windows[rank::world]
    per_rank = math.ceil(len(windows) / world)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, per_rank, batch_size):
        chunk = mine[i : i + batch_size]
        real = len(chunk)
        if real < min(batch_size, per_rank - i):  # pad so every rank runs the same forwards (sharded models)
            chunk = torch.cat([chunk, windows[: min(batch_size, per_rank - i) - real]])
        chunk = chunk.to(device)
        losses = lm_loss(backend.forward(chunk[:, :-1]), chunk[:, 1:], reduction="none")[:real]
        total += torch.tensor([losses.double().sum().item(), real], dtype=torch.float64)
    backend.train(True)
    total = all_reduce_sum(total, device=device)
    return (total[0] / total[1]).item()


class StopRequest:
    """SIGINT/SIGTERM set a flag that the loop honours at the next step on every rank; a third signal exits."""

    def __init__(self):
        self.count = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.count += 1
        if self.count >= 3:
            os._exit(128 + signum)


# ---------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    master = rank == 0
    log = functools.partial(print, flush=True) if master else (lambda *a, **k: None)
    torch.manual_seed(args.seed)

    # data: rank 0 builds the cache once, the others then read it
    if master:
        load_corpus(
            args.data,
            args.cache_dir,
            token_dtype=args.token_dtype,
            vocab_size=args.vocab_size,
            val_fraction=args.val_fraction,
        )
    backends.barrier()
    corpus = load_corpus(
        args.data,
        args.cache_dir,
        token_dtype=args.token_dtype,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
    )

    # model and back end
    model = build_model(
        args.model,
        args.size,
        vocab_size=corpus.vocab_size,
        block_size=args.block_size,
        dropout=args.dropout,
        init_from=args.init_from,
    )
    n_params = count_parameters(model)
    logdir = None if args.no_tensorboard else os.path.join(args.out_dir, "tensorboard")
    if args.backend == "deepspeed":
        backend = backends.DeepSpeed(
            model, args, device, backends.deepspeed_config(args, args.explicit, logdir, say=log)
        )
        device = backend.engine.device
    elif args.backend == "fsdp2":
        backend = backends.FSDP2(model, args, device)
    else:
        backend = backends.Single(model, args, device)
    backend.train(True)
    topology = getattr(backend, "topology", None)
    agent = topology.agent_index if topology is not None else 0
    segments = None
    if args.heterogeneity:
        if topology is None:
            raise ValueError("invalid --heterogeneity: it needs agents (--agents M, M > 1, fsdp2 or deepspeed)")
        mine = set(partition_domains(corpus, topology.agents)[agent])
        segments = [s for s in corpus.segments if s[0] in mine]
    batches = Batches(corpus.train, args.block_size, args.batch_size, args.seed, stream=rank, segments=segments)
    windows = val_windows(corpus.val, args.block_size, args.eval_windows)
    tokens_per_step = args.batch_size * args.grad_accum * args.block_size * world

    # resume
    step, tokens, nonfinite_total = 0, 0, 0
    run = checkpoints.identity(args, world, corpus.vocab_size)
    resume_from = checkpoints.resolve_resume(args, say=log)
    if resume_from:
        checkpoints.check_identity(resume_from, run)
        extra = backend.load(resume_from)
        step, tokens, nonfinite_total = extra["step"], extra["tokens"], extra.get("nonfinite", 0)

    tb = TensorBoard(logdir, enabled=master and logdir is not None)
    if master:
        log(
            f"[pisa_zero] backend={backend.name} world={world} agents={args.agents} device={device} "
            f"model={args.model}-{args.size} ({n_params / 1e6:.2f}M params) data={corpus.source} "
            f"({len(corpus.train) / 1e6:.1f}M train / {len(corpus.val) / 1e6:.2f}M val tokens, "
            f"vocab {corpus.vocab_size})"
        )
        if resume_from:
            log(f"[pisa_zero] resumed from {resume_from} at step {step}")
        if logdir:
            log(f"[pisa_zero] TensorBoard logs: {os.path.abspath(logdir)}  (open: tensorboard --logdir {logdir})")
        tb.text("run/args", " ".join(sys.argv))
    stop = StopRequest()
    bar = None
    if master and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, initial=step, dynamic_ncols=True, desc="train", file=sys.stdout)
    say = bar.write if bar is not None else log
    started = time.time()
    consecutive_bad, last_val, exit_code, reason = 0, float("nan"), 0, "done"

    def extra_state():
        return {"step": step, "tokens": tokens, "nonfinite": nonfinite_total}

    while step < args.max_steps:
        step_started = time.time()
        factor = lr_factor(step + 1, args)
        if args.schedule != "config":
            for g in backend.param_groups:
                g["lr"] = g["lr_ref"] * factor
        diag = step + 1 == 1 or (step + 1) % args.diag_interval == 0

        # forward/backward over the micro-steps
        loss_sum, local_bad = 0.0, False
        for micro in range(args.grad_accum):
            x, y = batches.get(step, micro)
            loss = lm_loss(backend.forward(x.to(device)), y.to(device))
            if step + 1 in args.inject_steps and master and args.inject_kind == "loss":
                loss = loss * float("nan")
            local_bad |= not math.isfinite(loss.item())
            loss_sum += loss.item() if math.isfinite(loss.item()) else 0.0
            backend.backward(loss, last=micro == args.grad_accum - 1)
        if step + 1 in args.inject_steps and master and args.inject_kind == "grad" and backend.name != "deepspeed":
            next(p for p in backend.params() if p.grad is not None).grad.view(-1)[0] = float("inf")
        # one all-reduce: loss, non-finite flag, stop requests (a signal or the time limit, decided on rank 0)
        out_of_time = master and args.max_minutes is not None and time.time() - started > 60 * args.max_minutes
        flags = all_reduce_sum(
            [loss_sum / args.grad_accum, float(local_bad), float(stop.count > 0 or out_of_time)], device=device
        )
        finite = flags[1].item() == 0 and backend.grads_finite()
        backend.set_local_batch(args.batch_size * args.grad_accum * args.block_size)
        grad_norm = backend.grad_norm() if finite and diag and backend.name != "deepspeed" else None
        if finite:
            if diag and backend.monitor is not None:
                backend.monitor.snapshot()
            backend.step()
            consecutive_bad = 0
        elif not backend.can_skip:
            say(
                f"[pisa_zero] stopping at step {step + 1}: a non-finite loss or gradient, and DeepSpeed's "
                f"{args.optimizer} has no step that leaves its state untouched; resume from the last checkpoint"
            )
            exit_code, reason = 3, "nonfinite"
            break
        else:
            backend.skip()
            consecutive_bad += 1
            nonfinite_total += 1
        step += 1
        tokens += tokens_per_step
        train_loss = flags[0].item() / world if finite else float("nan")
        dt = time.time() - step_started

        # logging
        scalars = {}
        if not finite:
            say(
                f"step {step}: non-finite loss or gradient on some rank; step skipped on every rank "
                f"({consecutive_bad} in a row, {nonfinite_total} in total)"
            )
            scalars["train/nonfinite_skipped"] = nonfinite_total
        if step % args.log_interval == 0 or step == 1:
            scalars.update(
                {
                    "train/loss": train_loss,
                    "train/tokens": tokens,
                    "perf/step_time_s": dt,
                    "perf/tokens_per_s": tokens_per_step / dt,
                    "perf/peak_memory_mb": peak_memory_mb(),
                    "train/nonfinite_skipped": nonfinite_total,
                }
            )
            for i, g in enumerate(backend.param_groups):
                scalars[f"train/lr/{g.get('preconditioner', g.get('name'))}{'' if i < 2 else i}"] = g["lr"]
        if finite and diag:
            if backend.monitor is not None:
                scalars.update(backend.monitor.measure())
            if grad_norm is None:
                grad_norm = backend.grad_norm()
            scalars["train/grad_norm"] = grad_norm
        tb.scalars(scalars, step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(progress_fields(train_loss, tokens_per_step / dt, last_val))
        elif step % args.log_interval == 0:
            log(f"step {step}/{args.max_steps} loss {train_loss:.4f} {tokens_per_step / dt:,.0f} tok/s")

        if consecutive_bad >= args.max_nonfinite:
            say(
                f"[pisa_zero] stopping: {consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(limit --max-nonfinite {args.max_nonfinite}); the model was not updated by any of them. Lower the "
                "learning rate (raise --sigma/--rho) or check the data; resume from the last checkpoint."
            )
            exit_code, reason = 3, "nonfinite"
            break
        stopping = flags[2].item() > 0
        if (args.eval_interval and step % args.eval_interval == 0) or step == args.max_steps or stopping:
            # local steps: evaluate the round's consensus w, not this agent's w_i
            with backend.pisa.consensus_weights() if backend.pisa is not None else contextlib.nullcontext():
                last_val = evaluate(backend, windows, rank, world, args.batch_size, device)
            elapsed = time.time() - started
            say(
                f"step {step}: val loss {last_val:.4f} | val ppl {math.exp(min(last_val, 50)):.2f} | "
                f"train loss {train_loss:.4f} | {tokens / 1e6:.2f}M tokens | {elapsed / 60:.1f} min"
            )
            tb.scalars({"val/loss": last_val, "val/perplexity": math.exp(min(last_val, 50))}, step)
            if bar is not None:
                bar.set_postfix(progress_fields(train_loss, tokens_per_step / dt, last_val))
        if (args.ckpt_interval and step % args.ckpt_interval == 0) or step == args.max_steps or stopping:
            path = checkpoints.save(backend, args, rank, step, extra_state(), run, backends.barrier)
            say(f"step {step}: checkpoint {path}")
        tb.flush()
        if stopping:
            reason = "signal" if stop.count else "time limit"
            exit_code = 130 if stop.count else 0
            say(f"[pisa_zero] stopped at step {step} ({reason}); continue with the same command plus --resume")
            break

    if bar is not None:
        bar.close()
    log(
        f"[pisa_zero] finished: step {step}, val loss {last_val:.4f}, {nonfinite_total} non-finite steps skipped, "
        f"{(time.time() - started) / 60:.1f} min"
    )
    if logdir:
        log(f"[pisa_zero] TensorBoard: tensorboard --logdir {os.path.abspath(logdir)}")
    tb.close()
    return exit_code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)
