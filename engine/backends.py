"""The three back ends of engine/train.py behind one small interface.

    backend.forward(x) -> logits          backend.backward(loss)       backend.save(dir, extra)
    backend.step(flags, veto) -> (stepped on every rank, flags summed over ranks)
    backend.load(dir, allow_unverified) -> extra
    backend.param_groups (every group; ``lr_ref`` and ``name`` set)     backend.grad_norm()
    backend.pisa  (the PISA optimizer, None for a baseline)  backend.monitor (pisa_zero.monitor.Diagnostics or None)

``single`` is one process (a whole model); ``fsdp2`` wraps the model with `pisa_zero.integrations.fsdp.prepare`
(mode A over all ranks, or mode B with ``--agents``); ``deepspeed`` builds the engine with
`pisa_zero.deepspeed.initialize` from the JSON config. The optimizer is PISA or, with ``--optimizer adamw|muon``
(DeepSpeed: the JSON's ``optimizer.type``), the baseline it is compared with, on the same data, schedule, logging and
checkpoints. The DeepSpeed JSON as the engine reads it: engine/dsconfig.py.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

import pisa_zero
from engine.dsconfig import DEEPSPEED_TYPES, deepspeed_config  # noqa: F401  (re-exported: the JSON as read here)
from pisa_zero import checkpoint
from pisa_zero._utils import all_reduce_sum
from pisa_zero.consensus import AgentTopology
from pisa_zero.deepspeed import initialize as pisa_initialize
from pisa_zero.functional import all_finite
from pisa_zero.integrations.fsdp import prepare
from pisa_zero.monitor import Diagnostics, find_pisa, global_norm
from pisa_zero.param_groups import split_parameters


def pisa_options(args) -> dict:
    """PISA's constructor options from the command line (the matrix group's; the auxiliary group has its own lr)."""
    return dict(
        sigma=args.sigma,
        rho=args.rho,
        momentum=args.momentum,
        beta2=args.beta2,
        l2_lambda=args.l2_lambda,
        weight_decay=args.weight_decay,
        local_steps=args.local_steps,
        implementation=None if args.implementation == "auto" else args.implementation,
    ) | ({"prox_sigma": args.prox_sigma, "centred_dual": args.centred_dual} if args.local_steps > 1 else {})


def groups_for(model, args) -> list[dict]:
    other = {"lr": args.aux_lr, "weight_decay": args.aux_weight_decay} if args.other_preconditioner == "adamw" else {}
    return pisa_zero.param_groups(
        model,
        matrix_preconditioner=args.matrix_preconditioner,
        other_preconditioner=args.other_preconditioner,
        other_options=other,
    )


def baseline_optimizers(model, args) -> list[torch.optim.Optimizer]:
    """The --optimizer adamw|muon baseline for a whole (unsharded) model, each group tagged with ``lr_ref`` (the
    schedule multiplies it) and a ``name`` (its TensorBoard label).

    adamw: torch's AdamW (fused on CUDA, foreach on CPU) on every parameter. muon: ``torch.optim.Muon`` on exactly the
    matrices `pisa_zero.param_groups` gives NSISA, and AdamW (--aux-lr) on the rest, as PISA's auxiliary group.
    """
    matrices, others = split_parameters(model)
    fused = all(p.is_cuda for p in model.parameters()) or None
    betas = (0.9, 0.95)
    if args.optimizer == "adamw":
        groups = [{"params": matrices + others, "lr": args.lr, "weight_decay": args.weight_decay, "name": "adamw"}]
        optimizers = [torch.optim.AdamW(groups, lr=args.lr, betas=betas, fused=fused)]
    else:
        muon = {"params": matrices, "lr": args.lr, "weight_decay": args.weight_decay, "name": "muon"}
        aux = {"params": others, "lr": args.aux_lr, "weight_decay": args.aux_weight_decay, "name": "adamw"}
        optimizers = [
            torch.optim.Muon([muon], lr=args.lr, momentum=args.momentum),
            torch.optim.AdamW([aux], lr=args.aux_lr, betas=betas, fused=fused),
        ]
    for optimizer in optimizers:
        for g in optimizer.param_groups:
            g["lr_ref"] = g["lr"]
    return optimizers


class Single:
    name = "single"

    def __init__(self, model, args, device):
        self.model = model.to(device)
        if args.optimizer == "pisa":
            self.pisa = pisa_zero.PISA(groups_for(model, args), **pisa_options(args))
            self.optimizers = [self.pisa]
        else:
            self.pisa, self.optimizers = None, baseline_optimizers(self.model, args)
        self.monitor = Diagnostics(self.pisa) if self.pisa is not None else None
        self.accum, self.clip = args.grad_accum, args.clip_grad

    can_skip = True  # a skipped step is simply no optimizer.step()

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def train(self, mode: bool = True):
        self.model.train(mode)

    def forward(self, x):
        return self.model(input_ids=x).logits

    def backward(self, loss, last: bool = True):
        (loss / self.accum).backward()

    def params(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def weights_finite(self) -> bool:
        return weights_finite(self.params())

    def grad_norm(self) -> float:
        return global_norm([p.grad for p in self.params()])

    def step(self, flags: torch.Tensor, veto: torch.Tensor) -> tuple[bool, list[float]]:
        """The step's one finite check and one control all-reduce, which also sums the loop's ``flags``; every rank
        steps or skips together (``veto``: this rank's loss was not finite). With ``--clip-grad`` the clip's global
        norm is the check (inf/NaN anywhere makes it inf/NaN); without it the gradients are read once more. PISA
        makes the check inside its step (FSDP2: on its topology's all-reduce; one process: no collective); a
        baseline, or PISA with local steps (which skips inside an agent), gets it folded into the flags'
        all-reduce here."""
        norm = self._clip()
        pisa = self.pisa
        if pisa is not None and pisa.local_steps == 1:
            skipped = pisa.nonfinite_steps_skipped
            pisa.step(extra=flags, veto=veto, grad_norm=norm)
            pisa.zero_grad(set_to_none=True)
            return pisa.nonfinite_steps_skipped == skipped, pisa.extra_totals
        grads = [p.grad for p in self.params() if p.grad is not None]
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        if norm is not None:  # (no local steps: --clip-grad is refused in mode B)
            bad = veto | ~torch.isfinite(norm)
        else:
            bad = veto | ~pisa_zero.functional.finite_flag(local) if local else veto
        summed = all_reduce_sum(torch.cat([flags.double(), bad.double().reshape(1)])).tolist()
        for optimizer in self.optimizers:
            if summed[-1] == 0:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return summed[-1] == 0, summed[:-1]

    def _clip(self) -> torch.Tensor | None:
        """``--clip-grad``: the gradients scaled to a global norm of at most ``clip``; returns that norm before
        clipping (FSDP2: over every rank's shards) or None without clipping."""
        if not self.clip:
            return None
        params = [p for p in self.params() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # DTensor shards: the sum of squares over every rank (as torchtitan does)
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
        return norm

    def set_local_batch(self, n: int):
        pass

    def _optimizer_arg(self):
        return self.optimizers[0] if len(self.optimizers) == 1 else tuple(self.optimizers)

    def save(self, path: str, extra: dict) -> None:
        checkpoint.save(path, self.model, self._optimizer_arg(), extra=extra)

    def load(self, path: str, allow_unverified: bool = False) -> dict:
        return checkpoint.load(path, self.model, self._optimizer_arg(), allow_unverified=allow_unverified) or {}


class FSDP2(Single):
    """FSDP2 (``fully_shard``) via `pisa_zero.integrations.fsdp.prepare`; ``--agents M`` > 1 is mode B."""

    name = "fsdp2"

    def __init__(self, model, args, device):
        self.topology = AgentTopology.build(agents=args.agents) if args.agents > 1 else None
        param_dtype = torch.bfloat16 if args.dtype == "bf16" else None
        model = model.to(device)
        # prepare() shards the model and builds PISA on it; a baseline then takes the sharded parameters (PISA's
        # state is lazy, so the unused PISA object costs nothing)
        self.model, pisa = prepare(
            model,
            self.topology,
            param_dtype=param_dtype,
            cpu_offload=args.cpu_offload,
            groups=groups_for(model, args),
            routing_bytes=args.routing_bytes,
            **pisa_options(args),
        )
        if args.optimizer == "pisa":
            self.pisa, self.optimizers = pisa, [pisa]
        else:
            self.pisa, self.optimizers = None, baseline_optimizers(self.model, args)
        self.monitor = Diagnostics(self.pisa) if self.pisa is not None else None
        self.accum, self.clip = args.grad_accum, args.clip_grad

    def grad_norm(self) -> float:
        agents = self.topology.agents if self.topology is not None else 1
        return global_norm([p.grad for p in self.params()], replicas=agents)

    def set_local_batch(self, n: int):
        if self.topology is not None:
            self.pisa.set_local_batch_size(n)


def deepspeed_muon(model, params: dict):
    """DeepSpeed's own Muon (``MuonWithAuxAdam``, which its ZeRO stages orthogonalise on whole gradients) on exactly
    the matrices `pisa_zero.param_groups` gives NSISA, AdamW on the rest. Built here rather than from the JSON because
    DeepSpeed routes by name (``"embed"``/``"lm_head"``), which puts GPT-2's ``wte``/``wpe`` on Muon."""
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    matrices, others = split_parameters(model)
    for p in matrices:
        p.use_muon = True
    for p in others:
        p.use_muon = False
    shared = {k: params[k] for k in ("lr", "weight_decay") if k in params}
    muon = {"lr": 0.02, "momentum": 0.95, "ns_method": "gram", **shared}
    muon.update({k: params[k] for k in ("momentum", "ns_method") if k in params})
    adam = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0, **shared}
    adam.update({k: tuple(params[k]) if k == "betas" else params[k] for k in ("betas", "eps") if k in params})
    muon["lr"], adam["lr"] = params.get("muon_lr", muon["lr"]), params.get("adam_lr", adam["lr"])
    return MuonWithAuxAdam(
        [
            {"params": matrices, "use_muon": True, "name": "muon", **muon},
            {"params": others, "use_muon": False, "name": "adamw", **adam},
        ]
    )


class DeepSpeed:
    name = "deepspeed"

    def __init__(self, model, args, device, config: dict):
        if args.optimizer == "muon":
            optimizer = deepspeed_muon(model, config.pop("optimizer")["params"])
            self.engine, *_ = pisa_initialize(model=model, optimizer=optimizer, config=config)
        else:
            if args.routing_bytes is not None:  # PISA only (engine/flags.py); the flag overrides the JSON's key
                config["optimizer"]["params"]["routing_bytes"] = args.routing_bytes
            self.engine, *_ = pisa_initialize(model=model, model_parameters=model.parameters(), config=config)
        self.model = self.engine
        self.pisa = find_pisa(self.engine.optimizer) if args.optimizer == "pisa" else None
        self.monitor = Diagnostics(self.engine.optimizer) if self.pisa is not None else None
        consensus = self.pisa.consensus if self.pisa is not None else None
        self.topology = consensus if consensus is not None and consensus.agents > 1 else None
        for g in self.param_groups:
            g.setdefault("lr_ref", g["lr"])
            g.setdefault("name", args.optimizer)
        self.can_skip = self.pisa is not None

    @property
    def param_groups(self) -> list[dict]:
        """The optimizer's live groups: loading a checkpoint replaces its group dicts (a list kept from before the
        load would be written by the schedule and read by no one)."""
        return self.pisa.param_groups if self.pisa is not None else self.engine.optimizer.param_groups

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

    def step(self, flags: torch.Tensor, veto: torch.Tensor) -> tuple[bool, list[float]]:
        """DeepSpeed calls PISA once per ZeRO group inside ``engine.step()``, so the flags and the finite check come
        first here (DeepSpeed's own global overflow check), then the step, or the skip where there is one."""
        summed = all_reduce_sum(torch.cat([flags.double(), veto.double().reshape(1)]), device=self.engine.device)
        summed = summed.tolist()
        finite = summed[-1] == 0 and self._grads_finite()
        if finite:
            self.engine.step()
        elif self.can_skip:  # else the loop stops: DeepSpeed's own optimizers have no no-op step
            self._skip()
        return finite, summed[:-1]

    def _grads_finite(self) -> bool:
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

    def params(self):
        return [p for p in self.engine.module.parameters() if p.requires_grad]

    def weights_finite(self) -> bool:
        return weights_finite(self.params())

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _skip(self):
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
        """Into ``<path>.partial``, renamed to ``path`` once every rank has written its files (DeepSpeed writes in
        place). save_latest=False: DeepSpeed rewrites ``latest`` in place; engine/checkpoints.py writes it atomically.
        """
        partial = partial_path(path)
        self.engine.save_checkpoint(
            os.path.dirname(path), tag=os.path.basename(partial), client_state={"extra": extra}, save_latest=False
        )
        barrier()
        if dist.get_rank() == 0:
            if os.path.isdir(path):  # the same step saved again (a resumed run): replace it
                shutil.rmtree(path)
            os.rename(partial, path)

    def load(self, path: str, allow_unverified: bool = False) -> dict:
        """DeepSpeed's own load; the files were verified against run.json's checksums before (engine/resume.py)."""
        load_path, client = self.engine.load_checkpoint(os.path.dirname(path), tag=os.path.basename(path))
        if load_path is None:
            raise ValueError(f"invalid --resume={path!r}: DeepSpeed found no checkpoint there")
        return client.get("extra", {})


def build(args, model, device, ds_config: dict | None):
    """The back end ``args.backend`` names, built on ``model`` (DeepSpeed: from the JSON engine/dsconfig.py read)."""
    if args.backend == "deepspeed":
        return DeepSpeed(model, args, device, ds_config)
    return (FSDP2 if args.backend == "fsdp2" else Single)(model, args, device)


def partial_path(path: str) -> str:
    """Where a DeepSpeed checkpoint is written before it is complete (removed if the save fails)."""
    return f"{path}.partial"


def weights_finite(params) -> bool:
    """Every rank's local weights (DTensor shards, ZeRO-3 partitions, whole tensors) are finite (one all-reduce)."""
    local = [p.to_local() if hasattr(p, "to_local") else getattr(p, "ds_tensor", p) for p in params]
    bad = 0.0 if all_finite([t for t in local if t.numel()]) else 1.0
    return all_reduce_sum([bad], device=local[0].device if local else None)[0].item() == 0


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
