"""PISA inside Megatron-core's ``DistributedOptimizer``: sharded π and v, fp32 main params, Megatron's clipping,
grad scaler, CPU offload and ``dist_checkpointing``.

    from pisa_zero.integrations.megatron import get_pisa_optimizer
    optimizer = get_pisa_optimizer(optimizer_config, model_chunks, sigma=30.0, rho=100.0)   # was get_megatron_optimizer

:func:`get_pisa_optimizer` has the shape of ``megatron.core.optimizer.get_megatron_optimizer(config, model_chunks,
config_overrides, use_gloo_process_groups, pg_collection)`` and returns what it returns (a ``ChainedOptimizer`` of one
:class:`PISADistributedOptimizer` for the dense parameters and one for the expert-parallel ones, if any), so
Megatron's training loop, ``OptimizerParamScheduler``, gradient clipping (``config.clip_grad``), fp16 loss scaling and
checkpointing work unchanged. PISA's hyper-parameters come as keywords; the learning rate, weight decay and, for an
auxiliary ``adamw`` group, ``adam_beta1/2`` and ``adam_eps`` come from the ``OptimizerConfig``.

What the inner PISA sees: Megatron's distributed optimizer cuts its contiguous grad buffer into equal DP ranges, so
every rank updates fp32 1-D shards of the parameters it owns (``shard_main_param``) with the reduce-scattered,
DP-averaged gradient, then all-gathers the updated bf16/fp32 parameters. π, v (and AdamW's moments) exist only for
these shards: ZeRO-1-style sharded optimizer state, mode A (m = 1 agent per gradient-averaging group). The
elementwise preconditioners ('sisa', 'adagrad', 'identity') and the auxiliary 'adamw' are exact on such shards;
'nsisa' needs whole matrices and is refused here.

Megatron 0.16 assumptions this module meets without patching Megatron:

- ``DistributedOptimizer.__init__`` accepts only Adam/AdamW/``HybridDeviceOptimizer`` as its inner optimizer. It is
  built over a state-less ``torch.optim.AdamW`` that only carries the param groups while Megatron cuts the shards;
  PISA then takes over those shard groups (same order, same dicts' options), before any state exists.
  With CPU offload the inner optimizer is Megatron's ``HybridDeviceOptimizer`` with PISA on both devices.
- Checkpoint code names the two optimizer-state tensors of a shard ``exp_avg``/``exp_avg_sq`` (hard-coded in 0.16,
  ``optimizer_state_keys`` in 0.19). Those are the *slots* PISA's state is written to (:data:`STATE_SLOTS`): AdamW
  groups store ``exp_avg``/``exp_avg_sq``, PISA groups ``dual`` and ``second_moment`` (sisa, adagrad),
  ``momentum`` (nsisa) or zeros (identity). Every parameter has both slots, which Megatron's bucket-wise formats need.
- Megatron saves one ``step`` for all parameters and on load hands every parameter *the same* tensor, which a
  per-parameter ``state['step'] += 1`` would advance N times per step. Here each group's step is saved with the
  group (``pisa_step``) and every parameter gets its own tensor back.
- Megatron matches saved param groups by ``(wd_mult, lr_mult, is_expert_parallel, is_decoupled_lr)``; PISA groups
  that differ only in preconditioner would collide, so they are matched with ``preconditioner`` added, and a
  checkpoint written by another optimizer is refused by name.
- Checkpoint formats: ``dp_reshardable`` (the default here) and ``fully_reshardable``; Megatron's own default
  ``fully_sharded_model_space`` fails on any device in 0.16 ("flattened_range is not supported") and is refused.
- Non-finite gradients: Megatron skips a step only when an fp16 grad scaler finds inf/NaN. Without a scaler the
  PISA optimizer checks its shards, agrees over ``grad_stats_parallel_group`` (one 4-byte all-reduce) and skips the
  step on every rank (``optimizer.step()`` returns ``(False, None, None)`` as Megatron's own skip does).
"""

from __future__ import annotations

import inspect
import logging
import math

import torch
import torch.distributed as dist

from .. import functional as F
from .._utils import comm_device
from ..optimizer import PISA

logger = logging.getLogger(__name__)

