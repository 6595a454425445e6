import os
import random
import time

import numpy as np
import pytest
import torch
from distributed import one_thread

from pisa_zero import functional as F

# "auto" Newton–Schulz runs in bf16 on CPUs with AVX512-BF16/AMX and in fp32 elsewhere; the suite's fp32 references
# must give the same verdict on both, so every test process (and the ranks they launch, which inherit the
# environment) takes the fp32 side. bf16 Newton–Schulz is tested by name (ns_dtype="bfloat16", test_ns_precision.py).
os.environ[F.CPU_BF16_ENV] = "0"

STALE_LOCK_S = 1800  # a DeepSpeed CPU op builds in 1-3 minutes here; a lock this old belongs to a killed build


def pytest_sessionstart(session):
    """Refuse to start where torch's JIT-extension folder holds a stale ``lock``: a build killed mid-way (a stopped
    test run) leaves one, and every later build of that op waits on it forever (torch.utils.file_baton), so each
    DeepSpeed multi-rank test would hang to its timeout. (.ci/run builds into a fresh TORCH_EXTENSIONS_DIR.)"""
    from torch.utils.cpp_extension import get_default_build_root

    # torch's loader honours TORCH_EXTENSIONS_DIR (cpp_extension._get_build_directory); get_default_build_root does not
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    stale = []
    for folder, _, files in os.walk(root):
        if "lock" in files and time.time() - os.path.getmtime(os.path.join(folder, "lock")) > STALE_LOCK_S:
            stale.append(os.path.join(folder, "lock"))
    if stale:
        raise pytest.UsageError(
            f"stale torch extension build lock(s), older than {STALE_LOCK_S} s: {', '.join(stale)}. A build killed "
            "mid-way leaves one and every later build of that op waits on it forever. Remove them (rm) and rerun."
        )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: they run where it exists and are skipped (with the reason) elsewhere."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Every test starts from the same random state (torch, numpy, random), before its fixtures: a test that draws
    without a seed of its own — or a module-scoped fixture that it sets up, or ranks forked from it — sees the same
    numbers whichever tests ran before it, alone or in the whole suite."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def one_torch_thread():
    """``torch.set_num_threads(1)`` for the test (the launched runs' OMP_NUM_THREADS=1: same reduction order),
    and the previous count put back afterwards, whatever the test does."""
    with one_thread():
        yield
