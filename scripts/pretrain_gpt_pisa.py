#!/usr/bin/env python
"""Megatron-core GPT pretraining with PISA in Megatron's distributed optimizer.

    torchrun --nproc-per-node 8 scripts/pretrain_gpt_pisa.py \\
        --tensor-model-parallel-size 2 --num-layers 12 --hidden-size 768 --num-attention-heads 12 \\
        --seq-length 1024 --micro-batch-size 4 --global-batch-size 64 --train-iters 10000 --bf16 \\
        --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 500 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 \\
        --pisa-sigma 30 --pisa-rho 100 --pisa-other-preconditioner adamw \\
        --save ckpt --save-interval 1000 --load ckpt --tensorboard-dir tb

Megatron-core pieces, as a Megatron user has them: ``GPTModel`` (local layer spec, with torch's scaled-dot-product
attention as core attention, so the same script runs on GPUs and, under the test shim, on CPU), Megatron DDP with
the distributed optimizer (reduce-scattered fp32 grads, fp32 main params under ``--bf16``/``--fp16``),
``OptimizerParamScheduler``, gradient clipping, fp16 loss scaling and ``dist_checkpointing``. The only change from an
Adam run is the optimizer: ``pisa_zero.integrations.megatron.get_pisa_optimizer`` in place of
``get_megatron_optimizer`` and the ``--pisa-*`` flags. See ``scripts/pretrain_gpt_pisa.sh`` for a multi-node launch
and docs/megatron.md for what each part does.

Data: ``engine/data.py`` (``--data-path`` is a text file/folder, a ``.bin``/``.npy`` token file or a folder with
``train``/``val`` token files; none: the Python standard library's source as bytes). Each data-parallel rank draws
its own batches, a pure function of (seed, rank, iteration), so a resumed run sees the batches an uninterrupted one
would.

Checkpoints (``--save``): ``<save>/iter_NNNNNNN/`` written with ``dist_checkpointing`` into a temporary folder and
renamed when complete, then ``latest_checkpointed_iteration.txt`` (Megatron's tracker file) is replaced atomically.
``--load`` resumes model, PISA state (per-group steps included), scheduler and iteration; a DP size change is fine
(``dp_reshardable``), a TP change needs ``--ckpt-format fully_reshardable``. Each folder holds ``pisa_sha256.json``
(the SHA-256 of its other files); ``--load`` checks the tracker, every file's readability and length and the model
flags before any work, then the checksums, and refuses a damaged checkpoint naming the file and what is wrong.

Stopping: SIGINT/SIGTERM (Ctrl-C; ``torchrun`` forwards both; a rank whose launcher is gone stops the same way, see
``engine/stops.py``) stops every rank after the same step: the stop flag rides on the step's one all-reduce of the
loss. The ranks write a final checkpoint at that iteration (with ``--save``), exit with 128 + the signal number and
say how to continue; a third signal exits at once. Every flag is checked (range, combination, a flag that would do
nothing) and refused by name before any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from engine.stops import StopRequest  # noqa: E402

logger = logging.getLogger("pretrain_gpt_pisa")
TRACKER = "latest_checkpointed_iteration.txt"
MANIFEST = "pisa_sha256.json"  # in each iter_N folder: the SHA-256 of its other files, checked on --load


# ------------------------------------------------------------------------------------------------------ arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_pisa.py",
        description="Megatron-core GPT pretraining with PISA (sharded in Megatron's distributed optimizer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # as Megatron's own parser: a flag is only ever its full name
    )
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size (ranks that split each layer)")
    g.add_argument(
        "--pipeline-model-parallel-size", type=int, default=1, help="PP size; only 1 is supported by this script"
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=4, help="transformer layers")
    g.add_argument("--hidden-size", type=int, default=256, help="model width")
    g.add_argument("--num-attention-heads", type=int, default=4, help="attention heads (divisible by TP)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP width; default 4 x hidden size")
    g.add_argument("--seq-length", type=int, default=256, help="tokens per sample")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="dropout after attention and MLP")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="dropout of attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal weight init")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", help="separate output layer")
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bf16 model params and compute, fp32 main params in PISA")
    g.add_argument("--fp16", action="store_true", help="fp16 model params with Megatron's dynamic loss scaling")
    g.add_argument("--loss-scale", type=float, default=None, help="constant loss scale (fp16); default: dynamic")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="first dynamic loss scale")
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per rank per forward/backward")
    g.add_argument("--global-batch-size", type=int, default=None, help="samples per step; default micro x DP")
    g.add_argument("--train-iters", type=int, default=100, help="optimizer steps to train for (in total)")
    g.add_argument("--seed", type=int, default=1234, help="init and data seed")
    g.add_argument("--lr", type=float, default=3e-4, help="peak lr: PISA's reference lr (sigma, rho hold at it)")
    g.add_argument("--min-lr", type=float, default=0.0, help="lr at the end of the decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="linear warmup from 0 over these steps")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay length; default --train-iters")
    g.add_argument(
        "--lr-decay-style",
        choices=("constant", "linear", "cosine", "inverse-square-root"),
        default="cosine",
        help="Megatron's lr schedule",
    )
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay (not on biases/norms)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="clip the global grad norm to this (0: off)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="beta1 of the auxiliary AdamW groups")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="beta2 of the auxiliary AdamW groups")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="eps of the auxiliary AdamW groups")
    g = p.add_argument_group("PISA")
    g.add_argument("--pisa-sigma", type=float, default=30.0, help="sigma: ADMM penalty at the peak lr")
    g.add_argument("--pisa-rho", type=float, default=100.0, help="rho: preconditioner weight at the peak lr")
    g.add_argument(
        "--pisa-preconditioner",
        choices=("sisa", "adagrad", "identity", "nsisa"),
        default="sisa",
        help="preconditioner of the transformer block matrices; nsisa: Newton-Schulz on whole matrices routed over "
        "the DP group (TP=1, no offload)",
    )
    g.add_argument(
        "--pisa-other-preconditioner",
        choices=("sisa", "adagrad", "identity", "adamw"),
        default="adamw",
        help="for embeddings, output layer, norms and biases ('adamw': the auxiliary AdamW)",
    )
    g.add_argument("--pisa-aux-lr", type=float, default=None, help="peak lr of the auxiliary AdamW; default --lr")
    g.add_argument("--pisa-beta2", type=float, default=0.999, help="beta2 of sisa's second moment")
    g.add_argument("--pisa-eps", type=float, default=1e-8, help="eps inside the preconditioner")
    g.add_argument("--pisa-momentum", type=float, default=0.95, help="nsisa's (Nesterov) momentum")
    g.add_argument("--pisa-ns-steps", type=int, default=5, help="nsisa's Newton-Schulz iterations")
    g.add_argument(
        "--pisa-ns-dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="precision of nsisa's Newton-Schulz matmuls (auto: bf16 on GPUs, as Muon; float32 to force fp32)",
    )
    g.add_argument(
        "--pisa-routing-bytes",
        type=int,
        default=None,
        help="bytes in flight per rank while nsisa routes whole matrices to their owners (default 256 MiB): lower "
        "it to cut the step's peak memory, at one more pair of all-to-alls per extra round",
    )
    g.add_argument("--pisa-l2-lambda", type=float, default=0.0, help="server-side l2 term of the consensus")
    g.add_argument(
        "--pisa-state-dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the dual and second moment"
    )
    g.add_argument("--pisa-diagnostics-interval", type=int, default=0, help="PISA residuals to TensorBoard every N")
    g = p.add_argument_group("offload")
    g.add_argument("--optimizer-cpu-offload", action="store_true", help="PISA state and update on the CPU (HDO)")
    g.add_argument("--optimizer-offload-fraction", type=float, default=1.0, help="fraction of shards offloaded")
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None, help="engine/data.py corpus; default: the Python stdlib source")
    g.add_argument("--data-cache-dir", default=None, help="where built byte corpora are cached")
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint folder")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps (0: only at the end)")
    g.add_argument("--load", default=None, help="resume from the latest checkpoint in this folder")
    g.add_argument("--no-load-optim", action="store_true", help="load model weights only; fresh PISA state")
    g.add_argument(
        "--ckpt-format",
        choices=("dp_reshardable", "fully_reshardable"),
        default="dp_reshardable",
        help="distributed-optimizer state layout (fully_reshardable also allows a TP change)",
    )
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10, help="log line every N steps")
    g.add_argument("--eval-interval", type=int, default=0, help="validation loss every N steps (0: off)")
    g.add_argument("--eval-iters", type=int, default=8, help="validation windows (micro-batches) per evaluation")
    g.add_argument("--tensorboard-dir", default=None, help="TensorBoard event files (rank 0)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _explicit(argv) -> set[str]:
    """The dests of the flags written on the command line (a flag that would do nothing is refused only then)."""
    p = parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def _finite(low: float, *, strict: bool):
    return lambda v: math.isfinite(v) and (v > low if strict else v >= low)


#: the smallest value of every integer flag (None, where it is the default, is not checked)
_MIN_INT = {
    "tensor_model_parallel_size": 1,
    "num_layers": 1,
    "hidden_size": 1,
    "num_attention_heads": 1,
    "ffn_hidden_size": 1,
    "seq_length": 1,
    "make_vocab_size_divisible_by": 1,
    "micro_batch_size": 1,
    "global_batch_size": 1,
    "train_iters": 1,
    "seed": 0,
    "lr_warmup_iters": 0,
    "lr_decay_iters": 1,
    "pisa_ns_steps": 1,
    "pisa_routing_bytes": 1,
    "pisa_diagnostics_interval": 0,
    "save_interval": 0,
    "log_interval": 1,
    "eval_interval": 0,
    "eval_iters": 1,
}
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
#: (flag, check, expected) of every float flag; "not check(v)" is refused, so nan fails every check
_FLOATS = [
    ("hidden_dropout", *_UNIT),
    ("attention_dropout", *_UNIT),
    ("init_method_std", _finite(0, strict=True), "a finite number > 0"),
    ("loss_scale", _finite(0, strict=True), "a finite number > 0"),
    ("initial_loss_scale", _finite(0, strict=True), "a finite number > 0"),
    ("lr", _finite(0, strict=True), "a finite number > 0"),
    ("min_lr", _finite(0, strict=False), "a finite number >= 0"),
    ("weight_decay", _finite(0, strict=False), "a finite number >= 0"),
    ("clip_grad", _finite(0, strict=False), "a finite number >= 0 (0: off)"),
    ("adam_beta1", *_UNIT),
    ("adam_beta2", *_UNIT),
    ("adam_eps", _finite(0, strict=True), "a finite number > 0"),
    ("pisa_sigma", _finite(0, strict=True), "a finite number > 0"),
    ("pisa_rho", _finite(0, strict=False), "a finite number >= 0"),
    ("pisa_aux_lr", _finite(0, strict=True), "a finite number > 0"),
    ("pisa_beta2", *_UNIT),
    ("pisa_eps", _finite(0, strict=True), "a finite number > 0"),
    ("pisa_momentum", *_UNIT),
    ("pisa_l2_lambda", _finite(0, strict=False), "a finite number >= 0"),
    ("optimizer_offload_fraction", lambda v: 0 <= v <= 1, "in [0, 1]"),
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_values(args, errors: list) -> None:
    """Every numeric flag in its range, and the sizes that must divide each other."""
    for name, low in _MIN_INT.items():
        value = getattr(args, name)
        if value is not None and value < low:
            errors.append(f"{_flag(name)}={value}: expected an integer >= {low}")
    for name, ok, expected in _FLOATS:
        value = getattr(args, name)
        if value is not None and not ok(value):
            errors.append(f"{_flag(name)}={value}: expected {expected}")
    if errors:
        return  # the relations below assume sizes in range
    if args.min_lr > args.lr:
        errors.append(f"--min-lr={args.min_lr}: expected 0 <= min-lr <= --lr ({args.lr})")
    decay = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay:
        errors.append(f"--lr-warmup-iters={args.lr_warmup_iters}: expected 0 <= warmup < decay iters ({decay})")
    tp = args.tensor_model_parallel_size
    if args.num_attention_heads % tp:
        errors.append(f"--num-attention-heads={args.num_attention_heads}: not divisible by TP ({tp})")
    if args.hidden_size % args.num_attention_heads:
        errors.append(f"--hidden-size={args.hidden_size}: not divisible by --num-attention-heads")
    if args.ffn_hidden_size is not None and args.ffn_hidden_size % tp:
        errors.append(f"--ffn-hidden-size={args.ffn_hidden_size}: not divisible by TP ({tp})")
    if args.pipeline_model_parallel_size != 1:
        errors.append(f"--pipeline-model-parallel-size={args.pipeline_model_parallel_size}: only 1 is supported")


def _is_token_data(path: str) -> bool:
    if os.path.isdir(path):
        return any(os.path.exists(os.path.join(path, f"train{ext}")) for ext in (".npy", ".bin"))
    return path.endswith((".bin", ".npy"))


def _check_combinations(args, given: set, errors: list) -> None:
    """Flags that the rest of the command line would make do nothing, combinations that cannot work, paths."""
    pre, other = args.pisa_preconditioner, args.pisa_other_preconditioner

    def unused(name: str, because: str) -> None:
        if name in given:
            errors.append(f"{_flag(name)} {because}")

    if args.bf16 and args.fp16:
        errors.append("--bf16 and --fp16: choose one")
    if not args.fp16 or args.loss_scale is not None:
        unused(
            "initial_loss_scale",
            "is the first scale of fp16's dynamic loss scaling: it needs --fp16 without --loss-scale",
        )
    if other != "adamw":
        for name in ("adam_beta1", "adam_beta2", "adam_eps", "pisa_aux_lr"):
            unused(name, f"sets the auxiliary AdamW: it needs --pisa-other-preconditioner adamw, not {other}")
    if "sisa" not in (pre, other):
        unused("pisa_beta2", f"is sisa's second-moment decay: neither preconditioner is sisa ({pre}, {other})")
    if pre == "identity" and other in ("identity", "adamw"):
        unused("pisa_eps", f"is the preconditioner's eps: {pre} and {other} have none")
    if pre != "nsisa":
        unused("pisa_momentum", f"is nsisa's momentum: it needs --pisa-preconditioner nsisa, not {pre}")
        unused("pisa_ns_steps", f"is nsisa's Newton-Schulz count: it needs --pisa-preconditioner nsisa, not {pre}")
        unused("pisa_ns_dtype", f"is nsisa's Newton-Schulz precision: it needs --pisa-preconditioner nsisa, not {pre}")
        unused("pisa_routing_bytes", f"bounds nsisa's routing: it needs --pisa-preconditioner nsisa, not {pre}")
    if pre == "nsisa" and args.tensor_model_parallel_size != 1:
        errors.append(
            "--pisa-preconditioner nsisa needs --tensor-model-parallel-size 1 (Newton-Schulz on whole matrices; "
            "with tensor parallelism each rank holds a block of every matrix)"
        )
    if pre == "nsisa" and args.optimizer_cpu_offload:
        errors.append("--pisa-preconditioner nsisa: not with --optimizer-cpu-offload (it splits the shards)")
    if args.lr_decay_style == "constant":
        unused("min_lr", "is the end of the decay: --lr-decay-style constant has none")
        unused("lr_decay_iters", "is the decay length: --lr-decay-style constant has none")
    if not args.optimizer_cpu_offload:
        unused("optimizer_offload_fraction", "is the offloaded fraction: it needs --optimizer-cpu-offload")
    if args.pisa_diagnostics_interval and not args.tensorboard_dir:
        errors.append("--pisa-diagnostics-interval writes PISA's residuals to TensorBoard: it needs --tensorboard-dir")
    if not args.eval_interval:
        unused("eval_iters", "sizes each evaluation: it needs --eval-interval N > 0")
    if not args.save:
        unused("save_interval", "needs --save (the folder to save to)")
    if not args.load:
        unused("no_load_optim", "needs --load")
    if not (args.save or args.load):
        unused("ckpt_format", "needs --save or --load")
    if args.data_path and not os.path.exists(args.data_path):
        errors.append(f"--data-path={args.data_path!r}: no such file or folder")
    elif args.data_path and _is_token_data(args.data_path):
        unused("data_cache_dir", f"caches built byte corpora: --data-path={args.data_path!r} holds token files")
    for name in ("save", "tensorboard_dir", "data_cache_dir"):
        path = getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            errors.append(f"{_flag(name)}={path!r}: exists and is not a folder")


def check_world(args, world: int) -> list[str]:
    """The flags that depend on the number of ranks."""
    tp, micro = args.tensor_model_parallel_size, args.micro_batch_size
    if world % tp:
        return [f"--tensor-model-parallel-size={tp}: does not divide the world size {world}"]
    dp = world // tp
    if args.global_batch_size is not None and args.global_batch_size % (micro * dp):
        return [
            f"--global-batch-size={args.global_batch_size}: not a multiple of --micro-batch-size x DP = {micro} x {dp}"
        ]
    return []


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, every one checked (range, combination, paths, a --load checkpoint's files) before any work."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    errors: list[str] = []
    _check_values(args, errors)
    _check_combinations(args, _explicit(argv), errors)
    if not errors and os.environ.get("WORLD_SIZE"):  # under a launcher: the world is known now
        errors += check_world(args, int(os.environ["WORLD_SIZE"]))
    if args.load and not errors:
        try:
            check_checkpoint(args.load, args)
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        parser().error("; ".join(errors))
    return args


# ---------------------------------------------------------------------------------------------------------- model
def sdpa_attention_cls():
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPAttention(DotProductAttention):
        """Megatron's core attention computed by ``torch.nn.functional.scaled_dot_product_attention``.

        The stock local ``DotProductAttention`` needs Megatron's CUDA RNG tracker and a CUDA scratch buffer; this
        one runs wherever torch does (same inputs [s, b, heads, dim], same output [s, b, hidden/TP])."""

        def forward(
            self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
        ):
            if packed_seq_params is not None or attention_bias is not None:
                raise ValueError("SDPAttention: packed sequences and attention bias are not supported")
            repeat = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if repeat > 1:  # grouped-query attention
                key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            causal = (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal
            mask = None if causal or attention_mask is None else ~attention_mask
            dropout = self.attention_dropout.p if self.training else 0.0
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale
            )
            return out.permute(2, 0, 1, 3).reshape(out.size(2), out.size(0), self.hidden_size_per_partition)

    return SDPAttention


def layer_spec():
    """Megatron's local GPT layer spec with :func:`sdpa_attention_cls` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec()
    spec.submodules.self_attention.submodules.core_attention = sdpa_attention_cls()
    return spec


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def build_model(args, vocab_size: int, on_gpu: bool):
    """GPTModel (fp32 init on the CPU when there is no GPU); bf16/fp16 through Megatron's Float16Module."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.ffn_hidden_size,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        use_cpu_initialization=not on_gpu,
    )
    model = GPTModel(
        config,
        layer_spec(),
        vocab_size=vocab_size,
        max_sequence_length=args.seq_length,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    if args.bf16 or args.fp16:
        model = Float16Module(config, model)
    return config, model


def optimizer_config(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",  # not read by PISA; Megatron's config validation expects a known name
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=True,
        optimizer_cpu_offload=args.optimizer_cpu_offload,
        optimizer_offload_fraction=args.optimizer_offload_fraction,
    )


def pisa_options(args) -> dict:
    other = {"lr": args.pisa_aux_lr} if args.pisa_aux_lr is not None else None
    routing = {"routing_bytes": args.pisa_routing_bytes} if args.pisa_routing_bytes is not None else {}
    return dict(
        **routing,
        preconditioner=args.pisa_preconditioner,
        other_preconditioner=args.pisa_other_preconditioner,
        other_options=other,
        sigma=args.pisa_sigma,
        rho=args.pisa_rho,
        beta2=args.pisa_beta2,
        eps=args.pisa_eps,
        momentum=args.pisa_momentum,
        ns_steps=args.pisa_ns_steps,
        ns_dtype=args.pisa_ns_dtype,
        l2_lambda=args.pisa_l2_lambda,
        state_dtype=torch.bfloat16 if args.pisa_state_dtype == "bf16" else torch.float32,
    )


# ---------------------------------------------------------------------------------------------------- checkpoints
class CheckpointError(ValueError):
    """A ``--load`` checkpoint that cannot be used; the message names the file and what is wrong with it."""


#: the flags that shape the model: a checkpoint loads only into a model built with the same values
MODEL_FLAGS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "ffn_hidden_size",
    "seq_length",
    "make_vocab_size_divisible_by",
    "untie_embeddings_and_output_weights",
)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


def read_tracker(path: str) -> tuple[int, str]:
    """(iteration, its folder) from ``<path>/latest_checkpointed_iteration.txt``."""
    if not os.path.isdir(path):
        raise CheckpointError(f"--load={path!r}: no such folder")
    tracker = os.path.join(path, TRACKER)
    if not os.path.isfile(tracker):
        raise CheckpointError(f"--load={path!r}: no {TRACKER} (not a checkpoint folder written by this script)")
    with open(tracker, encoding="utf-8", errors="replace") as f:
        text = f.read().strip()
    if not text:
        raise CheckpointError(f"{tracker}: the file is empty (truncated); it holds the latest checkpoint's iteration")
    if not (text.isascii() and text.isdigit()):
        raise CheckpointError(f"{tracker}: {text[:40]!r} is not an iteration number (the file is corrupted)")
    folder = os.path.join(path, f"iter_{int(text):07d}")
    if not os.path.isdir(folder):
        raise CheckpointError(f"--load={path!r}: {TRACKER} names {folder}, which does not exist")
    return int(text), folder


def _read(folder: str, name: str, what: str, reader):
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise CheckpointError(f"{folder}: no {name} ({what}): the checkpoint is incomplete")
    try:
        return reader(file)
    except Exception as e:  # noqa: BLE001 - whatever the reader raises, the file is unusable
        raise CheckpointError(f"{file}: cannot be read, the file is truncated or corrupted ({_first_line(e)})") from e


def _check_shards(folder: str, metadata) -> None:
    """Every data file that ``.metadata`` indexes exists and is as long as the index says."""
    needed: dict[str, int] = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    if not needed:
        raise CheckpointError(f"{os.path.join(folder, '.metadata')}: indexes no data files (the file is corrupted)")
    for name, size in sorted(needed.items()):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{file} is missing (.metadata indexes it): the checkpoint is incomplete")
        if os.path.getsize(file) < size:
            raise CheckpointError(
                f"{file} is truncated: {os.path.getsize(file)} bytes, .metadata indexes data up to byte {size}"
            )


def _check_model_flags(folder: str, saved: dict, args) -> None:
    def value(source: dict, name: str):
        v = source.get(name)
        return v if name != "ffn_hidden_size" or v is not None else 4 * source.get("hidden_size", 0)

    now = vars(args)
    differ = [
        f"{_flag(n)}={value(saved, n)} (this run: {value(now, n)})"
        for n in MODEL_FLAGS
        if n in saved and value(saved, n) != value(now, n)
    ]
    if differ:
        raise CheckpointError(f"--load: {folder} was saved with {', '.join(differ)}: the model flags must match it")


def check_checkpoint(path: str, args=None) -> tuple[int, str]:
    """The checkpoint ``--load=path`` resumes from, checked file by file without loading a tensor: the tracker,
    dist_checkpointing's ``metadata.json``, the tensor index ``.metadata``, ``common.pt`` and the length of every
    data file the index names (and, with ``args``, the model flags it was saved with). Returns (iteration, folder);
    raises :class:`CheckpointError` naming the file and what is wrong."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    iteration, folder = read_tracker(path)

    def json_file(file: str) -> dict:
        with open(file) as f:
            out = json.load(f)
        if not isinstance(out, dict):
            raise ValueError(f"expected a JSON object, found {type(out).__name__}")
        return out

    def index(file: str) -> Metadata:
        out = FileSystemReader(folder).read_metadata()
        if not isinstance(out, Metadata):
            raise ValueError(f"expected torch.distributed.checkpoint Metadata, found {type(out).__name__}")
        return out

    _read(folder, "metadata.json", "dist_checkpointing's format record", json_file)
    metadata = _read(folder, ".metadata", "the index of every tensor's bytes", index)
    common = _read(folder, "common.pt", "iteration, scheduler and optimizer settings", _load_common)
    _check_shards(folder, metadata)
    if os.path.exists(os.path.join(folder, MANIFEST)):
        _read(folder, MANIFEST, "the SHA-256 of every file", json_file)
    if args is not None and isinstance(common.get("args"), dict):
        _check_model_flags(folder, common["args"], args)
    return iteration, folder


