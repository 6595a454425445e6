"""Newton–Schulz in bf16 (fp32 edges) against fp32, and the ``ns_dtype`` option that picks it.

Bounds, from bf16's unit roundoff u = 2^-8 ≈ 3.9e-3: the input is rounded once and each of the five iterations
rounds three products, so the part of O that NS5 determines (the directions of u's large singular values) may differ
by about 16u ≈ 0.06 relative (measured: 0.02–0.05). Directions of
singular values far below the largest are not determined in bf16: NS5 multiplies a small singular value by up to
a⁵ ≈ 487 over five steps, so bf16's rounding noise (≈ u·‖u‖, in every direction) becomes O(1) components of O there
(measured: 0.2 relative on a 1e-6-conditioned matrix, 0.8 on a rank-4 one). That is Muon's trade-off; ``ns_dtype=
"float32"`` removes it.
"""

from __future__ import annotations

import pytest
import torch

import pisa_zero.functional as F
from pisa_zero import PISA

U = 2.0**-8


def both(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return F.orthogonalize(m, 5, torch.float32), F.orthogonalize(m, 5, torch.bfloat16)


@pytest.mark.parametrize("shape", [(64, 32), (256, 256), (32, 512)])
def test_bf16_newton_schulz_follows_fp32_on_random_matrices(shape):
    torch.manual_seed(0)
    a, b = both(torch.randn(shape))
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert ((a - b).norm() / a.norm()).item() <= 16 * U


def test_bf16_newton_schulz_follows_fp32_on_the_large_singular_directions():
    torch.manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(128, 128))
    right, _ = torch.linalg.qr(torch.randn(64, 64))
    s = torch.logspace(0, -6, 64)  # condition number 1e6
    a, b = both((left[:, :64] * s) @ right.T)
    top = left[:, : int((s >= 1e-2).sum())]  # where five NS5 steps have reached their band
    project = top @ top.T
    assert ((project @ (a - b)).norm() / (project @ a).norm()).item() <= 16 * U

    factor = torch.randn(128, 4)
    a, b = both(factor @ torch.randn(4, 96))  # rank 4
    q, _ = torch.linalg.qr(factor)
    project = q @ q.T
    assert torch.isfinite(b).all()
    assert ((project @ (a - b)).norm() / (project @ a).norm()).item() <= 16 * U


def test_bf16_newton_schulz_keeps_zero_and_tiny_matrices_finite():
    zero = torch.zeros(32, 16)
    assert torch.equal(F.orthogonalize(zero, 5, torch.bfloat16), zero)
    tiny = torch.randn(32, 16) * 1e-30  # normalised in fp32 with the 1e-7 guard: stays tiny, never inf/NaN
    out = F.orthogonalize(tiny, 5, torch.bfloat16)
    assert torch.isfinite(out).all() and out.abs().max().item() < 1e-15


def test_fp32_newton_schulz_is_unchanged_by_the_bf16_edges():
    """ns_dtype="float32" runs the iteration as before: the same operations in the same order."""
    torch.manual_seed(0)
    m = torch.randn(48, 24)
    a, b, c = F.NS_COEFFICIENTS
    x = m.mT / (m.mT.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(5):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    assert torch.equal(F.newton_schulz(m, 5, torch.float32), x.mT)


def test_auto_picks_bf16_where_bf16_matmuls_are_fast(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for fast, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(F, "_cpu_has_fast_bf16", lambda fast=fast: fast)
        assert F.ns_compute_dtype(cpu) == expected
    assert F.ns_compute_dtype(cuda) == torch.bfloat16
    assert F.ns_compute_dtype(cuda, torch.float32, "float32") == torch.float32
    assert F.ns_compute_dtype(cpu, torch.float32, "bfloat16") == torch.bfloat16
    assert F.ns_compute_dtype(cuda, torch.float64, "bfloat16") == torch.float64  # fp64 tensors stay fp64


def test_the_cpu_detection_can_be_overridden_by_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    try:
        for value, expected in (("1", torch.bfloat16), ("0", torch.float32)):
            monkeypatch.setenv(F.CPU_BF16_ENV, value)
            F._cpu_has_fast_bf16.cache_clear()
            assert F.ns_compute_dtype(cpu) == expected
        monkeypatch.setenv(F.CPU_BF16_ENV, "yes")
        F._cpu_has_fast_bf16.cache_clear()
        with pytest.raises(ValueError, match=r"PISA_ZERO_CPU_FAST_BF16='yes': expected 0 or 1"):
            PISA([torch.nn.Parameter(torch.zeros(4, 4))], sigma=1.0, rho=1.0, preconditioner="nsisa")
    finally:
        F._cpu_has_fast_bf16.cache_clear()  # the next test reads the suite's own setting (conftest.py) again


def test_ns_dtype_reaches_the_newton_schulz_of_a_step():
    torch.manual_seed(0)
    start, grad = torch.randn(24, 16), torch.randn(24, 16)
    results = {}
    for ns_dtype in ("float32", "bfloat16"):
        w = torch.nn.Parameter(start.clone())
        opt = PISA([w], sigma=1.0, rho=10.0, preconditioner="nsisa", ns_dtype=ns_dtype, implementation="single")
        w.grad = grad.clone()
        opt.step()
        results[ns_dtype] = w.detach()
    seen = []

    def spy(params, directions, ns_steps, compute_dtype):
        seen.append(compute_dtype)
        return F.orthogonalize_batched(directions, ns_steps, compute_dtype)

    for ns_dtype, expected in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        w = torch.nn.Parameter(start.clone())
        opt = PISA([w], sigma=1.0, rho=10.0, preconditioner="nsisa", ns_dtype=ns_dtype, orthogonalizer=spy)
        w.grad = grad.clone()
        opt.step()
        assert seen[-1] == expected
    assert not torch.equal(results["float32"], results["bfloat16"])
    with pytest.raises(ValueError, match=r"invalid ns_dtype='fp8'"):
        PISA([torch.nn.Parameter(start.clone())], preconditioner="nsisa", ns_dtype="fp8")


def test_ns_dtype_in_the_deepspeed_json():
    from torch import nn

    from pisa_zero.deepspeed import build_optimizer

    config = {"optimizer": {"type": "PISA", "params": {"param_groups": "by_role", "ns_dtype": "float32"}}}
    optimizer, _ = build_optimizer(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), config)
    assert optimizer.param_groups[0]["ns_dtype"] == "float32"
    config["optimizer"]["params"] = {"preconditioner": "sisa", "ns_dtype": "float32"}
    with pytest.raises(ValueError, match=r"optimizer\.params\.ns_dtype='float32' is read by no param group"):
        build_optimizer(nn.Linear(4, 4), config)
