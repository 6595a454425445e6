"""pisa_zero.monitor: diagnostics match closed forms, are the same on shards as on whole tensors, and reach
TensorBoard event files."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from distributed import run_distributed  # noqa: E402

from pisa_zero import PISA  # noqa: E402
from pisa_zero.monitor import Diagnostics, TensorBoard, find_pisa, global_norm  # noqa: E402


def _one_step(w0: torch.Tensor, g: torch.Tensor, sigma: float, rho: float, steps: int = 1):
    w = torch.nn.Parameter(w0.clone())
    opt = PISA([w], sigma=sigma, rho=rho, preconditioner="identity")
    mon = Diagnostics(opt)
    out = None
    for _ in range(steps):
        w.grad = g.clone()
        mon.snapshot()
        opt.step()
        out = mon.measure()
    return w, opt, out


def test_first_step_closed_form():
    # identity preconditioner from zero state: d = g/(σ+ρ), π = −σd, Δw = (π − σd)/σ = −2d.
    torch.manual_seed(0)
    w0, g = torch.randn(37), torch.randn(37)
    sigma, rho = 3.0, 5.0
    _, _, out = _one_step(w0, g, sigma, rho)
    d = g / (sigma + rho)
    assert out["pisa/identity/primal_residual"] == pytest.approx(d.norm().item(), rel=1e-5)
    assert out["pisa/identity/dual_residual"] == pytest.approx(sigma * 2 * d.norm().item(), rel=1e-5)
    assert out["pisa/identity/dual_norm"] == pytest.approx(sigma * d.norm().item(), rel=1e-5)
    assert out["pisa/identity/dual_rms"] == pytest.approx(sigma * d.norm().item() / math.sqrt(37), rel=1e-5)
    assert out["pisa/identity/update_rms"] == pytest.approx(2 * d.norm().item() / math.sqrt(37), rel=1e-5)
    assert out["pisa/identity/sigma"] == sigma and out["pisa/identity/rho"] == rho
    assert "pisa/identity/consensus_disagreement" not in out  # mode A


def test_measure_without_snapshot_reports_norms_only():
    w = torch.nn.Parameter(torch.ones(4))
    opt = PISA([w], sigma=1.0, rho=1.0, preconditioner="sisa")
    w.grad = torch.ones(4)
    opt.step()
    out = Diagnostics(opt).measure()
    assert "pisa/sisa/dual_norm" in out and "pisa/sisa/primal_residual" not in out


def test_find_pisa_through_wrappers_and_refuses_others():
    opt = PISA([torch.nn.Parameter(torch.ones(2))])

    class Wrapper:
        optimizer = opt

    assert find_pisa(Wrapper()) is opt
    with pytest.raises(ValueError, match="no pisa_zero.PISA"):
        find_pisa(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))


def _sharded_body(rank, world, w0, g, sigma, rho):
    # each rank holds one contiguous slice (a DeepSpeed-style flat partition) of the same tensor
    n = w0.numel()
    lo, hi = rank * n // world, (rank + 1) * n // world
    _, opt, out = _one_step(w0[lo:hi], g[lo:hi], sigma, rho, steps=3)
    p = opt.param_groups[0]["params"][0]
    p.grad = g[lo:hi].clone()
    return out, global_norm([p.grad])


@pytest.mark.slow
def test_partitions_all_reduce_to_the_whole_tensor_numbers():
    torch.manual_seed(1)
    w0, g = torch.randn(101), torch.randn(101)
    _, _, whole = _one_step(w0, g, 2.0, 7.0, steps=3)
    results = run_distributed(_sharded_body, 2, w0, g, 2.0, 7.0, timeout=120)
    for out, gnorm in results:
        assert gnorm == pytest.approx(g.norm().item(), rel=1e-6)
        assert out.keys() == whole.keys()
        for k in whole:
            assert out[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-9), k


def _mode_b_body(rank, world, w0, grads, sigma, rho):
    # every rank its own agent (consensus over the world), whole tensors
    w = torch.nn.Parameter(w0.clone())
    opt = PISA([w], sigma=sigma, rho=rho, preconditioner="identity", consensus=torch.distributed.group.WORLD)
    mon = Diagnostics(opt)
    w.grad = grads[rank].clone()
    mon.snapshot()
    opt.step()
    return mon.measure()


@pytest.mark.slow
def test_mode_b_consensus_disagreement_and_residuals_closed_form():
    """Two agents, first step from zero state, identity preconditioner: d_i = g_i/(σ+ρ) on agent i, so
    consensus_disagreement = √(Σ_i ‖d_i − d̄‖² / m) = ‖d_0 − d_1‖ / 2 and primal_residual = √(Σ_i ‖d_i‖² / m),
    the same on both ranks."""
    torch.manual_seed(2)
    w0, grads = torch.randn(29), torch.randn(2, 29)
    sigma, rho = 3.0, 5.0
    results = run_distributed(_mode_b_body, 2, w0, grads, sigma, rho, timeout=120)
    d = grads / (sigma + rho)
    disagreement = ((d[0] - d[1]).norm() / 2).item()
    primal = math.sqrt((d[0].norm() ** 2 + d[1].norm() ** 2).item() / 2)
    for out in results:
        assert out["pisa/identity/consensus_disagreement"] == pytest.approx(disagreement, rel=1e-5)
        assert out["pisa/identity/primal_residual"] == pytest.approx(primal, rel=1e-5)


def test_tensorboard_writes_grouped_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoard(str(tmp_path), enabled=True)
    tb.scalars({"pisa/nsisa/primal_residual": 0.5, "train/loss": 3.0, "perf/x": float("nan")}, step=7)
    tb.close()
    ea = EventAccumulator(str(tmp_path))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert tags == {"pisa/nsisa/primal_residual", "train/loss"}  # non-finite values are not written
    assert ea.Scalars("train/loss")[0].step == 7
    assert TensorBoard(str(tmp_path / "off"), enabled=False).writer is None
    assert not (tmp_path / "off").exists()