def _load_common(file: str) -> dict:
    out = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(out, dict) or "iteration" not in out:
        raise ValueError("expected the dict of common state with an 'iteration'")
    return out


def _write_manifest(folder: str) -> None:
    """Collective: the SHA-256 of every file in ``folder`` (each rank hashes a share) into ``MANIFEST``."""
    from pisa_zero.checkpoint import file_checksums

    sums = file_checksums(folder, skip=(MANIFEST,))
    if dist.get_rank() == 0:
        with open(os.path.join(folder, MANIFEST), "w") as f:
            json.dump({"sha256": sums}, f, indent=0)


def _verify_manifest(folder: str) -> None:
    """Collective: every file ``MANIFEST`` lists exists with its SHA-256 (each rank hashes a share). A checkpoint
    without a manifest (written before there was one) relies on :func:`check_checkpoint`'s checks."""
    from pisa_zero.checkpoint import verify_checksums

    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        sums = json.load(f).get("sha256", {})
    try:
        verify_checksums(folder, sums, what="--load", record=MANIFEST)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def _state_dict(model, optimizer, scheduler, iteration: int, args, is_loading: bool = False) -> dict:
    model_sd = model.module.sharded_state_dict()
    out = {"model": model_sd, "iteration": iteration, "args": vars(args).copy()}
    if optimizer is not None:
        metadata = {"distrib_optim_sharding_type": args.ckpt_format}
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading, metadata=metadata)
        out["scheduler"] = scheduler.state_dict()
    return out


