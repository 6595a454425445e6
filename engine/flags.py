"""engine/train.py's command line: the flags (``--help`` explains each) and their validation, done before any work.

Every bad value fails here with a message naming the flag: wrong type (argparse), out of range, flags that would be
silently ignored by the chosen back end or optimizer, and combinations that cannot work.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np

from engine.faults import Faults
from engine.models import FAMILIES, SIZES

USAGE = """\
    deepspeed --num_gpus 2 engine/train.py --deepspeed_config configs/pisa_zero3.json [flags]
    torchrun --nproc_per_node 2 engine/train.py --backend fsdp2 [--agents M] [flags]
    python engine/train.py --backend single [flags]

(CPU-only machine: prefix the deepspeed command with DS_ACCELERATOR=cpu.) With no --data it trains on the embedded
default corpus: the Python standard library's own source, byte-level (vocabulary 256), built once and cached.
Writes TensorBoard logs to <out-dir>/tensorboard and checkpoints to <out-dir>/checkpoints/step_NNNNNN
(``latest`` names the newest complete one). Ctrl-C or SIGTERM stops cleanly after writing a final checkpoint.
"""

#: flags of PISA only, and of the baselines only: given explicitly with the other optimizer they would do nothing
PISA_FLAGS = ("sigma", "rho", "matrix_preconditioner", "other_preconditioner", "beta2", "l2_lambda", "implementation")
PISA_FLAGS += ("local_steps", "prox_sigma", "centred_dual", "routing_bytes")
BASELINE_FLAGS = ("lr",)


def _backend_flags(p: argparse.ArgumentParser) -> None:
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
        help="fsdp2: compute dtype of the parameters (the fp32 shards stay the master weights); "
        "deepspeed: bf16.enabled",
    )
    a.add_argument("--cpu-offload", action="store_true", help="fsdp2: keep parameters and optimizer state on CPU")
    a.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    a.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a collective may wait for a lost rank before the run fails",
    )


def _model_and_data_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=FAMILIES, default="gpt2", help="model family (transformers config)")
    m.add_argument("--size", choices=SIZES, default="tiny", help="tiny trains in seconds per step on a CPU")
    m.add_argument("--init-from", default=None, help="a local Hugging Face checkpoint directory (never downloads)")
    m.add_argument(
        "--block-size",
        type=int,
        default=128,
        help="context length in tokens; checked before anything is allocated against --init-from's positions, the "
        "data, and (with --batch-size, --size) a lower bound of the memory one rank needs",
    )
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


def _optimizer_flags(p: argparse.ArgumentParser) -> None:
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
    o.add_argument(
        "--clip-grad",
        type=float,
        default=0.0,
        help="clip the gradients' global norm to this value (0: no clipping; Megatron's --clip-grad). single/fsdp2: "
        "the clip's norm also decides the non-finite skip (a non-finite norm skips the step on every rank), so the "
        "gradients are read once, not twice. deepspeed: sets the JSON's gradient_clipping",
    )
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
        "--prox-sigma",
        type=float,
        default=None,
        help="with --local-steps H > 1: σ_p of the proximal term, dual ascent and consensus (default: σ, the §6 "
        "update); σ/H is the measured best for nsisa (docs/benchmarks/heterogeneity.md)",
    )
    o.add_argument(
        "--centred-dual",
        action="store_true",
        help="with --local-steps H > 1: the consensus averages the local points and the duals keep only their drift "
        "correction (SCAFFOLD-like, same bytes; docs/ALGORITHM.md §6)",
    )
    o.add_argument(
        "--weight-decay",
        type=float,
        default=0.0,
        help="decoupled weight decay of the PISA groups (baselines: AdamW's, Muon's)",
    )
    o.add_argument(
        "--routing-bytes",
        type=int,
        default=None,
        help="fsdp2 or deepspeed with nsisa: bytes of whole-matrix routing buffers one rank holds at a time (NSISA "
        "sends each matrix's pieces to an owner rank for Newton-Schulz, in rounds of at most this many bytes sent + "
        "received + assembled; at least one Newton-Schulz batch per round); bounds NSISA's extra memory, results are "
        "bit-identical for any value. Default 256 MiB (deepspeed: the JSON's optimizer.params.routing_bytes, which "
        "this flag overrides)",
    )
    o.add_argument(
        "--implementation",
        choices=("auto", "single", "foreach", "compiled"),
        default="auto",
        help="PISA kernels; auto: torch.compile'd when a compiler is available, else foreach",
    )


def _schedule_flags(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("schedule")
    s.add_argument("--max-steps", type=int, default=1000, help="optimizer steps")
    s.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop (with a final checkpoint and eval) after this many minutes of training",
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


def _output_flags(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("evaluation, logging, checkpoints")
    e.add_argument(
        "--out-dir",
        default="runs/pisa",
        help="TensorBoard logs and checkpoints go here; one run at a time (a second run on the same folder is "
        "refused, naming the holder of <out-dir>/.lock), and it must be writable (checked before training)",
    )
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
        help="continue from <out-dir>/checkpoints/latest (or the newest complete checkpoint when latest is "
        "unusable), or from the checkpoint directory given. A setting that differs from the checkpoint's is honoured "
        "(logged with both values: the optimizer's hyper-parameters, batch, seed, schedule) or refused naming the "
        "flag (what the saved state is: model, sizes, --optimizer, preconditioners, --local-steps, --centred-dual); "
        "docs/engine.md",
    )
    e.add_argument(
        "--allow-unverified-checkpoint",
        action="store_true",
        help="--resume from a checkpoint whose files cannot be verified (its pisa_meta.json, or a DeepSpeed "
        "checkpoint's run.json, records no SHA-256 checksums: lost, or written before they existed); refused "
        "otherwise. Its tensors are then only checked to be finite",
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
        help="testing aid: comma-separated steps whose loss is made NaN on rank 0 (prefix 'grad:' to poison the "
        "gradients instead, 'weights:' to poison a weight after the step on every rank)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a transformer with PISA on DeepSpeed, FSDP2 or one process.",
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (_backend_flags, _model_and_data_flags, _optimizer_flags, _schedule_flags, _output_flags):
        add(p)
    return p


def _explicit(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests of the flags written on the command line (so a flag overrides only what it names)."""
    return {
        a.dest
        for a in parser._actions
        for opt in a.option_strings
        if any(x == opt or x.startswith(opt + "=") for x in argv)
    }