#: megatron-core minor versions whose DistributedOptimizer internals this module was checked on (tests/test_megatron*).
TESTED_MEGATRON = ((0, 16),)
#: Preconditioners that are exact on Megatron's 1-D parameter shards.
SHARD_PRECONDITIONERS = ("sisa", "adagrad", "identity", "adamw")
#: Preconditioners of the block matrices: the elementwise ones, and 'nsisa' (whole matrices routed to owner ranks).
MATRIX_PRECONDITIONERS = ("sisa", "adagrad", "identity", "nsisa")
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
#: Per-group overrides ``other_options`` may set for the non-matrix group.
OTHER_OPTION_KEYS = ("lr", "betas", "eps", "sigma", "rho", "beta2", "l2_lambda")
#: PISA constructor keywords the factory passes through (lr/weight_decay/betas come from the OptimizerConfig).
PISA_KEYS = (
    "sigma",
    "rho",
    "beta2",
    "momentum",
    "nesterov",
    "eps",
    "l2_lambda",
    "ns_steps",
    "implementation",
    "state_dtype",
)


def megatron_version() -> tuple[int, int]:
    import megatron.core

    return tuple(int(x) for x in megatron.core.__version__.split(".")[:2])


def _check_megatron() -> None:
    """Fail at construction, naming what is missing, if this megatron-core lacks an internal the wrapper uses
    (the same names exist on upstream main as of 0.20.0-dev, where ``optimizer_state_keys`` was added)."""
    from megatron.core import optimizer as mopt
    from megatron.core.optimizer import optimizer as mopt_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection

    needed = [
        (mopt, "_get_param_groups"),
        (mopt_optimizer, "param_group_identifier_keys"),
        (ProcessGroupCollection, "setup_process_groups_for_optimizer"),
        *((DistributedOptimizer, name) for name in _DISTRIBUTED_OPTIMIZER_INTERNALS),
    ]
    missing = [f"{getattr(owner, '__name__', owner)}.{name}" for owner, name in needed if not hasattr(owner, name)]
    version = megatron_version()
    if missing:
        raise RuntimeError(
            f"pisa_zero.megatron: megatron-core {version[0]}.{version[1]} lacks {missing}; tested on {TESTED_MEGATRON}"
        )
    if version not in TESTED_MEGATRON:
        logger.warning(
            "pisa_zero.megatron: megatron-core %s.%s is not among the tested versions %s; run tests/test_megatron*.py",
            *version,
            TESTED_MEGATRON,
        )


#: DistributedOptimizer methods PISADistributedOptimizer overrides or calls.
_DISTRIBUTED_OPTIMIZER_INTERNALS = (
    "_get_main_param_and_optimizer_states",
    "_set_main_param_and_optimizer_states",
    "load_parameter_state_from_dp_reshardable",
    "load_parameter_state_from_fully_reshardable",
    "_collect_main_grad_data_for_unscaling",
    "_get_model_param_range_map",
    "prepare_grads",
    "step_with_ready_grads",
)


# ----------------------------------------------------------------------------------------------- param groups
def block_matrices(model_chunks: list) -> set[int]:
    """ids of the transformer block matrices: 2-D weights of Megatron's (or TE's) ``*Linear`` modules, except the
    output layer (``is_embedding_or_output_parameter``). Word and position embeddings are not Linear modules."""
    ids = set()
    for chunk in model_chunks:
        for module in chunk.modules():
            weight = getattr(module, "weight", None) if type(module).__name__.endswith("Linear") else None
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                if not getattr(weight, "is_embedding_or_output_parameter", False):
                    ids.add(id(weight))
    return ids


