import random

import numpy as np
import pytest
import torch
from distributed import one_thread


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
