"""The three back ends of engine/train.py behind one small interface.

    backend.forward(x) -> logits          backend.backward(loss)       backend.grads_finite() -> bool (global)
    backend.step()   backend.skip()       backend.save(dir, extra)     backend.load(dir) -> extra
    backend.pisa  (the PISA optimizer)    backend.grad_norm()          backend.monitor (pisa_zero.monitor.Diagnostics)

``single`` is one process (a whole model and `pisa_zero.PISA`); ``fsdp2`` wraps the model with
`pisa_zero.integrations.fsdp.prepare` (mode A over all ranks, or mode B with ``--agents``); ``deepspeed`` builds the
engine with `pisa_zero.deepspeed.initialize` from the JSON config.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

import pisa_zero
from pisa_zero.monitor import Diagnostics, all_reduce_sum, global_norm


def pisa_options(args) -> dict:
    """PISA's constructor options from the command line (the matrix group's; the auxiliary group has its own lr)."""
    return dict(
        sigma=args.sigma,
        rho=args.rho,
        momentum=args.momentum,
        beta2=args.beta2,
        l2_lambda=args.l2_lambda,
        weight_decay=args.weight_decay,
        implementation=None if args.implementation == "auto" else args.implementation,
    )


def groups_for(model, args) -> list[dict]:
    other = {"lr": args.aux_lr, "weight_decay": args.aux_weight_decay} if args.other_preconditioner == "adamw" else {}
    return pisa_zero.param_groups(
        model,
        matrix_preconditioner=args.matrix_preconditioner,
        other_preconditioner=args.other_preconditioner,
        other_options=other,
    )


def _save_torch(path: str, model, optimizer, extra: dict) -> None:
    """Single-process fallback: one file, written to a temporary name and renamed (never half-written)."""
    os.makedirs(path, exist_ok=True)
    tmp = os.path.join(path, f".state.pt.tmp{os.getpid()}")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "extra": extra}, tmp)
    os.replace(tmp, os.path.join(path, "state.pt"))


def _checkpoint_module():
    try:
        from pisa_zero import checkpoint
    except ImportError:
        return None
    return checkpoint if hasattr(checkpoint, "save") and hasattr(checkpoint, "load") else None


class Single:
    name = "single"

    def __init__(self, model, args, device):
        self.model = model.to(device)
        self.optimizer = pisa_zero.PISA(groups_for(model, args), **pisa_options(args))
        self.pisa = self.optimizer
        self.monitor = Diagnostics(self.optimizer)
        self.accum = args.grad_accum

    def train(self, mode: bool = True):
        self.model.train(mode)

    def forward(self, x):
        return self.model(input_ids=x).logits

    def backward(self, loss, last: bool = True):
        (loss / self.accum).backward()

    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def grads_finite(self) -> bool:
        return pisa_zero.grads_are_finite(self.params())

    def grad_norm(self) -> float:
        return global_norm([p.grad for p in self.params()])

    def step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self):
        self.optimizer.zero_grad(set_to_none=True)

    def set_local_batch(self, n: int):
        pass

    def save(self, path: str, extra: dict) -> None:
        ckpt = _checkpoint_module()
        if ckpt is not None:
            ckpt.save(path, self.model, self.optimizer, extra=extra)
        else:
            _save_torch(path, self.model, self.optimizer, extra)

    def load(self, path: str) -> dict:
        ckpt = _checkpoint_module()
        if ckpt is not None and not os.path.exists(os.path.join(path, "state.pt")):
            return ckpt.load(path, self.model, self.optimizer) or {}
        state = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["extra"]


class FSDP2(Single):
    """FSDP2 (``fully_shard``) via `pisa_zero.integrations.fsdp.prepare`; ``--agents M`` > 1 is mode B."""

    name = "fsdp2"

    def __init__(self, model, args, device):
        try:
            from pisa_zero.integrations.fsdp import prepare
        except ImportError as e:
            raise SystemExit(f"--backend fsdp2 needs pisa_zero.integrations.fsdp.prepare (missing: {e})") from e
        self.topology = None
        if args.agents > 1:
            try:
                from pisa_zero.consensus import AgentTopology
            except ImportError as e:
                raise SystemExit(f"--agents needs pisa_zero.consensus.AgentTopology (missing: {e})") from e
            self.topology = AgentTopology.build(agents=args.agents)
        param_dtype = torch.bfloat16 if args.dtype == "bf16" else None
        model = model.to(device)
        self.model, self.optimizer = prepare(
            model,
            self.topology,
            param_dtype=param_dtype,
            cpu_offload=args.cpu_offload,
            groups=groups_for(model, args),
            **pisa_options(args),
        )
        self.pisa = self.optimizer
        self.monitor = Diagnostics(self.optimizer)
        self.accum = args.grad_accum

    def grad_norm(self) -> float:
        agents = self.topology.agents if self.topology is not None else 1
        return global_norm([p.grad for p in self.params()], replicas=agents)

    def set_local_batch(self, n: int):
        if self.topology is not None:
            self.optimizer.set_local_batch_size(n)

    def save(self, path: str, extra: dict) -> None:
        ckpt = _checkpoint_module()
        if ckpt is None:
            raise SystemExit("--backend fsdp2 checkpoints need pisa_zero.checkpoint.save/load, which is missing")
        ckpt.save(path, self.model, self.optimizer, extra=extra)

    def load(self, path: str) -> dict:
        ckpt = _checkpoint_module()
        if ckpt is None:
            raise SystemExit("--backend fsdp2 checkpoints need pisa_zero.checkpoint.save/load, which is missing")
        return ckpt.load(path, self.model, self.optimizer) or {}


def deepspeed_config(args, explicit: set[str], logdir: str | None, say=print) -> dict:
    """The JSON config with the command line's explicit batch/optimizer flags applied and TensorBoard turned on."""
    with open(args.deepspeed_config) as f:
        config = json.load(f)
    if "batch_size" in explicit or "train_micro_batch_size_per_gpu" not in config:
        config["train_micro_batch_size_per_gpu"] = args.batch_size
    if "grad_accum" in explicit or "gradient_accumulation_steps" not in config:
        config["gradient_accumulation_steps"] = args.grad_accum
    config.pop("train_batch_size", None)
    args.batch_size = int(config["train_micro_batch_size_per_gpu"])
    args.grad_accum = int(config["gradient_accumulation_steps"])
    opt = config.setdefault("optimizer", {"type": "PISA", "params": {}})
    if str(opt.get("type", "")).lower() != "pisa":
        raise ValueError(f"invalid {args.deepspeed_config}: optimizer.type={opt.get('type')!r}, expected 'PISA'")
    params = opt.setdefault("params", {})
    params.setdefault("param_groups", "auto")
    for flag, key in (
        ("sigma", "sigma"),
        ("rho", "rho"),
        ("momentum", "momentum"),
        ("beta2", "beta2"),
        ("l2_lambda", "l2_lambda"),
        ("weight_decay", "weight_decay"),
        ("matrix_preconditioner", "matrix_preconditioner"),
        ("other_preconditioner", "other_preconditioner"),
    ):
        if flag in explicit or key not in params:
            params[key] = getattr(args, flag)
    if "agents" in explicit or args.agents > 1:
        params["agents"] = args.agents
    if params.get("agents", 1) > 1 and config.get("gradient_clipping", 0):
        say(
            "[pisa_zero] mode B: the config's gradient_clipping is turned off (DeepSpeed would clip every agent "
            "with one agent's gradient norm)"
        )
        config["gradient_clipping"] = 0.0
    if "implementation" in explicit:
        params["implementation"] = pisa_options(args)["implementation"]
    if params.get("other_preconditioner") == "adamw":
        other = params.setdefault("other_options", {})
        if "aux_lr" in explicit or "lr" not in other:
            other["lr"] = args.aux_lr
        if "aux_weight_decay" in explicit or "weight_decay" not in other:
            other["weight_decay"] = args.aux_weight_decay
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


