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
(``dp_reshardable``), a TP change needs ``--ckpt-format fully_reshardable``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

logger = logging.getLogger("pretrain_gpt_pisa")
TRACKER = "latest_checkpointed_iteration.txt"


# ------------------------------------------------------------------------------------------------------ arguments
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_pisa.py",
        description="Megatron-core GPT pretraining with PISA (sharded in Megatron's distributed optimizer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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


def parse_args(argv=None) -> argparse.Namespace:
    args = parser().parse_args(argv)
    errors = []

    def positive(name, value):
        if value is None or value <= 0:
            errors.append(f"--{name.replace('_', '-')}={value}: expected > 0")

    for name in (
        "tensor_model_parallel_size",
        "num_layers",
        "hidden_size",
        "num_attention_heads",
        "seq_length",
        "micro_batch_size",
        "train_iters",
        "lr",
        "pisa_sigma",
        "log_interval",
        "eval_iters",
    ):
        positive(name, getattr(args, name))
    if args.pipeline_model_parallel_size != 1:
        errors.append(f"--pipeline-model-parallel-size={args.pipeline_model_parallel_size}: only 1 is supported")
    if args.bf16 and args.fp16:
        errors.append("--bf16 and --fp16: choose one")
    if args.pisa_rho < 0:
        errors.append(f"--pisa-rho={args.pisa_rho}: expected >= 0")
    if not 0 <= args.min_lr <= args.lr:
        errors.append(f"--min-lr={args.min_lr}: expected 0 <= min-lr <= --lr")
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters >= (args.lr_decay_iters or args.train_iters):
        errors.append(f"--lr-warmup-iters={args.lr_warmup_iters}: expected 0 <= warmup < decay iters")
    if not 0.0 <= args.optimizer_offload_fraction <= 1.0:
        errors.append(f"--optimizer-offload-fraction={args.optimizer_offload_fraction}: expected in [0, 1]")
    if args.clip_grad < 0 or args.weight_decay < 0:
        errors.append("--clip-grad and --weight-decay must be >= 0")
    if args.num_attention_heads % args.tensor_model_parallel_size:
        errors.append(f"--num-attention-heads={args.num_attention_heads}: not divisible by TP")
    if args.hidden_size % args.num_attention_heads:
        errors.append(f"--hidden-size={args.hidden_size}: not divisible by --num-attention-heads")
    if args.load and not os.path.isdir(args.load):
        errors.append(f"--load={args.load!r}: no such folder")
    if args.data_path and not os.path.exists(args.data_path):
        errors.append(f"--data-path={args.data_path!r}: no such file or folder")
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
    return dict(
        preconditioner=args.pisa_preconditioner,
        other_preconditioner=args.pisa_other_preconditioner,
        other_options=other,
        sigma=args.pisa_sigma,
        rho=args.pisa_rho,
        beta2=args.pisa_beta2,
        eps=args.pisa_eps,
        momentum=args.pisa_momentum,
        ns_steps=args.pisa_ns_steps,
        l2_lambda=args.pisa_l2_lambda,
        state_dtype=torch.bfloat16 if args.pisa_state_dtype == "bf16" else torch.float32,
    )


# ---------------------------------------------------------------------------------------------------- checkpoints
def _state_dict(model, optimizer, scheduler, iteration: int, args, is_loading: bool = False) -> dict:
    model_sd = model.module.sharded_state_dict()
    out = {"model": model_sd, "iteration": iteration, "args": vars(args).copy()}
    if optimizer is not None:
        metadata = {"distrib_optim_sharding_type": args.ckpt_format}
        out["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading, metadata=metadata)
        out["scheduler"] = scheduler.state_dict()
    return out


def save_checkpoint(path: str, iteration: int, model, optimizer, scheduler, args) -> str:
    """Write ``<path>/iter_N`` (complete or not at all) and point the tracker file at it."""
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
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(path, TRACKER + ".tmp"), "w") as f:
            f.write(str(iteration))
        os.replace(os.path.join(path, TRACKER + ".tmp"), os.path.join(path, TRACKER))
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler, args) -> int:
    """Load the latest checkpoint under ``path`` into model, optimizer and scheduler; returns its iteration."""
    from megatron.core import dist_checkpointing

    tracker = os.path.join(path, TRACKER)
    if not os.path.exists(tracker):
        raise SystemExit(f"--load={path!r}: no {TRACKER} (not a checkpoint folder written by this script)")
    with open(tracker) as f:
        iteration = int(f.read().strip())
    folder = os.path.join(path, f"iter_{iteration:07d}")
    if not os.path.isdir(folder):
        raise SystemExit(f"--load={path!r}: {TRACKER} names {folder}, which does not exist")
    template = _state_dict(model, None if args.no_load_optim else optimizer, scheduler, iteration, args, True)
    loaded = dist_checkpointing.load(template, folder)
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
        dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        torch.cuda.current_device()
    except (AssertionError, RuntimeError) as e:
        raise SystemExit(
            f"pretrain_gpt_pisa.py needs CUDA GPUs: Megatron-core's DDP and distributed optimizer are CUDA-only ({e})"
        ) from e
    return on_gpu


def main(argv=None) -> dict:
    """Train; returns {'iteration', 'loss', 'val_loss', 'checkpoint'} (on every rank)."""
    args = parse_args(argv)
    on_gpu = _init_distributed()
    from megatron.core import parallel_state

    try:
        return _train(args, on_gpu)
    finally:
        parallel_state.destroy_model_parallel()


