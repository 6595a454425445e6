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
'nsisa' needs whole matrices: `.nsisa.ShardOrthogonalizer` routes each matrix's shards to one owner DP rank for
Newton–Schulz and back (`pisa_zero.routing`).

Files: ``factory`` (get_pisa_optimizer, version and internals check), ``groups`` (param groups),
``distributed_optimizer`` (PISADistributedOptimizer), ``nsisa`` (ShardOrthogonalizer).

Megatron 0.16 assumptions this package meets without patching Megatron:

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
  step's gradient norm decides (`PISAChainedOptimizer`): ``ChainedOptimizer.step`` computes that norm every step,
  summed over ``grad_stats_parallel_group``, so an inf/NaN in any rank's shard makes it non-finite on every rank,
  and the step is skipped on all (``optimizer.step()`` returns ``(False, None, None)`` as Megatron's own skip
  does) with no second read of the gradients. A bare `PISADistributedOptimizer` checks its shards itself and agrees
  over the same group (one 4-byte all-reduce).
"""

from .distributed_optimizer import PISAChainedOptimizer, PISADistributedOptimizer
from .factory import get_pisa_optimizer, optimizer_summary
from .groups import pisa_param_groups
from .nsisa import ShardOrthogonalizer

__all__ = [
    "PISAChainedOptimizer",
    "PISADistributedOptimizer",
    "ShardOrthogonalizer",
    "get_pisa_optimizer",
    "optimizer_summary",
    "pisa_param_groups",
]