def pisa_param_groups(
    model_chunks: list,
    config,
    config_overrides: dict | None = None,
    *,
    preconditioner: str = "sisa",
    other_preconditioner: str | None = None,
    other_options: dict | None = None,
) -> list[dict]:
    """Megatron's param groups (``_get_param_groups``: wd/lr multipliers, decoupled lr, expert-parallel flag), each
    split into its block matrices (``preconditioner``) and the rest (``other_preconditioner``; None: the same).

    Every group carries ``preconditioner``, ``lr = max_lr`` (PISA's reference lr: σ and ρ are given at the
    peak lr and scale by max_lr / lr as Megatron's scheduler moves ``lr``) and ``weight_decay = config.weight_decay
    · wd_mult``; ``adamw`` groups take ``betas`` and ``eps`` from ``config`` unless ``other_options`` sets them.
    """
    from megatron.core.optimizer import _get_param_groups

    _check_grouping(preconditioner, other_preconditioner, other_options)
    other_preconditioner = other_preconditioner or preconditioner
    other_options = dict(other_options or {})
    matrices_ids = block_matrices(model_chunks)
    groups = []
    for group in _get_param_groups(model_chunks, config, config_overrides):
        if other_preconditioner == preconditioner and not other_options:
            splits = [(group["params"], preconditioner, {})]
        else:  # both splits even when one is empty here: every rank (every PP stage) must have the same groups
            matrices = [p for p in group["params"] if id(p) in matrices_ids]
            others = [p for p in group["params"] if id(p) not in matrices_ids]
            splits = [(matrices, preconditioner, {}), (others, other_preconditioner, other_options)]
        for params, precond, options in splits:
            new = {
                **group,
                "params": params,
                "preconditioner": precond,
                "lr": group["max_lr"],
                "weight_decay": config.weight_decay * group["wd_mult"],  # until the scheduler sets it
            }
            if precond == "adamw":
                new.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
            options = dict(options)
            if "lr" in options:  # Megatron's scheduler sets lr from max_lr/min_lr: move the whole schedule
                lr = options.pop("lr")
                if params and group["max_lr"] != config.lr:
                    raise ValueError(
                        f"pisa_zero.megatron: other_options lr={lr} and a Megatron lr override (max_lr="
                        f"{group['max_lr']}, e.g. decoupled_lr) both set the lr of the same parameters; use one"
                    )
                new.update(lr=lr, max_lr=lr, min_lr=group["min_lr"] * lr / group["max_lr"], default_config=False)
            new.update(options)
            groups.append(new)
    return groups


def _check_grouping(preconditioner: str, other_preconditioner: str | None, other_options: dict | None) -> None:
    if preconditioner not in MATRIX_PRECONDITIONERS:
        raise ValueError(
            f"pisa_zero.megatron: invalid preconditioner={preconditioner!r}: expected one of {MATRIX_PRECONDITIONERS}"
        )
    if other_preconditioner is not None and other_preconditioner not in SHARD_PRECONDITIONERS:
        raise ValueError(
            f"pisa_zero.megatron: invalid other_preconditioner={other_preconditioner!r}: embeddings, norms and biases "
            f"take one of {SHARD_PRECONDITIONERS}"
            + (" (nsisa is for the block matrices: preconditioner='nsisa')" if other_preconditioner == "nsisa" else "")
        )
    if preconditioner == "nsisa" and other_preconditioner is None:
        raise ValueError(
            "pisa_zero.megatron: preconditioner='nsisa' needs other_preconditioner for embeddings, norms and biases "
            "(usually 'adamw', the auxiliary AdamW)"
        )
    unknown = sorted(set(other_options or {}) - set(OTHER_OPTION_KEYS))
    if unknown:
        raise ValueError(f"pisa_zero.megatron: other_options has unknown keys {unknown}; expected {OTHER_OPTION_KEYS}")


def _group_key(group: dict) -> tuple:
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    return (*(group.get(k, group.get(f"pre_{k}")) for k in param_group_identifier_keys), group["preconditioner"])