def _train(args, on_gpu: bool) -> dict:
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from engine.data import Batches, load_corpus, val_windows
    from pisa_zero.integrations.megatron import get_pisa_optimizer, optimizer_summary
    from pisa_zero.monitor import Diagnostics, TensorBoard

    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    tp = args.tensor_model_parallel_size
    if world % tp:
        raise SystemExit(f"--tensor-model-parallel-size={tp}: does not divide the world size {world}")
    dp = world // tp
    global_batch = args.global_batch_size or args.micro_batch_size * dp
    if global_batch % (args.micro_batch_size * dp):
        raise SystemExit(
            f"--global-batch-size={global_batch}: not a multiple of micro-batch x DP = {args.micro_batch_size} x {dp}"
        )
    micro_steps = global_batch // (args.micro_batch_size * dp)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    torch.manual_seed(args.seed)
    if on_gpu:
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(args.seed)

    corpus = load_corpus(args.data_path, args.data_cache_dir)
    vocab = padded_vocab_size(corpus.vocab_size, args.make_vocab_size_divisible_by, tp)
    config, model = build_model(args, vocab, on_gpu)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True)
    model = DistributedDataParallel(config, ddp_config, model)
    optimizer = get_pisa_optimizer(optimizer_config(args), [model], **pisa_options(args))
    decay_iters = args.lr_decay_iters or args.train_iters
    scheduler = OptimizerParamScheduler(
        optimizer,
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
    iteration = load_checkpoint(args.load, model, optimizer, scheduler, args) if args.load else 0
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "pretrain_gpt_pisa: world %d = TP %d x DP %d, %d micro-batch(es) of %d per step, %.2fM params/TP rank, "
        "data %s (vocab %d -> %d)",
        world,
        tp,
        dp,
        micro_steps,
        args.micro_batch_size,
        n_params / 1e6,
        corpus.source,
        corpus.vocab_size,
        vocab,
    )
    for g in optimizer_summary(optimizer):
        logger.info("  PISA group: %s", json.dumps(g))
    if iteration:
        logger.info("resumed from %s at iteration %d", args.load, iteration)

    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = Batches(corpus.train, args.seq_length, args.micro_batch_size, args.seed, stream=dp_rank)
    position_ids = torch.arange(args.seq_length, device=device).unsqueeze(0).expand(args.micro_batch_size, -1)
    board = TensorBoard(args.tensorboard_dir, enabled=rank == 0)
    diagnostics = Diagnostics(optimizer.chained_optimizers[0].optimizer) if args.pisa_diagnostics_interval else None
    val = val_windows(corpus.val, args.seq_length, args.eval_iters * args.micro_batch_size).to(device)
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=args.train_iters, initial=iteration, desc="pretrain", dynamic_ncols=True)

    def evaluate() -> float:
        model.eval()
        total = torch.zeros(1, dtype=torch.float64, device=device)
        with torch.no_grad():
            for chunk in val.split(args.micro_batch_size):
                x, y = chunk[:, :-1], chunk[:, 1:]
                total += model(x, position_ids[: len(x)], None, labels=y).float().mean()
        model.train()
        dist.all_reduce(total, group=parallel_state.get_data_parallel_group())
        return total.item() / (dp * len(val.split(args.micro_batch_size)))

    loss_value, val_loss, checkpoint, start = float("nan"), None, None, time.time()
    while iteration < args.train_iters:
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss_sum = torch.zeros(1, dtype=torch.float64, device=device)
        for micro in range(micro_steps):
            x, y = (t.to(device) for t in batches.get(iteration, micro))
            loss = model(x, position_ids, None, labels=y).float().mean() / micro_steps
            optimizer.scale_loss(loss).backward()
            loss_sum += loss.detach()
        model.finish_grad_sync()
        if diagnostics is not None and (iteration + 1) % args.pisa_diagnostics_interval == 0:
            diagnostics.snapshot()
        lr = optimizer.param_groups[0]["lr"]  # the lr this step uses (the scheduler moves it after the step)
        updated, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        iteration += 1
        dist.all_reduce(loss_sum, group=parallel_state.get_data_parallel_group())
        loss_value = loss_sum.item() / dp
        scalars = {"train/loss": loss_value, "train/lr": lr, "train/skipped_step": 0.0 if updated else 1.0}
        if grad_norm is not None:
            scalars["train/grad_norm"] = float(grad_norm)
        if diagnostics is not None and iteration % args.pisa_diagnostics_interval == 0:
            scalars.update(diagnostics.measure())
        if args.eval_interval and (iteration % args.eval_interval == 0 or iteration == args.train_iters):
            val_loss = evaluate()
            scalars["val/loss"] = val_loss
        board.scalars(scalars, iteration)
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            logger.info(
                "iteration %d/%d | loss %.4f | lr %.3e | grad norm %s | %s | %.2f s/step",
                iteration,
                args.train_iters,
                loss_value,
                lr,
                "-" if grad_norm is None else f"{grad_norm:.3f}",
                "updated" if updated else "SKIPPED (non-finite gradients)",
                (time.time() - start) / args.log_interval,
            )
            start = time.time()
        if args.save and (
            (args.save_interval and iteration % args.save_interval == 0) or iteration == args.train_iters
        ):
            if not math.isfinite(loss_value):
                raise SystemExit(f"iteration {iteration}: loss is {loss_value}; not saving a non-finite checkpoint")
            checkpoint = save_checkpoint(args.save, iteration, model, optimizer, scheduler, args)
            logger.info("saved %s", checkpoint)
    if progress is not None:
        progress.close()
    board.close()
    return {"iteration": iteration, "loss": loss_value, "val_loss": val_loss, "checkpoint": checkpoint}


if __name__ == "__main__":
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code:
            print(e.code, file=sys.stderr)
    except Exception:
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
