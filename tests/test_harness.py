"""The test harness itself (tests/distributed.py): what every multi-rank test relies on."""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from distributed import run_distributed  # noqa: E402


def _compile_something_new(rank, world_size, c):
    # a constant of this run's own, so inductor's on-disk caches cannot serve it: the forked rank really compiles
    fn = torch.compile(lambda x: torch.sin(x) * c + rank, fullgraph=True)
    return fn(torch.ones(7)).sum().item()


def test_a_forked_rank_compiles_a_new_kernel_after_the_parent_compiled():
    # The parent compiles first, which starts inductor's compile thread pool; a forked child inherits that pool
    # without its threads. Without the harness's in-thread compile setting the ranks below wait forever (seen as a
    # 300 s hang in a Megatron test once new kernel cases appeared).
    c = 1.0 + (time.time_ns() % 10**6) / 10**6
    torch.compile(lambda x: torch.cos(x) - c, fullgraph=True)(torch.ones(5))
    results = run_distributed(_compile_something_new, 2, c, timeout=240)
    assert results == [torch.sin(torch.ones(7)).mul(c).add(r).sum().item() for r in range(2)]
