"""Pretrain a transformer with PISA (or the AdamW / Muon baselines) on DeepSpeed, FSDP2 or one process.

    deepspeed --num_gpus 2 engine/train.py --deepspeed_config configs/pisa_zero3.json [flags]
    torchrun --nproc_per_node 2 engine/train.py --backend fsdp2 [--agents M] [flags]
    python engine/train.py --backend single [flags]

One optimizer step: ``train_step`` (lr schedule, forward/backward over the micro-steps, one all-reduce of loss and
flags, step or skip on every rank) → ``log`` → ``evaluate_and_checkpoint`` → stop? Flags: engine/flags.py; back ends:
engine/backends.py; checkpoints: engine/checkpoints.py, resuming: engine/resume.py; the run folder's lock and
writability: engine/rundir.py; size checks: engine/sizes.py; stops: engine/stops.py; the fault-injection aid:
engine/faults.py.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass

if __package__ in (None, ""):  # `python engine/train.py` / `deepspeed engine/train.py`: make `engine` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine import backends, checkpoints, resume, rundir, sizes
from engine.data import Batches, load_corpus, partition_domains, val_windows
from engine.faults import Faults
from engine.flags import parse_args
from engine.models import build_model, count_parameters
from engine.stops import StopRequest
from pisa_zero._utils import all_reduce_sum, peak_memory_mb
from pisa_zero.monitor import TensorBoard

# torch's collectives warn on every call about their own renames; keep the console readable
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

EXIT_NONFINITE = 3  # --max-nonfinite consecutive skips, or a non-finite step DeepSpeed's own optimizer cannot skip
EXIT_NONFINITE_VAL = 4  # the validation loss is inf/NaN: the weights are gone; nothing of them is published


def progress_fields(train_loss: float, tokens_per_s: float, val_loss: float) -> dict:
    """The progress bar's fields; the validation loss shows "-" until the first evaluation."""
    val = "-" if math.isnan(val_loss) else f"{val_loss:.3f}"
    return dict(loss=f"{train_loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", val=val)


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
        # now, not at initialize: a run that stops before its engine is built must not leave 67 MB/rank in /dev/shm
        from pisa_zero.integrations.deepspeed import release_cpu_allreduce_buffer

        release_cpu_allreduce_buffer()
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1 or args.backend == "fsdp2":
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout, device_id=device if use_cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "single" and world > 1:
        raise SystemExit("--backend single runs in one process; use --backend fsdp2 or deepspeed with several ranks")
    if world % args.agents:
        raise SystemExit(f"--agents {args.agents} must divide the number of ranks ({world})")
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
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for i in range(0, per_rank, batch_size):
        chunk = mine[i : i + batch_size]
        real = len(chunk)
        if real < min(batch_size, per_rank - i):  # pad so every rank runs the same forwards (sharded models)
            chunk = torch.cat([chunk, windows[: min(batch_size, per_rank - i) - real]])
        chunk = chunk.to(device)
        losses = lm_loss(backend.forward(chunk[:, :-1]), chunk[:, 1:], reduction="none")[:real]
        total[0] += losses.double().sum()
        total[1] += real
    backend.train(True)
    total = all_reduce_sum(total, device=device)
    return (total[0] / total[1]).item()


def load_data(args, rank: int):
    """The corpus, built (and cached) once by rank 0 before the other ranks read the cache."""
    kw = dict(token_dtype=args.token_dtype, vocab_size=args.vocab_size, val_fraction=args.val_fraction)
    corpus = load_corpus(args.data, args.cache_dir, **kw) if rank == 0 else None
    backends.barrier()
    return corpus if corpus is not None else load_corpus(args.data, args.cache_dir, **kw)


@dataclass
class StepResult:
    loss: float  # mean over ranks and micro-steps; nan when the step was skipped
    finite: bool  # every rank's loss and gradients were finite (the step was taken)
    stop: bool  # some rank asked to stop (a signal, its launcher gone, the time limit)
    seconds: float


