"""A convergence check that can fail: a small MLP on scikit-learn's bundled digits."""

import pytest
import torch
from sklearn.datasets import load_digits

from pisa_zero import PISA

BAR = 0.93  # test accuracy after STEPS full-batch steps
STEPS = 150


def digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def train(make_optimizer, steps=STEPS):
    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = digits()
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = make_optimizer(model)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    with torch.no_grad():
        return (model(xte).argmax(1) == yte).float().mean().item()


@pytest.mark.parametrize(
    "preconditioner, hp",
    [("sisa", dict(sigma=0.1, rho=200.0)), ("adagrad", dict(sigma=0.1, rho=50.0)), ("nsisa", dict(sigma=10, rho=30))],
)
def test_pisa_learns_digits(preconditioner, hp):
    accuracy = train(lambda m: PISA(m.parameters(), preconditioner=preconditioner, **hp))
    assert accuracy >= BAR, accuracy


def test_bar_is_not_trivial():
    # The bar is reachable by a tuned AdamW in the same budget, and far above what an untrained model or a
    # too-small step gets: a broken optimizer cannot pass by accident.
    assert train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)) >= BAR
    assert train(lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)) < 0.5
    assert train(lambda m: PISA(m.parameters(), sigma=0.1, rho=200.0), steps=0) < 0.3