# ------------------------------------------------------------------------------------------ distributed optimizer
def _distributed_optimizer_cls():
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    class PISADistributedOptimizer(DistributedOptimizer):
        """Megatron's DistributedOptimizer with PISA inside: state slots, per-group steps, group matching and the
        non-finite skip that PISA needs (see the module docstring)."""

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
        @torch.no_grad()
        def prepare_grads(self) -> bool:
            found_inf = super().prepare_grads()
            if self.grad_scaler or self.is_stub_optimizer:  # the scaler's check already ran, agreed by all ranks
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
                values = {
                    float(self.optimizer.state[p]["step"]) for p in group["params"] if self.optimizer.state.get(p)
                }
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
                by_key.setdefault(_group_key(g), g)
            live = self.optimizer.param_groups
            unmatched = [_group_key(g) for g in live if _group_key(g) not in by_key]
            if unmatched or len(by_key) != len(saved):
                raise ValueError(
                    f"PISA (Megatron): checkpoint param groups {sorted(by_key, key=str)} do not match this run's "
                    f"{[_group_key(g) for g in live]} (unmatched: {unmatched})"
                )
            self._init_pisa_state()
            for group in live:
                src = by_key[_group_key(group)]
                for key, value in src.items():
                    if key in ("params", "pisa_step") or key not in group:
                        continue
                    if key not in ("lr", "weight_decay") and group[key] != value:
                        logger.warning(
                            "PISA (Megatron): param group %s: %s=%r from the checkpoint replaces %r",
                            _group_key(group),
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
                _check_sharding_type(sharding_type)
                if sharding_type == "dp_reshardable":
                    self.load_parameter_state_from_dp_reshardable(state_dict["param_state"])
                else:
                    self.load_parameter_state_from_fully_reshardable(state_dict["param_state"])
                if isinstance(self.optimizer, HybridDeviceOptimizer):
                    # HDO's state dicts are its sub-optimizers' (updated in place above); its CPU copies of
                    # offloaded shards are not: refresh them from the loaded main params.
                    for main_param, cpu_copy in self.optimizer.gpu_params_map_cpu_copy.items():
                        cpu_copy.data.copy_(main_param.data)

        def sharded_state_dict(
            self, model_sharded_state_dict=None, is_loading=False, sharding_type=None, metadata=None
        ):
            metadata = dict(metadata or {})
            metadata.setdefault("distrib_optim_sharding_type", sharding_type or "dp_reshardable")
            _check_sharding_type(metadata["distrib_optim_sharding_type"])
            return super().sharded_state_dict(model_sharded_state_dict or {}, is_loading, metadata=metadata)

    return PISADistributedOptimizer


def _check_sharding_type(sharding_type: str) -> None:
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(
            f"PISA (Megatron): invalid distrib_optim_sharding_type={sharding_type!r}: expected one of "
            f"{SHARDING_TYPES} (Megatron 0.16's default 'fully_sharded_model_space' cannot be read back)"
        )


def _pisa_class(options: dict) -> type:
    """PISA with the constructor options bound: HybridDeviceOptimizer builds its sub-optimizers as ``cls(groups)``."""

    class BoundPISA(PISA):
        def __init__(self, params):
            super().__init__(params, **options)

    BoundPISA.__name__ = BoundPISA.__qualname__ = "PISA"
    return BoundPISA


# ------------------------------------------------------------------------------------------------------- NSISA
class ShardOrthogonalizer:
    """``PISA(orthogonalizer=...)`` for the nsisa group of a Megatron DistributedOptimizer.

    Each PISA tensor of that group is one fp32 main-param shard: elements ``[start, end)`` of one block matrix's
    row-major flattening on this DP rank, i.e. one `pisa_zero.routing.Piece`. One `MatrixRouter` over the DP group
    sends every piece of u = g + μb to its matrix's owner rank (cost-balanced), which runs Newton–Schulz on the whole
    matrix and sends each rank its pieces of O back: two all-to-alls of the shards' size per step and 1/DP of the
    Newton–Schulz work per rank. Never NS on a slice.

    The router is collective: a DP rank whose range holds no piece of the group still takes part
    (:meth:`join_if_empty`, called by the distributed optimizer before PISA's step, in which such a rank has no
    nsisa work and would otherwise not call the router).
    """

    def __init__(self):
        self.router = None
        self.group_index = None
        self._ids: list[int] = []
        self._device = None

    def bind(self, dist_opt, group_index: int, names: dict[int, str]) -> None:
        """Build the router from ``dist_opt``'s shard layout of param group ``group_index`` (collective: one
        ``all_gather_object`` over the DP group)."""
        from ..routing import MatrixRouter, Piece

        by_order = {
            order: model_param
            for model_param, (index, order) in dist_opt.model_param_group_index_map.items()
            if index == group_index
        }
        shards = dist_opt.optimizer.param_groups[group_index]["params"]
        if sorted(by_order) != list(range(len(shards))):
            raise RuntimeError("PISA (Megatron): nsisa shards and DistributedOptimizer's group index map disagree")
        pieces = []
        for order in range(len(shards)):
            model_param = by_order[order]
            if model_param.dim() != 2:
                raise ValueError(f"PISA (Megatron): nsisa group holds {names[id(model_param)]}, which is not a matrix")
            span = dist_opt._get_model_param_range_map(model_param)["param"]
            pieces.append(Piece(names[id(model_param)], tuple(model_param.shape), span.start, span.size))
        self.router = MatrixRouter.from_local_pieces(pieces, dist_opt.data_parallel_group)
        self.group_index = group_index
        self._ids = [id(p) for p in shards]
        self._device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None

    def __call__(self, params, directions, ns_steps: int) -> list[torch.Tensor]:
        if self.router is None or [id(p) for p in params] != self._ids:
            raise ValueError(
                "PISA (Megatron): nsisa was handed tensors that are not the DistributedOptimizer's shards it was "
                "bound to (build the optimizer with pisa_zero.integrations.megatron.get_pisa_optimizer)"
            )
        u = directions[0]
        return self.router.orthogonalize(directions, ns_steps, F.ns_compute_dtype(u.device, u.dtype))

    def join_if_empty(self, param_groups: list[dict]) -> None:
        group = param_groups[self.group_index]
        if group["params"] or group["lr"] == 0:  # PISA calls the router itself / every rank skips the group
            return
        device = self._device or torch.device("cpu")
        dtype = torch.float32
        self.router.orthogonalize([], group["ns_steps"], F.ns_compute_dtype(device, dtype), dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------------- factory
def _validate(config, pisa_kwargs: dict) -> None:
    unknown = sorted(set(pisa_kwargs) - set(PISA_KEYS))
    if unknown:
        raise ValueError(
            f"get_pisa_optimizer: unknown PISA option(s) {unknown}; expected some of {PISA_KEYS} (lr, weight decay "
            "and AdamW betas/eps come from the OptimizerConfig)"
        )
    if not config.use_distributed_optimizer:
        raise ValueError(
            "get_pisa_optimizer: config.use_distributed_optimizer=False; PISA on Megatron runs inside the "
            "DistributedOptimizer (--use-distributed-optimizer), which shards its state"
        )
    if config.use_precision_aware_optimizer:
        raise ValueError("get_pisa_optimizer: use_precision_aware_optimizer=True is for TE's FusedAdam only")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ValueError(f"get_pisa_optimizer: invalid config.lr={config.lr!r}: PISA's reference lr must be > 0")
    if config.optimizer_cpu_offload and not 0.0 <= config.optimizer_offload_fraction <= 1.0:
        raise ValueError(f"get_pisa_optimizer: invalid optimizer_offload_fraction={config.optimizer_offload_fraction}")


def _build(
    config,
    model_chunks: list,
    groups: list[dict],
    buffers: dict,
    pisa_options: dict,
    *,
    dp_group,
    dp_group_gloo,
    dp_group_idx: int,
    stats_group,
    instance_id: int,
    tp_group,
):
    """One PISADistributedOptimizer over ``groups`` (the dense or the expert-parallel ones), as Megatron's
    ``_get_megatron_optimizer_based_on_param_groups`` builds one Adam DistributedOptimizer."""
    from megatron.core.optimizer import ConstantGradScaler, DynamicGradScaler
    from megatron.core.optimizer.cpu_offloading import HybridDeviceOptimizer

    grad_scaler = None
    if config.loss_scale:
        grad_scaler = ConstantGradScaler(config.loss_scale)
    elif config.fp16:
        grad_scaler = DynamicGradScaler(
            initial_scale=config.initial_loss_scale,
            min_scale=config.min_loss_scale,
            growth_factor=2.0,
            backoff_factor=0.5,
            growth_interval=config.loss_scale_window,
            hysteresis=config.hysteresis,
        )
    options = {**pisa_options, "skip_nonfinite": False}  # the skip is agreed across ranks in prepare_grads
    if not groups:
        inner = None
    elif config.optimizer_cpu_offload:
        cls = _pisa_class(options)
        inner = HybridDeviceOptimizer(
            groups,
            offload_fraction=config.optimizer_offload_fraction,
            cpu_optimizer_cls=cls,
            gpu_optimizer_cls=cls,
            overlap_cpu_optimizer_d2h_h2d=config.overlap_cpu_optimizer_d2h_h2d,
            pin_cpu_grads=config.pin_cpu_grads,
            pin_cpu_params=config.pin_cpu_params,
            param_update_in_fp32=True,
            lr=config.lr,
        )
    else:
        # the nsisa group with matrices (model params: the same on every DP rank, before Megatron shards them)
        nsisa = [i for i, g in enumerate(groups) if g["preconditioner"] == "nsisa" and g["params"]]
        orthogonalizer = ShardOrthogonalizer() if nsisa else None
        pisa = PISA(groups, orthogonalizer=orthogonalizer, **options)  # validates the groups on the model params
        # A state-less AdamW carries the groups' parameter lists through DistributedOptimizer.__init__, which
        # accepts only Adam-family inner optimizers in Megatron 0.16.
        inner = torch.optim.AdamW([{"params": g["params"]} for g in groups], lr=config.lr)
    optimizer = _distributed_optimizer_cls()(
        inner,
        config,
        grad_scaler,
        lambda opt, config=None: opt.init_state(),
        model_chunks=model_chunks,
        per_model_buffers=buffers,
        data_parallel_group=dp_group,
        data_parallel_group_gloo=dp_group_gloo,
        data_parallel_group_idx=dp_group_idx,
        distributed_optimizer_instance_id=instance_id,
    )
    if inner is not None and not config.optimizer_cpu_offload:
        # Re-point PISA's groups at this rank's fp32 main-param shards exactly as DistributedOptimizer re-points
        # its inner optimizer's (fp32 model params give non-leaf views, which add_param_group would refuse).
        for group, carried in zip(pisa.param_groups, inner.param_groups):
            group["params"] = carried["params"]
        pisa.load_state_dict(pisa.state_dict())
        optimizer.optimizer = pisa
        if orthogonalizer is not None:
            names = {id(p): f"{i}.{n}" for i, chunk in enumerate(model_chunks) for n, p in chunk.named_parameters()}
            orthogonalizer.bind(optimizer, nsisa[0], names)
            optimizer.nsisa_orthogonalizer = orthogonalizer
    optimizer.grad_stats_parallel_group = stats_group
    optimizer.tp_group = tp_group
    return optimizer


def _check_nsisa(config, tp_group, dense: list[dict], expert: list[dict]) -> None:
    if config.optimizer_cpu_offload:
        raise ValueError(
            "get_pisa_optimizer: preconditioner='nsisa' with optimizer_cpu_offload: HybridDeviceOptimizer splits the "
            "shards over several sub-optimizers, so whole-matrix routing cannot run; use 'sisa' or no offload"
        )
    if tp_group is not None and tp_group.size() > 1:
        raise ValueError(
            "get_pisa_optimizer: preconditioner='nsisa' with tensor parallelism: each TP rank holds a block of every "
            "matrix and Newton–Schulz would run on a slice; use TP=1 (DP and EP are fine) or 'sisa'"
        )
    for kind, groups in (("dense", dense), ("expert-parallel", expert)):
        count = sum(g["preconditioner"] == "nsisa" and bool(g["params"]) for g in groups)
        if count > 1:
            raise ValueError(
                f"get_pisa_optimizer: preconditioner='nsisa' needs the {kind} block matrices in one param group; "
                f"config_overrides split them into {count} (their Newton–Schulz exchange is one collective per step)"
            )


def get_pisa_optimizer(
    config,
    model_chunks: list,
    config_overrides: dict | None = None,
    use_gloo_process_groups: bool = True,
    pg_collection=None,
    *,
    preconditioner: str = "sisa",
    other_preconditioner: str | None = None,
    other_options: dict | None = None,
    **pisa_kwargs,
):
    """PISA in Megatron's DistributedOptimizer, chained for dense and expert-parallel parameters.

    Args:
        config: ``megatron.core.optimizer.OptimizerConfig`` with ``use_distributed_optimizer=True``; its ``lr``,
            ``min_lr``, ``weight_decay``, ``clip_grad``, ``bf16``/``fp16``, loss-scale fields, ``adam_beta1/2`` and
            ``adam_eps`` (for ``adamw`` groups) and ``optimizer_cpu_offload``/``optimizer_offload_fraction`` are
            used as Megatron uses them. ``config.optimizer`` is not read.
        model_chunks: Megatron ``DistributedDataParallel`` model chunks (``use_distributed_optimizer=True``).
        config_overrides, use_gloo_process_groups, pg_collection: as for ``get_megatron_optimizer``.
        preconditioner: PISA preconditioner of the transformer block matrices ('sisa', 'adagrad', 'identity', or
            'nsisa': Newton–Schulz on whole matrices routed over the DP group; needs TP=1, no offload).
        other_preconditioner: of embeddings, output layer, norms and biases ('adamw' for the auxiliary AdamW);
            None: the same as ``preconditioner``.
        other_options: per-group overrides for those ('lr', 'betas', 'eps', 'sigma', 'rho', 'beta2', 'l2_lambda');
            'lr' becomes the groups' peak lr (``max_lr``, with ``min_lr`` scaled alike) for Megatron's scheduler.
        **pisa_kwargs: PISA options (:data:`PISA_KEYS`: sigma, rho, beta2, eps, l2_lambda, implementation, ...).
    """
    from megatron.core.optimizer import ChainedOptimizer
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.utils import get_pg_rank, get_pg_size

    _check_megatron()
    _validate(config, pisa_kwargs)
    _check_grouping(preconditioner, other_preconditioner, other_options)
    if config.overlap_param_gather_with_optimizer_step:
        raise ValueError("get_pisa_optimizer: overlap_param_gather_with_optimizer_step is not supported")
    if model_chunks[0].ddp_config.use_megatron_fsdp:
        raise ValueError("get_pisa_optimizer: Megatron-FSDP is not supported; use Megatron DDP")
    pgs = ProcessGroupCollection.setup_process_groups_for_optimizer(
        pg_collection, model_chunks, use_gloo_process_groups
    )
    if get_pg_size(pgs["dp_cp_group"]) > get_pg_size(pgs["intra_dp_cp_group"]):
        instance_id = get_pg_rank(pgs["inter_dist_opt_group"])
    else:
        instance_id = 0
    if pg_collection is not None and hasattr(pg_collection, "tp"):
        tp_group = pg_collection.tp
    else:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    groups = pisa_param_groups(
        model_chunks,
        config,
        config_overrides,
        preconditioner=preconditioner,
        other_preconditioner=other_preconditioner,
        other_options=other_options,
    )
    for group in groups:  # PISA validates every group (σ, ρ, β₂, ...) now, before any Megatron work
        PISA._validate_group({**_PISA_DEFAULTS, **pisa_kwargs, **group})
    options = dict(pisa_kwargs)
    dense = [g for g in groups if not g["is_expert_parallel"]]
    expert = [g for g in groups if g["is_expert_parallel"]]
    if preconditioner == "nsisa":
        _check_nsisa(config, tp_group, dense, expert)

    def buffers(name: str) -> dict:
        return {i: getattr(c, name) for i, c in enumerate(model_chunks) if hasattr(c, name)}

    common = dict(stats_group=pgs["intra_dist_opt_group"], instance_id=instance_id, tp_group=tp_group)
    optimizers = [
        _build(
            config,
            model_chunks,
            dense,
            buffers("buffers"),
            options,
            dp_group=pgs["intra_dp_cp_group"],
            dp_group_gloo=pgs["intra_dp_cp_group_gloo"],
            dp_group_idx=get_pg_rank(pgs["mp_group"]),
            **common,
        )
    ]
    if expert:
        optimizers.append(
            _build(
                config,
                model_chunks,
                expert,
                buffers("expert_parallel_buffers"),
                options,
                dp_group=pgs["intra_expt_dp_group"],
                dp_group_gloo=pgs["intra_expt_dp_group_gloo"] if use_gloo_process_groups else None,
                dp_group_idx=get_pg_rank(pgs["expt_tp_pp_group"]),
                **common,
            )
        )
    return ChainedOptimizer(optimizers)


_PISA_DEFAULTS = {
    k: p.default for k, p in inspect.signature(PISA.__init__).parameters.items() if p.default is not p.empty
}


def optimizer_summary(optimizer) -> list[dict]:
    """One dict per PISA param group of a (chained) Megatron PISA optimizer: what a log line or test needs."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for group in getattr(inner, "param_groups", []):
            out.append(
                {
                    "preconditioner": group["preconditioner"],
                    "numel": sum(p.numel() for p in group["params"]),
                    "wd_mult": group.get("wd_mult"),
                    "is_expert_parallel": group.get("is_expert_parallel"),
                    "lr": group["lr"],
                }
            )
    return out