class Trainer:
    """The training loop's state and its stages; ``run()`` reads as the loop."""

    def __init__(self, args, backend, corpus, rank, world, device, run_identity, say, tb, bar):
        self.args, self.backend, self.rank, self.world, self.device = args, backend, rank, world, device
        self.run_identity, self.say, self.tb, self.bar = run_identity, say, tb, bar
        topology = getattr(backend, "topology", None)
        segments = None
        if args.heterogeneity:
            mine = set(partition_domains(corpus, topology.agents)[topology.agent_index])
            segments = [s for s in corpus.segments if s[0] in mine]
        self.batches = Batches(corpus.train, args.block_size, args.batch_size, args.seed, rank, segments=segments)
        self.windows = val_windows(corpus.val, args.block_size, args.eval_windows)
        self.tokens_per_step = args.batch_size * args.grad_accum * args.block_size * world
        self.faults = Faults(args.inject_nonfinite, rank)
        self.stop = StopRequest()
        self.step, self.tokens, self.nonfinite_total, self.consecutive_bad = 0, 0, 0, 0
        self.last_val = float("nan")
        self.started = time.time()

    # ------------------------------------------------------------------------------------------- stages
    def train_step(self) -> StepResult:
        """One optimizer step on every rank: forward/backward, then the step with its one finite check and one
        all-reduce of (loss, non-finite, stop) — or a skip on every rank when anything on any rank was non-finite."""
        args, backend, step = self.args, self.backend, self.step + 1
        started = time.time()
        if args.schedule != "config":
            for g in backend.param_groups:
                g["lr"] = g["lr_ref"] * lr_factor(step, args)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        bad = torch.zeros((), dtype=torch.float64, device=self.device)
        for micro in range(args.grad_accum):
            x, y = self.batches.get(step - 1, micro)
            loss = self.faults.loss(
                step, lm_loss(self.faults.logits(step, backend.forward(x.to(self.device))), y.to(self.device))
            )
            finite = torch.isfinite(loss.detach())
            loss_sum += torch.where(finite, loss.detach(), 0.0)
            bad += (~finite).double()
            backend.backward(loss, last=micro == args.grad_accum - 1)
        if self.rank == 0 and args.max_minutes is not None and time.time() - self.started > 60 * args.max_minutes:
            self.stop.request("time limit", 0)
        stop = torch.tensor(float(self.stop.reason is not None), dtype=torch.float64, device=self.device)
        backend.set_local_batch(args.batch_size * args.grad_accum * args.block_size)
        diag = step % args.diag_interval == 0 or step == 1
        self.grad_norm = backend.grad_norm() if diag and backend.name != "deepspeed" else None
        if diag and backend.monitor is not None:
            backend.monitor.snapshot()
        # the step's one finite check and one control all-reduce (loss, stop): every rank steps or skips together
        finite, flags = backend.step(torch.stack([loss_sum / args.grad_accum, stop]), veto=bad > 0)
        return self._count(StepResult(flags[0] / self.world, finite, flags[1] > 0, 0.0), started)

    def _count(self, result: StepResult, started: float) -> StepResult:
        """Step counters after the step (taken or skipped on every rank alike)."""
        backend = self.backend
        if result.finite:
            self.consecutive_bad = 0
        elif backend.can_skip:
            self.consecutive_bad += 1
            self.nonfinite_total += 1
            result.loss = float("nan")
        self.step += 1
        self.tokens += self.tokens_per_step
        self.faults.after_step(self.step, backend.params())
        result.seconds = time.time() - started
        return result

    def log(self, result: StepResult) -> None:
        args, step, scalars = self.args, self.step, {}
        if not result.finite:
            self.say(
                f"step {step}: non-finite loss or gradient on some rank; step skipped on every rank "
                f"({self.consecutive_bad} in a row, {self.nonfinite_total} in total)"
            )
            scalars["train/nonfinite_skipped"] = self.nonfinite_total
        tokens_per_s = self.tokens_per_step / result.seconds
        if step % args.log_interval == 0 or step == 1:
            scalars.update({"train/loss": result.loss, "train/tokens": self.tokens})
            scalars.update({"perf/step_time_s": result.seconds, "perf/tokens_per_s": tokens_per_s})
            scalars.update({"perf/peak_memory_mb": peak_memory_mb(), "train/nonfinite_skipped": self.nonfinite_total})
            for i, g in enumerate(self.backend.param_groups):
                scalars[f"train/lr/{g.get('preconditioner', g.get('name'))}{'' if i < 2 else i}"] = g["lr"]
        if result.finite and (step % args.diag_interval == 0 or step == 1):
            if self.backend.monitor is not None:
                scalars.update(self.backend.monitor.measure())
            scalars["train/grad_norm"] = self.grad_norm if self.grad_norm is not None else self.backend.grad_norm()
        self.tb.scalars(scalars, step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(progress_fields(result.loss, tokens_per_s, self.last_val))
        elif step % args.log_interval == 0:
            self.say(f"step {step}/{args.max_steps} loss {result.loss:.4f} {tokens_per_s:,.0f} tok/s")

    def evaluate(self, train_loss: float) -> float:
        pisa = self.backend.pisa  # local steps: evaluate the round's consensus w, not this agent's w_i
        if pisa is not None and pisa.round_position and self.backend.name == "deepspeed":
            self.say(
                f"step {self.step}: evaluating mid-round under DeepSpeed: its forward uses each agent's own w_i "
                "(consensus_weights() swaps only the optimizer's fp32 partitions); use an --eval-interval and "
                "--max-steps that are multiples of --local-steps for the consensus"
            )
        with pisa.consensus_weights() if pisa is not None else contextlib.nullcontext():
            self.last_val = evaluate(
                self.backend, self.windows, self.rank, self.world, self.args.batch_size, self.device
            )
        ppl = math.exp(min(self.last_val, 50))
        self.say(
            f"step {self.step}: val loss {self.last_val:.4f} | val ppl {ppl:.2f} | train loss {train_loss:.4f} | "
            f"{self.tokens / 1e6:.2f}M tokens | {(time.time() - self.started) / 60:.1f} min"
        )
        self.tb.scalars({"val/loss": self.last_val, "val/perplexity": ppl}, self.step)
        return self.last_val

    def checkpoint(self) -> int | None:
        """Write a checkpoint of finite weights, or refuse to (an exit code) and leave ``latest`` where it was."""
        if not self.backend.weights_finite():
            self.say(
                f"[pisa_zero] stopping at step {self.step}: the weights are not finite, so no checkpoint of them is "
                "written (latest still names the last good one). Resume from it with a lower learning rate."
            )
            return EXIT_NONFINITE_VAL
        extra = {"step": self.step, "tokens": self.tokens, "nonfinite": self.nonfinite_total}
        path = checkpoints.save(self.backend, self.args, self.rank, self.step, extra, self.run_identity)
        self.say(f"step {self.step}: checkpoint {path}")
        return None

    def evaluate_and_checkpoint(self, result: StepResult) -> int | None:
        """Interval and final evaluations and checkpoints; an exit code when the run must stop here.

        A stop writes its checkpoint first (the launcher's grace period may end during the evaluation); otherwise
        a checkpoint follows an evaluation whose loss is finite, so a diverged model is never published."""
        args, step = self.args, self.step
        last = step == args.max_steps or result.stop
        wants_eval = (args.eval_interval and step % args.eval_interval == 0) or last
        wants_ckpt = (args.ckpt_interval and step % args.ckpt_interval == 0) or last
        if result.stop:
            code = self.checkpoint()
            self.evaluate(result.loss)
            return code
        if wants_eval and not math.isfinite(self.evaluate(result.loss)):
            self.say(
                f"[pisa_zero] stopping: the validation loss at step {step} is {self.last_val}; the weights are not "
                "finite, so no checkpoint of them is written. Resume from the last checkpoint with a lower "
                "learning rate (higher --sigma/--rho)."
            )
            return EXIT_NONFINITE_VAL
        return self.checkpoint() if wants_ckpt else None

    def nonfinite_stop(self, result: StepResult) -> int | None:
        if not result.finite and not self.backend.can_skip:
            self.say(
                f"[pisa_zero] stopping at step {self.step}: a non-finite loss or gradient, and DeepSpeed's "
                f"{self.args.optimizer} has no step that leaves its state untouched; resume from the last checkpoint"
            )
            return EXIT_NONFINITE
        if self.consecutive_bad >= self.args.max_nonfinite:
            self.say(
                f"[pisa_zero] stopping: {self.consecutive_bad} consecutive steps had a non-finite loss or gradient "
                f"(limit --max-nonfinite {self.args.max_nonfinite}); the model was not updated by any of them. Lower "
                "the learning rate (raise --sigma/--rho) or check the data; resume from the last checkpoint."
            )
            return EXIT_NONFINITE
        return None

    # -------------------------------------------------------------------------------------------- loop
    def run(self) -> int:
        while self.step < self.args.max_steps:
            result = self.train_step()
            self.log(result)
            code = self.nonfinite_stop(result)
            if code is None:
                code = self.evaluate_and_checkpoint(result)
            self.tb.flush()
            if code is not None:
                return code
            if result.stop:
                self.say(
                    f"[pisa_zero] stopped at step {self.step} ({self.stop.reason or 'another rank'}); continue with "
                    "the same command plus --resume"
                )
                return self.stop.exit_code if self.stop.reason else 128 + 15
        return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args)
    log = functools.partial(print, flush=True) if rank == 0 else (lambda *a, **k: None)
    with rundir.claim(args, rank, say=log):  # writable folders and the run folder's lock, before any work
        return pretrain(args, rank, world, device, log)


