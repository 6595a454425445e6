"""``PISADistributedOptimizer``: Megatron's DistributedOptimizer with PISA inside (state slots, per-group steps,
group matching, checkpoint formats, the agreed non-finite skip, NSISA's empty-rank exchange)."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
from megatron.core.optimizer import ChainedOptimizer
from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from ... import functional as F
from ..._utils import comm_device
from ...optimizer import PISA
from .groups import group_key

logger = logging.getLogger(__name__)

#: Megatron's checkpoint slot names ← the PISA state each preconditioner stores in them (None: zeros).
STATE_SLOTS = ("exp_avg", "exp_avg_sq")
_SLOT_SOURCES = {
    "adamw": ("exp_avg", "exp_avg_sq"),
    "sisa": ("dual", "second_moment"),
    "adagrad": ("dual", "second_moment"),
    "identity": ("dual", None),
    "nsisa": ("dual", "momentum"),
}
#: Checkpoint formats of DistributedOptimizer.sharded_state_dict that PISA's state round-trips through.
SHARDING_TYPES = ("dp_reshardable", "fully_reshardable")


class PISADistributedOptimizer(DistributedOptimizer):
    """Megatron's DistributedOptimizer with PISA inside: state slots, per-group steps, group matching and the
    non-finite skip that PISA needs (see the package docstring)."""

    @property
    def optimizer_state_keys(self) -> tuple[str, ...]:  # Megatron ≥ 0.19 reads this; 0.16 hard-codes the same
        return STATE_SLOTS

    # --------------------------------------------------------------------------------------- inner optimizer
    def _pisa_optimizers(self) -> list[PISA]:
        if isinstance(self.optimizer, HybridDeviceOptimizer):
            return list(self.optimizer.sub_optimizers)
        return [self.optimizer]

    def _init_pisa_state(self) -> None:
        for opt in self._pisa_optimizers():
            opt.init_state()
        if isinstance(self.optimizer, HybridDeviceOptimizer):
            self.optimizer._sync_sub_optimizers_state_to_hdo()

    # ------------------------------------------------------------------------------------- non-finite skip
    norm_decides_skip = False  # set by PISAChainedOptimizer, whose gradient norm is the finite check

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()
        if self.grad_scaler or self.is_stub_optimizer:  # the scaler's check already ran, agreed by all ranks
            return found_inf
        if self.norm_decides_skip:
            return found_inf
        grads = [g for g in self._collect_main_grad_data_for_unscaling() if g is not None]
        finite = F.all_finite(grads) if grads else True
        group = self.get_grad_stats_parallel_group()
        device = comm_device(grads[0].device if grads else torch.device("cpu"), group)
        flag = torch.tensor([0.0 if finite else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() > 0:
            for opt in self._pisa_optimizers():
                opt.nonfinite_steps_skipped += 1
            logger.warning("PISA (Megatron): non-finite gradient on some rank; step skipped on all ranks")
            return True
        return False

    nsisa_orthogonalizer = None  # a ShardOrthogonalizer when the optimizer has an nsisa group

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        if self.nsisa_orthogonalizer is not None and not self.is_stub_optimizer:
            self.nsisa_orthogonalizer.join_if_empty(self.optimizer.param_groups)
        return super().step_with_ready_grads()

    # ------------------------------------------------------------------------------------ checkpoint state
    def _slots(self, group_index: int, main_param: torch.Tensor) -> dict:
        preconditioner = self.optimizer.param_groups[group_index]["preconditioner"]
        state = self.optimizer.state[main_param]
        out = {}
        for slot, source in zip(STATE_SLOTS, _SLOT_SOURCES[preconditioner]):
            out[slot] = state[source] if source is not None else torch.zeros_like(state["dual"])
        return out

    def _get_main_param_and_optimizer_states(self, model_param):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        if not self.optimizer.state.get(main_param):
            self._init_pisa_state()
        return {"param": main_param, **self._slots(group_index, main_param)}

    @torch.no_grad()  # fp32 models: the main param is a view of the model param (a leaf that requires grad)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self._slots(group_index, main_param)}
        for key, tensor in dst.items():
            tensor.copy_(tensors[key])

    def _group_steps(self) -> list[float]:
        """Each group's step (all its shards share it), agreed over the DP group (ranks may hold no shard)."""
        steps = []
        for group in self.optimizer.param_groups:
            values = {float(self.optimizer.state[p]["step"]) for p in group["params"] if self.optimizer.state.get(p)}
            if len(values) > 1:
                raise RuntimeError(f"PISA (Megatron): shards of one group have different steps {sorted(values)}")
            steps.append(values.pop() if values else -1.0)
        if steps and dist.is_initialized():
            group = self.data_parallel_group
            t = torch.tensor(steps, dtype=torch.float64, device=comm_device(torch.device("cpu"), group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            steps = t.tolist()
        return [max(s, 0.0) for s in steps]

    def state_dict(self):
        inner = self.optimizer.state_dict()
        groups = []
        for group, step in zip(inner["param_groups"], self._group_steps()):
            group = {k: v for k, v in group.items() if k not in ("params",) and not callable(v)}
            group["pisa_step"] = step
            groups.append(group)
        state_dict = {"optimizer": {"param_groups": groups}}
        if self.grad_scaler:
            state_dict["grad_scaler"] = self.grad_scaler.state_dict()
        return state_dict

    def load_state_dict(self, state_dict):
        saved = state_dict["optimizer"]["param_groups"]
        missing = [i for i, g in enumerate(saved) if "preconditioner" not in g or "pisa_step" not in g]
        if missing:
            raise ValueError(
                f"PISA (Megatron): the checkpoint's optimizer param groups {missing} were not written by PISA "
                "(no 'preconditioner'/'pisa_step'); start PISA from the model weights only (--no-load-optim)"
            )
        by_key = {}
        for g in saved:
            by_key.setdefault(group_key(g), g)
        live = self.optimizer.param_groups
        unmatched = [group_key(g) for g in live if group_key(g) not in by_key]
        if unmatched or len(by_key) != len(saved):
            raise ValueError(
                f"PISA (Megatron): checkpoint param groups {sorted(by_key, key=str)} do not match this run's "
                f"{[group_key(g) for g in live]} (unmatched: {unmatched})"
            )
        self._init_pisa_state()
        for group in live:
            src = by_key[group_key(group)]
            for key, value in src.items():
                if key in ("params", "pisa_step") or key not in group:
                    continue
                if key not in ("lr", "weight_decay") and group[key] != value:
                    logger.warning(
                        "PISA (Megatron): param group %s: %s=%r from the checkpoint replaces %r",
                        group_key(group),
                        key,
                        value,
                        group[key],
                    )
                group[key] = value
            for p in group["params"]:
                # A tensor of its own per parameter (Megatron hands all of them one shared tensor).
                self.optimizer.state[p]["step"] = torch.tensor(float(src["pisa_step"]))
        if self.grad_scaler and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
        if "param_state" in state_dict:
            sharding_type = state_dict["param_state_sharding_type"]
            check_sharding_type(sharding_type)
            if sharding_type == "dp_reshardable":
                self.load_parameter_state_from_dp_reshardable(state_dict["param_state"])
            else:
                self.load_parameter_state_from_fully_reshardable(state_dict["param_state"])
            if isinstance(self.optimizer, HybridDeviceOptimizer):
                # HDO's state dicts are its sub-optimizers' (updated in place above); its CPU copies of
                # offloaded shards are not: refresh them from the loaded main params.
                for main_param, cpu_copy in self.optimizer.gpu_params_map_cpu_copy.items():
                    cpu_copy.data.copy_(main_param.data)

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None, metadata=None):
        metadata = dict(metadata or {})
        metadata.setdefault("distrib_optim_sharding_type", sharding_type or "dp_reshardable")
        check_sharding_type(metadata["distrib_optim_sharding_type"])
        return super().sharded_state_dict(model_sharded_state_dict or {}, is_loading, metadata=metadata)


def check_sharding_type(sharding_type: str) -> None:
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(
            f"PISA (Megatron): invalid distrib_optim_sharding_type={sharding_type!r}: expected one of "
            f"{SHARDING_TYPES} (Megatron 0.16's default 'fully_sharded_model_space' cannot be read back)"
        )


def bound_pisa_class(options: dict) -> type:
    """PISA with the constructor options bound: HybridDeviceOptimizer builds its sub-optimizers as ``cls(groups)``."""

    class BoundPISA(PISA):
        def __init__(self, params):
            super().__init__(params, **options)

    BoundPISA.__name__ = BoundPISA.__qualname__ = "PISA"
    return BoundPISA


class PISAChainedOptimizer(ChainedOptimizer):
    """Megatron's ChainedOptimizer whose gradient norm is also the non-finite check. Megatron computes that norm
    every step (for ``clip_grad`` and its log) and reads every gradient for it; an inf/NaN in any rank's gradient
    makes it inf/NaN on every rank (it is summed over the grad-stats group). So the step decides the skip from the
    norm and the optimizers make no second read. The norm is computed in ``prepare_grads``, where the skip must be
    decided (``step()`` then returns ``(False, None, None)`` as for Megatron's own skip), and handed to the
    ``get_grad_norm`` call that ``step()`` makes next. With an fp16 grad scaler the scaler's check decides, as
    Megatron does."""

    def __init__(self, chained_optimizers):
        super().__init__(chained_optimizers)
        self._step_norm = None
        self._norm_decides = not any(o.grad_scaler or o.is_stub_optimizer for o in chained_optimizers)
        for opt in chained_optimizers:
            opt.norm_decides_skip = self._norm_decides

    @torch.no_grad()
    def prepare_grads(self) -> bool:
        found_inf = super().prepare_grads()
        if found_inf or not self._norm_decides:
            return found_inf
        norm = super().get_grad_norm()
        if math.isfinite(norm):
            self._step_norm = norm
            return False
        for dist_opt in self.chained_optimizers:
            for opt in dist_opt._pisa_optimizers():
                opt.nonfinite_steps_skipped += 1
        logger.warning("PISA (Megatron): non-finite gradient norm (inf/NaN on some rank); step skipped on all ranks")
        return True

    @torch.no_grad()
    def get_grad_norm(self):
        norm, self._step_norm = self._step_norm, None
        return norm if norm is not None else super().get_grad_norm()

    @torch.no_grad()
    def step_with_ready_grads(self) -> bool:
        self._step_norm = None  # a step() that did not ask for the norm leaves none behind for a later caller
        return super().step_with_ready_grads()