def save_checkpoint(path: str, iteration: int, model, optimizer, scheduler, args) -> str:
    """Write ``<path>/iter_N`` (complete, with the SHA-256 of every file, or not at all) and point the tracker file
    at it."""
    from megatron.core import dist_checkpointing

    final = os.path.join(path, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dist_checkpointing.save(_state_dict(model, optimizer, scheduler, iteration, args), tmp)
    dist.barrier()
    _write_manifest(tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(path, TRACKER + ".tmp"), "w") as f:
            f.write(str(iteration))
        os.replace(os.path.join(path, TRACKER + ".tmp"), os.path.join(path, TRACKER))
    dist.barrier()
    return final


def _describe(e: BaseException) -> str:
    """dist_checkpointing's own message, or the first failing rank's for torch's CheckpointException."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, failure = next(iter(sorted(failures.items())))
        return f"rank {rank}: {_first_line(failure[0] if isinstance(failure, tuple) else failure)}"
    return _first_line(e)


def load_checkpoint(path: str, model, optimizer, scheduler, args) -> int:
    """Load the latest checkpoint under ``path`` into model, optimizer and scheduler; returns its iteration."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    _, folder = check_checkpoint(path, args)
    _verify_manifest(folder)
    template = _state_dict(model, None if args.no_load_optim else optimizer, scheduler, 0, args, True)
    try:
        loaded = dist_checkpointing.load(template, folder)
    except (CheckpointException, CheckpointingException) as e:
        raise CheckpointError(f"--load={path!r}: {folder} does not load into this run: {_describe(e)}") from e
    model.module.load_state_dict(loaded["model"])
    if args.no_load_optim:
        optimizer.reload_model_params()
    else:
        optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["scheduler"])
    return loaded["iteration"]