def _check_ranges(args, error) -> None:
    ints = {"max_steps": 1, "batch_size": 1, "grad_accum": 1, "block_size": 1, "agents": 1, "eval_windows": 1}
    ints.update(keep_checkpoints=1, log_interval=1, diag_interval=1, max_nonfinite=1, local_steps=1)
    ints.update(eval_interval=0, ckpt_interval=0, warmup_steps=0, seed=0)
    for name, low in ints.items():
        if getattr(args, name) < low:
            error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    # (name, ok, expected); "not (x > 0)" style so that nan fails too
    floats = [
        ("dist_timeout", args.dist_timeout > 0 and math.isfinite(args.dist_timeout), "> 0"),
        ("dropout", 0 <= args.dropout < 1, "in [0, 1)"),
        ("val_fraction", 0 < args.val_fraction < 1, "in (0, 1)"),
        ("min_lr_ratio", 0 <= args.min_lr_ratio <= 1, "in [0, 1]"),
        ("max_minutes", args.max_minutes is None or args.max_minutes > 0, "> 0"),
        ("sigma", args.sigma > 0 and math.isfinite(args.sigma), "a finite number > 0"),
        ("rho", args.rho >= 0 and math.isfinite(args.rho), "a finite number >= 0"),
        ("aux_lr", args.aux_lr > 0 and math.isfinite(args.aux_lr), "a finite number > 0"),
        ("lr", args.lr is None or (args.lr > 0 and math.isfinite(args.lr)), "a finite number > 0"),
        ("clip_grad", args.clip_grad >= 0 and math.isfinite(args.clip_grad), "a finite number >= 0 (0: off)"),
        ("momentum", 0 <= args.momentum < 1, "in [0, 1)"),
        ("beta2", 0 <= args.beta2 < 1, "in [0, 1)"),
        ("l2_lambda", args.l2_lambda >= 0 and math.isfinite(args.l2_lambda), "a finite number >= 0"),
        ("weight_decay", args.weight_decay >= 0 and math.isfinite(args.weight_decay), "a finite number >= 0"),
        ("aux_weight_decay", args.aux_weight_decay >= 0 and math.isfinite(args.aux_weight_decay), ">= 0"),
    ]
    for name, ok, expected in floats:
        if not ok:
            error(f"--{name.replace('_', '-')} must be {expected}, got {getattr(args, name)}")
    if args.routing_bytes is not None and args.routing_bytes < 1:
        error(f"--routing-bytes must be >= 1, got {args.routing_bytes}")
    if args.vocab_size is not None and args.vocab_size < 2:
        error(f"--vocab-size must be >= 2, got {args.vocab_size}")
    try:
        if not np.issubdtype(np.dtype(args.token_dtype), np.integer):
            raise TypeError
    except TypeError:
        error(f"--token-dtype must be an integer numpy dtype (uint16, int32, ...), got {args.token_dtype!r}")


