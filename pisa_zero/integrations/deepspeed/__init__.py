"""PISA as a first-class DeepSpeed optimizer: ZeRO-1/2/3, bf16/fp16, CPU offload, NSISA on whole matrices.

Two entry points (see ``docs/deepspeed.md``):

- :func:`initialize` — a drop-in for ``deepspeed.initialize`` that reads ``"optimizer": {"type": "PISA", "params":
  {...}}`` from the JSON (path, dict or ``args.deepspeed_config``), validates it before any process-group work, sets
  the flags DeepSpeed needs for a client optimizer and builds PISA through a callable.
- :func:`register` — replaces the ``deepspeed.initialize`` attribute of the ``deepspeed`` module with a wrapper that
  routes configs whose optimizer type is ``PISA`` to :func:`initialize` and everything else to DeepSpeed unchanged,
  so an unchanged script that calls ``deepspeed.initialize(...)`` gets PISA.

NSISA (Newton–Schulz on whole matrices) under ZeRO: DeepSpeed hands the optimizer flat 1-D partitions that cut across
parameters. The nsisa momentum and everything after Newton–Schulz are elementwise, so they run on the flat partition;
only ``O = NS5(u)`` needs whole matrices. :func:`initialize` builds PISA with a strategy that sends each piece
of ``u`` to its matrix's owner rank (one all-to-all over the data-parallel group), rebuilds each whole matrix from the
partition layout DeepSpeed recorded (ZeRO-1/2: ``round_robin_bit16_offsets``/``partition_size``; ZeRO-3: per-parameter
``ds_tensor`` partitions of a sub-group), orthogonalises them batched and sends the pieces of ``O`` back. Nothing inside
DeepSpeed is patched; the attributes read are checked at install time (:func:`_check_deepspeed_internals`), so a
DeepSpeed upgrade that renames them fails loudly at ``initialize`` (and in ``tests/test_deepspeed.py``).

One concern per module: ``config`` (the JSON, :class:`PISASpec`), ``engine`` (initialize / register /
build_optimizer), ``layout`` (ZeRO partition layouts: the only file a DeepSpeed upgrade should touch), ``nsisa``
(whole-matrix Newton–Schulz on partitions), ``mpu`` (mode B's :class:`AgentMPU`) and ``checkpoint`` (resharding).
"""

from .checkpoint import convert_checkpoint, load_universal
from .config import PISA_KEYS, PISASpec, is_pisa_config, parse_pisa_params, prepare_config
from .engine import build_optimizer, initialize, optimizer_factory, register, release_cpu_allreduce_buffer, unregister
from .layout import PartitionLayout, PartitionPiece, partition_layouts
from .mpu import AgentMPU

__all__ = [
    "PISA_KEYS",
    "AgentMPU",
    "PISASpec",
    "PartitionLayout",
    "PartitionPiece",
    "build_optimizer",
    "convert_checkpoint",
    "initialize",
    "is_pisa_config",
    "load_universal",
    "optimizer_factory",
    "parse_pisa_params",
    "partition_layouts",
    "prepare_config",
    "register",
    "release_cpu_allreduce_buffer",
    "unregister",
]