def pretrain(args, rank, world, device, log) -> int:
    """Everything after the ranks are up and the run folder is claimed: checks, build, resume, the loop."""
    torch.manual_seed(args.seed)
    logdir = None if args.no_tensorboard else os.path.join(args.out_dir, "tensorboard")
    # the DeepSpeed JSON is read (and checked) first: it decides the optimizer, batch size and accumulation
    ds_config = backends.deepspeed_config(args, args.explicit, logdir, log) if args.backend == "deepspeed" else None
    corpus = load_data(args, rank)
    sizes.check(args, corpus, world, device, ds_config)  # size flags against the model, data and memory
    run_settings = resume.settings(args, world, corpus.vocab_size, ds_config)
    resume_from = checkpoints.resolve_resume(args, say=log)
    if resume_from:  # refused settings and unverifiable files fail here, before anything is built
        resume.check(resume_from, run_settings, args, say=log)

    model = build_model(
        args.model,
        args.size,
        vocab_size=corpus.vocab_size,
        block_size=args.block_size,
        dropout=args.dropout,
        init_from=args.init_from,
    )
    n_params = count_parameters(model)  # before ZeRO-3 partitions it
    backend = backends.build(args, model, device, ds_config)
    backend.train(True)
    tb = TensorBoard(logdir, enabled=rank == 0 and logdir is not None)
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.max_steps, dynamic_ncols=True, desc="train", file=sys.stdout)
    say = bar.write if bar is not None else log
    trainer = Trainer(args, backend, corpus, rank, world, device, run_settings, say, tb, bar)
    if resume_from:
        extra = resume.load(backend, resume_from, args, say=log)
        trainer.step, trainer.tokens = extra["step"], extra["tokens"]
        trainer.nonfinite_total = extra.get("nonfinite", 0)
        if bar is not None:
            bar.update(trainer.step)
    log(
        f"[pisa_zero] backend={backend.name} world={world} agents={args.agents} device={device} "
        f"optimizer={args.optimizer} model={args.model}-{args.size} ({n_params / 1e6:.2f}M params) "
        f"data={corpus.source} ({len(corpus.train) / 1e6:.1f}M train / {len(corpus.val) / 1e6:.2f}M val tokens, "
        f"vocab {corpus.vocab_size})"
    )
    if resume_from:
        log(f"[pisa_zero] resumed from {resume_from} at step {trainer.step}")
    if logdir:
        log(f"[pisa_zero] TensorBoard logs: {os.path.abspath(logdir)}  (open: tensorboard --logdir {logdir})")
    tb.text("run/args", " ".join(sys.argv))

    code = trainer.run()
    if bar is not None:
        bar.close()
    log(
        f"[pisa_zero] finished: step {trainer.step}, val loss {trainer.last_val:.4f}, {trainer.nonfinite_total} "
        f"non-finite steps skipped, {(time.time() - trainer.started) / 60:.1f} min"
    )
    if logdir:
        log(f"[pisa_zero] TensorBoard: tensorboard --logdir {os.path.abspath(logdir)}")
    tb.close()
    return code


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os._exit(code)