def _check_combinations(args, error) -> None:
    """Flags the chosen back end or optimizer would silently ignore, and combinations that cannot work."""
    given = args.explicit
    if args.backend == "deepspeed" and not args.deepspeed_config:
        error("--backend deepspeed needs --deepspeed_config")
    if args.deepspeed_config and args.backend != "deepspeed":
        error(f"--deepspeed_config is read by the deepspeed back end only, not --backend {args.backend}")
    if args.deepspeed_config and not os.path.isfile(args.deepspeed_config):
        error(f"--deepspeed_config={args.deepspeed_config!r}: no such file")
    if args.schedule == "config" and args.backend != "deepspeed":
        error("--schedule config needs the deepspeed back end (a 'scheduler' in its config)")
    if args.agents > 1 and args.backend not in ("fsdp2", "deepspeed"):
        error(f"--agents {args.agents} needs --backend fsdp2 or deepspeed (mode B)")
    if args.local_steps > 1 and args.agents == 1:
        error(f"--local-steps {args.local_steps} needs agents (--agents M, M > 1)")
    for flag in ("prox_sigma", "centred_dual"):
        if flag in given and args.local_steps == 1 and args.backend != "deepspeed":  # deepspeed: PISA checks the JSON
            error(f"--{flag.replace('_', '-')} changes the local-step round: it needs --local-steps H > 1")
    if args.prox_sigma is not None and not (math.isfinite(args.prox_sigma) and args.prox_sigma > 0):
        error(f"--prox-sigma={args.prox_sigma}: expected a finite value > 0")
    if args.clip_grad > 0 and args.agents > 1:  # (a DeepSpeed JSON's agents: engine/dsconfig.py)
        error(
            f"--clip-grad {args.clip_grad} with --agents {args.agents}: mode B agents each have their own gradient; "
            "one norm over all agents' would clip each agent by the others' (no clipping in mode B)"
        )
    if args.heterogeneity and args.agents < 2:
        error("--heterogeneity gives each agent its own data: it needs --agents M with M > 1")
    for flag in ("cpu_offload",) + (("dtype",) if args.backend == "single" else ()):
        if flag in given and args.backend != "fsdp2":
            error(f"--{flag.replace('_', '-')} applies to --backend fsdp2 only, not {args.backend}")
    if args.routing_bytes is not None and args.backend == "single":
        error("--routing-bytes bounds NSISA's routing across ranks: it applies to --backend fsdp2 or deepspeed only")
    nsisa = "nsisa" in (args.matrix_preconditioner, args.other_preconditioner)
    if args.routing_bytes is not None and args.backend == "fsdp2" and not nsisa:  # deepspeed: its JSON decides
        error("--routing-bytes is read by nsisa only; neither --matrix-preconditioner nor --other-preconditioner is")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            error("--device cuda: no CUDA device is available")
    if args.backend == "deepspeed":
        return  # the config's optimizer.type decides the optimizer; backends.deepspeed_config checks the rest
    if args.optimizer != "pisa":
        if args.agents > 1:
            error(f"--agents {args.agents} is PISA's mode B; --optimizer {args.optimizer} has no consensus")
        for flag in sorted(set(PISA_FLAGS) & given):
            error(f"--{flag.replace('_', '-')} sets PISA; it has no effect with --optimizer {args.optimizer}")
    else:
        for flag in sorted(set(BASELINE_FLAGS) & given):
            error(f"--{flag} sets a baseline's lr; PISA's lr is 1/(σ+ρ) (use --sigma/--rho, --aux-lr)")


def parse_args(argv=None):
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.explicit = _explicit(parser, argv)
    if args.backend == "auto":
        if args.deepspeed_config:
            args.backend = "deepspeed"
        else:
            args.backend = "fsdp2" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"
    _check_ranges(args, parser.error)
    _check_combinations(args, parser.error)
    try:
        Faults(args.inject_nonfinite, rank=0)
    except ValueError as e:
        parser.error(str(e))
    if args.lr is None:
        args.lr = 0.02 if args.optimizer == "muon" else 3e-3
    return args