class DeepSpeed:
    name = "deepspeed"

    def __init__(self, model, args, device, config: dict):
        try:
            from pisa_zero.deepspeed import initialize
        except ImportError as e:
            raise SystemExit(f"--backend deepspeed needs pisa_zero.deepspeed.initialize, which is missing ({e})") from e
        self.engine, self.optimizer, _, self.scheduler = initialize(model=model, config=config)
        self.model = self.engine
        self.pisa = pisa_zero.monitor.find_pisa(self.engine.optimizer)
        self.monitor = Diagnostics(self.engine.optimizer)
        consensus = self.pisa.consensus
        self.topology = consensus if consensus is not None and consensus.agents > 1 else None
        self._zero_loss = False

    def train(self, mode: bool = True):
        self.engine.train(mode)

    def forward(self, x):
        return self.engine(input_ids=x.to(self.engine.device)).logits

    def backward(self, loss, last: bool = True):
        """DeepSpeed scales by its gradient_accumulation_steps itself and counts micro-steps in ``engine.step()``,
        which must follow every backward; off the boundary it only accumulates."""
        self.engine.backward(loss)
        if not last:
            self.engine.step()

    def grads_finite(self) -> bool:
        """ZeRO holds the reduced gradients in its own partitions; its overflow check all-reduces over the
        data-parallel group, so every rank gets the same answer. Stage 0 keeps ordinary ``.grad``s."""
        zero = self.engine.optimizer
        if hasattr(zero, "has_overflow") and self.engine.zero_optimization_stage() > 0:
            finite = not bool(zero.has_overflow(partition_gradients=True))
        else:
            finite = pisa_zero.grads_are_finite([p for p in self.engine.module.parameters() if p.requires_grad])
        if self.topology is not None:  # mode B: DeepSpeed's data-parallel group is one agent; agree across agents
            finite = all_reduce_sum([0.0 if finite else 1.0], device=self.engine.device)[0].item() == 0
        return finite

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def step(self):
        self.engine.step()

    def skip(self):
        """Finish the step with every group's lr at 0: PISA then leaves weights and state untouched, and DeepSpeed's
        own bookkeeping (gradient buffers, micro-step counters) stays consistent on every rank."""
        saved = [g["lr"] for g in self.pisa.param_groups]
        for g in self.pisa.param_groups:
            g["lr"] = 0.0
        try:
            self.engine.step()
        finally:
            for g, lr in zip(self.pisa.param_groups, saved):
                g["lr"] = lr

    def set_local_batch(self, n: int):
        if self.topology is not None:
            self.pisa.set_local_batch_size(n)

    def save(self, path: str, extra: dict) -> None:
        self.engine.save_checkpoint(os.path.dirname(path), tag=os.path.basename(path), client_state={"extra": extra})

    def load(self, path: str) -> dict:
        load_path, client = self.engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if load_path is None:
            raise ValueError(f"invalid --resume={path!r}: DeepSpeed found no checkpoint there")
        return client.get("extra", {})


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
