"""Test-only CPU device shim for Megatron-core's CUDA-only code paths (device placement only, never numerics).

Megatron-core's DDP grad buffers, ``DistributedOptimizer``, grad scaler, gradient clipping and ``dist_checkpointing``
allocate on ``'cuda'``, check ``param.type() == 'torch.cuda.FloatTensor'`` and call ``torch.cuda`` stream/synchronize
APIs. On a CPU-only machine they cannot run at all. :func:`install` makes that real Megatron code run on CPU with gloo
by changing *where* tensors live, nothing else:

- factory calls and ``Tensor.to``/``Tensor.cuda`` that ask for a CUDA device get the CPU instead (a
  ``TorchFunctionMode``, so Megatron's own source runs unchanged);
- ``Tensor.type()`` of a CPU float tensor reports the CUDA type name (``torch.FloatTensor`` →
  ``torch.cuda.FloatTensor``), so Megatron's dtype checks accept CPU fp32/bf16/fp16 parameters;
- ``torch.cuda.current_device`` returns ``'cpu'``; ``synchronize``, streams, events and ``torch.cuda.stream`` become
  no-ops (CPU work is already synchronous).

No arithmetic is touched: every kernel is PyTorch's CPU kernel, every collective gloo's. It is used only by
``tests/test_megatron*.py`` inside forked worker processes (``install()`` is process-wide and never undone), and is
never imported by the ``pisa_zero`` package. The unpatched CUDA/NCCL versions of the same tests are marked ``gpu``.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
    "torch.DoubleTensor": "torch.cuda.DoubleTensor",
    "torch.IntTensor": "torch.cuda.IntTensor",
    "torch.LongTensor": "torch.cuda.LongTensor",
}
_installed = False


def _is_cuda(device) -> bool:
    if isinstance(device, int):  # device=torch.cuda.current_device() on a real GPU machine
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            args = tuple("cpu" if _is_cuda(a) and not isinstance(a, int) else a for a in args)
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoEvent()

    def synchronize(self):
        pass


class _NoEvent(_NoStream):
    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self):
        return True


def install() -> None:
    """Route Megatron's CUDA placements to the CPU for the rest of this process (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    _CudaToCpu().__enter__()  # process-wide: the worker process exits without leaving the mode
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoStream
    cuda.Event = _NoEvent
    cuda.current_stream = lambda *a, **k: _NoStream()
    cuda.default_stream = lambda *a, **k: _NoStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
