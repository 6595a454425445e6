"""Private helpers shared by the package (and the engine): DTensor local shards, whether torch.distributed is on,
where a collective's buffer must live, a scalar all-reduce, peak memory, whether torch.compile can run."""

from __future__ import annotations

import resource
import shutil

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor (FSDP2): the math runs on local shards
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = ()  # type: ignore[assignment]


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def comm_device(device: torch.device, group=None) -> torch.device:
    """Where a collective's buffer must live: NCCL groups need a CUDA tensor even when the data sits on the CPU
    (offloaded state); gloo takes the data's own device."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduce_sum(values: list[float] | Tensor, group=None, device=None) -> Tensor:
    """One all-reduce (sum) of a vector of fp64 scalars; identity when not distributed."""
    vec = values if isinstance(values, Tensor) else torch.tensor(values, dtype=torch.float64)
    if dist_on():
        vec = vec.to(comm_device(device or vec.device, group))
        dist.all_reduce(vec, group=group)
    return vec.cpu()


def peak_memory_mb() -> float:
    """Peak memory of this process: CUDA allocator peak when on a GPU, else the peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


_COMPILED: dict[str, bool] = {}


def compiled_available(device: torch.device) -> bool:
    """torch.compile needs a C++ compiler on CPU and Triton on CUDA; otherwise foreach is the fastest."""
    if device.type not in _COMPILED:
        if device.type == "cpu":
            ok = shutil.which("g++") is not None or shutil.which("c++") is not None
        elif device.type == "cuda":
            try:
                import triton  # noqa: F401

                ok = True
            except ImportError:
                ok = False
        else:
            ok = False
        _COMPILED[device.type] = ok
    return _COMPILED[device.type]
