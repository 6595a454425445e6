"""pisa_zero.routing: whole-matrix Newton–Schulz from pieces held by different ranks == NS of the whole matrix.

The pieces here cut matrices at arbitrary offsets (not row blocks), a matrix may lie on one rank only, and one rank
holds no piece at all: the layouts of FSDP2 (row blocks), DeepSpeed ZeRO (flat runs) and Megatron (main-param shards)
are all special cases. FSDP2 and DeepSpeed run it end to end in tests/test_fsdp.py and tests/test_deepspeed.py.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from distributed import run_distributed  # noqa: E402

from pisa_zero import PISA  # noqa: E402
from pisa_zero import functional as F  # noqa: E402
from pisa_zero.orthogonalizer import LocalOrthogonalizer  # noqa: E402
from pisa_zero.routing import MatrixRouter, Piece, balance_owners  # noqa: E402

SHAPES = {"a": (10, 7), "b": (7, 10), "c": (10, 7), "d": (3, 5), "e": (1, 4)}
# name -> [(rank, start, numel)]: cuts inside rows, a matrix on one rank ("d"), rank 2 holds nothing
SPLITS = {
    "a": [(0, 0, 13), (1, 13, 40), (0, 53, 17)],
    "b": [(1, 0, 70)],
    "c": [(1, 0, 1), (0, 1, 69)],
    "d": [(0, 0, 15)],
    "e": [(1, 0, 2), (0, 2, 2)],
}


def _whole() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


def _layout(world: int) -> list[list[Piece]]:
    pieces: list[list[Piece]] = [[] for _ in range(world)]
    for name, runs in SPLITS.items():
        for rank, start, numel in runs:
            pieces[rank].append(Piece(name, SHAPES[name], start, numel))
    for lst in pieces:
        lst.reverse()  # a rank's own order need not follow the matrices'
    return pieces


def _route(rank: int, world: int):
    whole = _whole()
    layout = _layout(world)
    mine = layout[rank]
    local = [whole[pc.key].reshape(-1)[pc.start : pc.start + pc.numel].clone() for pc in mine]
    router = MatrixRouter(layout, None)
    got = router.orthogonalize(local, 5, torch.float32, dtype=torch.float32, device=torch.device("cpu"))
    shared = MatrixRouter.from_local_pieces(mine, None)  # each rank knows only its own pieces
    again = shared.orthogonalize(local, 5, torch.float32, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="layout says"):
        router.orthogonalize(local + [torch.zeros(3)], 5, torch.float32)
    return [(pc.key, pc.start, o) for pc, o in zip(mine, got)], router.owner, shared.owner, again


def test_router_matches_whole_matrix_newton_schulz_on_three_ranks():
    results = run_distributed(_route, 3, timeout=120)
    want = {k: F.orthogonalize(t, 5).reshape(-1) for k, t in _whole().items()}
    covered = {k: 0 for k in SHAPES}
    for got, owner, shared_owner, again in results:
        assert owner == results[0][1] == shared_owner  # every rank computes the same owners
        for (key, start, o), o2 in zip(got, again):
            torch.testing.assert_close(o, want[key][start : start + o.numel()], atol=1e-6, rtol=0)
            assert torch.equal(o, o2)
            covered[key] += o.numel()
    assert covered == {k: s[0] * s[1] for k, s in SHAPES.items()}
    assert results[2][0] == []  # the rank without pieces took part and got nothing back
    assert sorted(set(results[0][1])) == [0, 1, 2]  # five matrices spread over all three ranks


def test_balance_owners_largest_first_to_least_loaded():
    # costs rows·cols·min: 1000, 8, 1000, 27, 64 -> the two big ones apart, then 64 -> rank 0, 27 and 8 -> rank 1
    assert balance_owners([(10, 10), (2, 2), (10, 10), (3, 3), (4, 4)], 2) == [0, 1, 1, 1, 0]
    assert balance_owners([(5, 5), (5, 5), (5, 5)], 3) == [0, 1, 2]
    assert balance_owners([(5, 5)], 1) == [0]


def test_router_one_rank_needs_no_process_group():
    whole = _whole()
    pieces = [Piece(k, s, 0, s[0] * s[1]) for k, s in SHAPES.items()]
    got = MatrixRouter([pieces]).orthogonalize([whole[k] for k in SHAPES], 5, torch.float32)
    for k, o in zip(SHAPES, got):
        assert o.shape == whole[k].shape
        torch.testing.assert_close(o, F.orthogonalize(whole[k], 5), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="only matrices"):
        MatrixRouter([[Piece("bias", (4,), 0, 4)]])


def test_pisa_chooses_the_orthogonalizer_at_construction():
    w = torch.nn.Parameter(torch.randn(6, 4))
    assert isinstance(PISA([w], preconditioner="nsisa")._orthogonalizer, LocalOrthogonalizer)
    calls = []

    def spy(params, directions, ns_steps, compute_dtype):  # a host's strategy: PISA's params, u, ns_steps, dtype
        calls.append((params, ns_steps, compute_dtype))
        return F.orthogonalize_batched(directions, ns_steps, compute_dtype)

    w2 = torch.nn.Parameter(w.detach().clone())
    default, custom = PISA([w], preconditioner="nsisa"), PISA([w2], preconditioner="nsisa", orthogonalizer=spy)
    for p, opt in ((w, default), (w2, custom)):
        p.grad = torch.ones_like(p)
        opt.step()
    assert calls == [([w2], 5, F.ns_compute_dtype(w.device))] and torch.equal(w, w2)


def test_newton_schulz_batches_are_bounded_and_change_nothing(monkeypatch):
    # same-shape matrices are stacked at most NS_BATCH_ELEMENTS at a time (the iteration's temporaries are a few
    # copies of the batch: unbounded, they were ~20 bytes/param per rank on a ZeRO-3 run); the result is per matrix
    gen = torch.Generator().manual_seed(0)
    us = [torch.randn(s, generator=gen) for s in [(6, 4)] * 5 + [(4, 6)] * 3 + [(7,)]]
    whole = F.orthogonalize_batched(us, 5, torch.float32)
    sizes = []
    original = F.orthogonalize
    monkeypatch.setattr(F, "orthogonalize", lambda u, *a: sizes.append(u.shape[0]) or original(u, *a))
    monkeypatch.setattr(F, "NS_BATCH_ELEMENTS", 2 * 24)  # two 6×4 matrices per batch
    chunked = F.orthogonalize_batched(us, 5, torch.float32)
    assert sizes == [2, 2, 1, 2, 1]
    assert chunked[-1] is us[-1]
    for a, b in zip(whole[:-1], chunked[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