# ----------------------------------------------------------------------------------------------------------- run
def _init_distributed() -> bool:
    on_gpu = torch.cuda.is_available()
    if not dist.is_initialized():
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        backend = "nccl" if on_gpu else "gloo"
        if "RANK" in os.environ:  # torchrun (or another launcher) set the rendezvous up
            dist.init_process_group(backend)
        else:  # plain ``python scripts/pretrain_gpt_pisa.py``: one process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as e:
        raise SystemExit(
            f"pretrain_gpt_pisa.py needs CUDA GPUs: Megatron-core's DDP and distributed optimizer are CUDA-only ({e})"
        ) from e
    return on_gpu


@dataclass
class Step:
    """One optimizer step as every rank saw it (loss and stop agreed by one all-reduce over all ranks)."""

    loss: float
    lr: float  # the lr this step used (the scheduler moves it after the step)
    updated: bool
    grad_norm: float | None
    stop: bool  # some rank asked to stop (a signal, its launcher gone)


class Trainer:
    """The run's state and its stages; ``run()`` reads as the loop: step → report → checkpoint → stop?"""

    def __init__(self, args, on_gpu: bool):
        from megatron.core import parallel_state

        self.args, self.on_gpu = args, on_gpu
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING, format="%(message)s")
        self.dp = self.world // args.tensor_model_parallel_size
        global_batch = args.global_batch_size or args.micro_batch_size * self.dp
        self.micro_steps = global_batch // (args.micro_batch_size * self.dp)
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=args.tensor_model_parallel_size)
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        torch.manual_seed(args.seed)
        if on_gpu:
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.stop, self.board, self.progress = None, None, None
        self._data(parallel_state.get_data_parallel_rank())
        self._build()
        self.iteration = load_checkpoint(args.load, *self.state, args) if args.load else 0
        self._log_setup()
        self._monitors()
        self.loss, self.val_loss, self.checkpoint, self.started = float("nan"), None, None, time.time()

    @property
    def state(self) -> tuple:
        return self.model, self.optimizer, self.scheduler

    # ------------------------------------------------------------------------------------------- set-up
    def _data(self, dp_rank: int) -> None:
        """The corpus, this DP rank's batches and the validation windows (before the model: a data error is
        reported before any model work)."""
        from engine.data import Batches, load_corpus, val_windows

        args = self.args
        try:
            self.corpus = load_corpus(args.data_path, args.data_cache_dir)
            self.batches = Batches(self.corpus.train, args.seq_length, args.micro_batch_size, args.seed, dp_rank)
            windows = val_windows(self.corpus.val, args.seq_length, args.eval_iters * args.micro_batch_size)
        except ValueError as e:  # engine/data.py names the engine's flags
            raise SystemExit(str(e).replace("--block-size", "--seq-length").replace("--data=", "--data-path=")) from e
        self.val = windows.to(self.device)
        seq = torch.arange(args.seq_length, device=self.device)
        self.position_ids = seq.unsqueeze(0).expand(args.micro_batch_size, -1)

    def _build(self) -> None:
        """GPTModel in Megatron DDP, PISA in Megatron's distributed optimizer, Megatron's lr scheduler."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from pisa_zero.integrations.megatron import get_pisa_optimizer

        args = self.args
        self.vocab = padded_vocab_size(
            self.corpus.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
        )
        config, model = build_model(args, self.vocab, self.on_gpu)
        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
        self.model = DistributedDataParallel(config, ddp_config, model)
        self.optimizer = get_pisa_optimizer(optimizer_config(args), [self.model], **pisa_options(args))
        decay_iters = args.lr_decay_iters or args.train_iters
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0,
            max_lr=args.lr,
            min_lr=args.min_lr,
            lr_warmup_steps=args.lr_warmup_iters,
            lr_decay_steps=decay_iters,
            lr_decay_style=args.lr_decay_style,
            start_wd=args.weight_decay,
            end_wd=args.weight_decay,
            wd_incr_steps=decay_iters,
            wd_incr_style="constant",
        )

    def _log_setup(self) -> None:
        from pisa_zero.integrations.megatron import optimizer_summary

        args, tp = self.args, self.args.tensor_model_parallel_size
        logger.info(
            "pretrain_gpt_pisa: world %d = TP %d x DP %d, %d micro-batch(es) of %d per step, %.2fM params/TP rank, "
            "data %s (vocab %d -> %d)",
            self.world,
            tp,
            self.dp,
            self.micro_steps,
            args.micro_batch_size,
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            self.corpus.source,
            self.corpus.vocab_size,
            self.vocab,
        )
        for g in optimizer_summary(self.optimizer):
            logger.info("  PISA group: %s", json.dumps(g))
        if self.iteration:
            logger.info("resumed from %s at iteration %d", args.load, self.iteration)

    def _monitors(self) -> None:
        from pisa_zero.monitor import Diagnostics, TensorBoard

        args = self.args
        self.board = TensorBoard(args.tensorboard_dir, enabled=self.rank == 0)
        self.diagnostics = None
        if args.pisa_diagnostics_interval:
            self.diagnostics = Diagnostics(self.optimizer.chained_optimizers[0].optimizer)
        if self.rank == 0 and not args.no_progress:
            from tqdm import tqdm

            self.progress = tqdm(total=args.train_iters, initial=self.iteration, desc="pretrain", dynamic_ncols=True)

    # ------------------------------------------------------------------------------------------- stages
    def train_step(self) -> Step:
        """Forward/backward over the micro-batches, the optimizer step, then the step's one all-reduce over every
        rank: the loss (each TP group's once: its TP ranks hold the same loss) and "some rank wants to stop", so
        that every rank stops after the same step."""
        args, model, optimizer = self.args, self.model, self.optimizer
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss_sum = torch.zeros(1, dtype=torch.float64, device=self.device)
        for micro in range(self.micro_steps):
            x, y = (t.to(self.device) for t in self.batches.get(self.iteration, micro))
            loss = model(x, self.position_ids, None, labels=y).float().mean() / self.micro_steps
            optimizer.scale_loss(loss).backward()
            loss_sum += loss.detach()
        model.finish_grad_sync()
        if self.diagnostics is not None and (self.iteration + 1) % args.pisa_diagnostics_interval == 0:
            self.diagnostics.snapshot()
        lr = optimizer.param_groups[0]["lr"]
        updated, grad_norm, _ = optimizer.step()
        self.scheduler.step(increment=1)
        self.iteration += 1
        stop = torch.tensor([float(self.stop.reason is not None)], dtype=torch.float64, device=self.device)
        flags = torch.cat([loss_sum if self.tp_rank == 0 else torch.zeros_like(loss_sum), stop])
        dist.all_reduce(flags)
        loss_total, stops = flags.tolist()
        self.loss = loss_total / self.dp
        return Step(self.loss, lr, updated, None if grad_norm is None else float(grad_norm), stops > 0)

    def evaluate(self) -> float:
        from megatron.core import parallel_state

        model, micro = self.model, self.args.micro_batch_size
        model.eval()
        total = torch.zeros(1, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for chunk in self.val.split(micro):
                x, y = chunk[:, :-1], chunk[:, 1:]
                total += model(x, self.position_ids[: len(x)], None, labels=y).float().mean()
        model.train()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        self.val_loss = total.item() / (self.dp * len(self.val.split(micro)))
        return self.val_loss

    def report(self, step: Step, val_loss: float | None) -> None:
        """TensorBoard scalars, the progress bar and, every ``--log-interval`` steps, the log line."""
        args, it = self.args, self.iteration
        scalars = {"train/loss": step.loss, "train/lr": step.lr, "train/skipped_step": 0.0 if step.updated else 1.0}
        if step.grad_norm is not None:
            scalars["train/grad_norm"] = step.grad_norm
        if self.diagnostics is not None and it % args.pisa_diagnostics_interval == 0:
            scalars.update(self.diagnostics.measure())
        if val_loss is not None:
            scalars["val/loss"] = val_loss
        self.board.scalars(scalars, it)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{step.loss:.4f}", lr=f"{step.lr:.2e}")
        if it % args.log_interval == 0 or it == args.train_iters or step.stop:
            logger.info(
                "iteration %d/%d | loss %.4f | lr %.3e | grad norm %s | %s | %.2f s/step",
                it,
                args.train_iters,
                step.loss,
                step.lr,
                "-" if step.grad_norm is None else f"{step.grad_norm:.3f}",
                "updated" if step.updated else "SKIPPED (non-finite gradients)",
                (time.time() - self.started) / args.log_interval,
            )
            self.started = time.time()

    def save(self) -> None:
        if not self.args.save:
            return
        if not math.isfinite(self.loss):
            raise SystemExit(f"iteration {self.iteration}: loss is {self.loss}; not saving a non-finite checkpoint")
        self.checkpoint = save_checkpoint(self.args.save, self.iteration, *self.state, self.args)
        logger.info("saved %s", self.checkpoint)

    # -------------------------------------------------------------------------------------------- loop
    def run(self) -> dict:
        args = self.args
        self.stop = StopRequest()
        while self.iteration < args.train_iters:
            step = self.train_step()
            last = self.iteration == args.train_iters
            due = args.eval_interval and (self.iteration % args.eval_interval == 0 or last)
            self.report(step, self.evaluate() if due and not step.stop else None)
            if step.stop or (args.save_interval and self.iteration % args.save_interval == 0) or last:
                self.save()  # a stop writes its checkpoint first (a launcher's grace period may end after it)
            if step.stop:
                return self.stopped(evaluate=bool(due))
        return self.result(exit_code=0)

    def stopped(self, evaluate: bool) -> dict:
        """After a stop's checkpoint: the evaluation that was due, the message, the signal's exit status."""
        if evaluate:
            self.board.scalars({"val/loss": self.evaluate()}, self.iteration)
        reason = self.stop.reason or "another rank"
        if self.args.save:
            how = f"saved {self.checkpoint}; continue with the same command plus --load {self.args.save}"
        else:
            how = "nothing saved (no --save)"
        logger.info("stopped at iteration %d (%s): %s", self.iteration, reason, how)
        return self.result(exit_code=self.stop.exit_code if self.stop.reason else 128 + signal.SIGTERM, stopped=reason)

    def result(self, exit_code: int, stopped: str | None = None) -> dict:
        return {
            "iteration": self.iteration,
            "loss": self.loss,
            "val_loss": self.val_loss,
            "checkpoint": self.checkpoint,
            "stopped": stopped,
            "exit_code": exit_code,
        }

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.board is not None:
            self.board.close()
        if self.stop is not None:
            self.stop.close()


def main(argv=None) -> dict:
    """Train; returns {'iteration', 'loss', 'val_loss', 'checkpoint', 'stopped', 'exit_code'} (on every rank).
    SIGINT/SIGTERM (or the launcher gone) stops every rank after the same step with a final checkpoint; the
    exit code is then 128 + the signal's number."""
    args = parse_args(argv)
    on_gpu = _init_distributed()
    errors = check_world(args, dist.get_world_size())
    if errors:
        parser().error("; ".join(errors))
    from megatron.core import parallel_state

    trainer = None
    try:
        trainer = Trainer(args, on_gpu)
        return trainer.run()
    finally:
        if trainer is not None:
            trainer.close()
        parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    code = 0
    try:
        code = main()["exit_code"]
    except KeyboardInterrupt:  # before the training loop, where a stop has no step to finish
        print("pretrain_gpt_pisa.py: interrupted before training started; nothing was saved", file=sys.stderr)
        code = 128 + signal.SIGINT
    except CheckpointError as e:
        print(f"pretrain_gpt_pisa.py: {e}", file=sys.stderr)
        code = 1
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        dist.destroy_process_group()
    # dist_checkpointing starts a multiprocessing Manager per rank (its write-results queue) that only atexit would
    # stop; os._exit skips atexit, so stop every child here or it outlives the run.
    for child in multiprocessing.active_children():
        child.terminate()
        child.join(5)
    os._exit(code)
