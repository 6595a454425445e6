"""pisa_zero.routing in bounded rounds: the round plan, bounded == unbounded bit for bit on every host, the budget.

A router sends its matrices in rounds of at most ``max_bytes_in_flight`` of routing buffers per rank (what a rank
sends + receives + assembles), each round's buffers freed before the next. The plan (`plan_rounds`) must hold every
matrix exactly once, keep same-shape matrices together, keep each owner's Newton–Schulz batches whole (so the owner
stacks the very batches of a single round: bit-identical results) and be the same on every rank.
"""

from __future__ import annotations

import os
import sys
import weakref

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from distributed import run_distributed  # noqa: E402

from pisa_zero import functional as F  # noqa: E402
from pisa_zero.routing import ROUTING_BYTES, MatrixRouter, Piece, balance_owners, ns_units, plan_rounds  # noqa: E402

TINY = 64  # bytes: every round is one Newton–Schulz batch


def _layout(world: int, seed: int = 0, count: int = 14) -> tuple[dict, list[list[Piece]]]:
    """``count`` matrices of four shapes, each cut at random offsets over random ranks (some ranks hold nothing of
    a matrix, rank order of pieces shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 4), (4, 6), (9, 3), (5, 5)]
    mats = {f"m{j}": shapes[int(torch.randint(4, (1,), generator=gen))] for j in range(count)}
    pieces: list[list[Piece]] = [[] for _ in range(world)]
    for key, shape in mats.items():
        numel = shape[0] * shape[1]
        cuts = sorted({0, numel, *torch.randint(1, numel, (world,), generator=gen).tolist()})
        for a, b in zip(cuts, cuts[1:]):
            pieces[int(torch.randint(world, (1,), generator=gen))].append(Piece(key, shape, a, b - a))
    for lst in pieces:
        order = torch.randperm(len(lst), generator=gen).tolist()
        lst[:] = [lst[i] for i in order]
    return mats, pieces


def _data(mats: dict, pieces: list[Piece]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    whole = {k: torch.randn(s, generator=gen) for k, s in mats.items()}
    return [whole[pc.key].reshape(-1)[pc.start : pc.start + pc.numel].clone() for pc in pieces]


class _Plan:
    """What every rank knows of a layout, as :class:`MatrixRouter` derives it (no process group needed here)."""

    def __init__(self, layout: list[list[Piece]], budget: int | None):
        index: dict = {}
        for lst in layout:
            for pc in lst:
                index.setdefault(pc.key, (len(index), pc.shape))
        self.world = len(layout)
        self.shapes = tuple(shape for _, shape in index.values())
        self.owner = tuple(balance_owners(self.shapes, self.world))
        self._held = [[0] * self.world for _ in self.shapes]
        for r, lst in enumerate(layout):
            for pc in lst:
                self._held[index[pc.key][0]][r] += pc.numel
        self.budget = budget

    def rounds(self, itemsize: int = 4) -> list[list[int]]:
        budget = None if self.budget is None else self.budget // itemsize
        return plan_rounds(self.shapes, self.owner, self._held, budget)


def _round_loads(router, itemsize: int = 4) -> list[list[int]]:
    """Bytes in flight per round and rank, recomputed here from the layout: pieces sent + received + assembled."""
    loads = []
    for matrices in router.rounds(itemsize):
        load = [0] * router.world
        for j in matrices:
            rows, cols = router.shapes[j]
            for r in range(router.world):
                load[r] += router._held[j][r] * itemsize
            load[router.owner[j]] += 2 * rows * cols * itemsize
        loads.append(load)
    return loads


def _check_plan(router, budget: int | None) -> list[list[int]]:
    rounds = router.rounds(4)
    flat = [j for rnd in rounds for j in rnd]
    assert sorted(flat) == list(range(len(router.shapes)))  # every matrix in exactly one round
    changes = sum(router.shapes[a] != router.shapes[b] for a, b in zip(flat, flat[1:]))
    assert changes == len(set(router.shapes)) - 1  # same-shape matrices sit together
    units = {tuple(u) for u in ns_units(router.shapes, router.owner)}
    for rnd, load in zip(rounds, _round_loads(router)):
        if budget is not None and max(load) > budget:  # over budget only as one Newton–Schulz batch
            assert tuple(rnd) in units, (rnd, load, budget)
    # each owner's batches, over all rounds, are those of the single round (F.orthogonalize_batched's chunks)
    for owner in range(router.world):
        for shape in set(router.shapes):
            mine = [j for j in range(len(router.shapes)) if router.owner[j] == owner and router.shapes[j] == shape]
            per = max(1, F.NS_BATCH_ELEMENTS // (shape[0] * shape[1]))
            single = [mine[i : i + per] for i in range(0, len(mine), per)]
            got = [u for u in ns_units(router.shapes, router.owner) if u[0] in mine]
            assert got == single
            for u in got:
                assert any(set(u) <= set(rnd) for rnd in rounds)
    return rounds


def test_round_plan_covers_each_matrix_once_keeps_shapes_together_and_stays_within_budget(monkeypatch):
    monkeypatch.setattr(F, "NS_BATCH_ELEMENTS", 3 * 24)  # three 6×4 matrices per batch: batches of several
    for world in (1, 2, 4):
        _, layout = _layout(world, seed=world)
        total = max(_round_loads(_Plan(layout, None))[0])  # a rank's bytes in flight in one round
        for budget in (TINY, total // 3, None):
            router = _Plan(layout, budget)
            rounds = _check_plan(router, budget)
            if budget is None:
                assert len(rounds) == 1
            if budget == TINY:
                assert len(rounds) == len(ns_units(router.shapes, router.owner)) > 4
            if budget == total // 3:  # several batches share a round where they fit
                assert len(ns_units(router.shapes, router.owner)) > len(rounds) > 1
    assert ROUTING_BYTES == 256 * 2**20
    assert plan_rounds([], [], [], TINY) == []


def _route_body(rank, world, budgets, batch_elements):
    """Per budget: this rank's pieces of O, the plan, the Newton–Schulz batches run here, and the buffer record."""
    F.NS_BATCH_ELEMENTS = batch_elements  # forked rank: its own module state
    mats, layout = _layout(world, seed=world)
    local = _data(mats, layout[rank])
    batches: list = []
    original = F.orthogonalize
    F.orthogonalize = lambda u, *a: batches.append(tuple(u.shape)) or original(u, *a)
    out = {}
    for budget in budgets:
        batches.clear()
        router = MatrixRouter.from_local_pieces(layout[rank], None, max_bytes_in_flight=budget)
        router.buffer_hook = hook = _Recorder() if world == 1 else _Recorder(("assembled",))
        into = [torch.full_like(t, float("nan")) for t in local]
        got = router.orthogonalize(local, 5, torch.float32, dtype=torch.float32, device=torch.device("cpu"), out=into)
        router.buffer_hook, events = None, hook.events
        again = router.orthogonalize(local, 5, torch.float32)  # without out=: fresh tensors, the same values
        assert all(a is b for a, b in zip(got, into))
        out[budget] = {
            "o": got,
            "again": again,
            "rounds": router.rounds(4),
            "units": ns_units(router.shapes, router.owner),
            "batches": sorted(batches[: len(batches) // 2]),  # the first call's
            "live": hook.live,
            "per_round": _per_round(events),
        }
    F.orthogonalize = original
    return out


class _Recorder:
    """The router's buffer hook: each buffer's round, name and bytes, and — as each buffer is allocated — how many
    buffers of earlier rounds are still alive (weak references only, so the record keeps nothing alive). Over
    gloo only the assembled matrices are watched: a collective's Work object lets go of its tensors a moment after
    the call returns, from gloo's own thread (timing, not a leak)."""

    def __init__(self, watched=("send", "recv", "assembled", "back", "got")):
        self.events: list = []
        self.live = 0
        self.watched = watched

    def __call__(self, r: int, name: str, t: torch.Tensor) -> None:
        self.live += sum(1 for e in self.events if e[0] < r and e[1] in self.watched and e[3]() is not None)
        base = t if t._base is None else t._base
        self.events.append((r, name, t.numel() * t.element_size(), weakref.ref(base)))


def _per_round(events) -> list[tuple[int, int]]:
    """(bytes sent + received + assembled, bytes returned: back + got) of each round on this rank."""
    rounds = sorted({e[0] for e in events})
    first = [sum(b for r, n, b, _ in events if r == i and n in ("send", "recv", "assembled")) for i in rounds]
    second = [sum(b for r, n, b, _ in events if r == i and n in ("back", "got")) for i in rounds]
    return list(zip(first, second))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_bounded_rounds_equal_one_round_bit_for_bit(world, monkeypatch):
    monkeypatch.setattr(F, "NS_BATCH_ELEMENTS", 2 * 24)  # batches of two 6×4: a round must not split one
    budgets = [None, TINY, 700]
    results = run_distributed(_route_body, world, budgets, F.NS_BATCH_ELEMENTS, timeout=180)
    mats, layout = _layout(world, seed=world)
    for rank, res in enumerate(results):
        one = res[None]
        assert len(one["rounds"]) == 1
        assert len(res[TINY]["rounds"]) > 5 and 1 < len(res[700]["rounds"]) < len(res[TINY]["rounds"])
        for budget in budgets:
            assert res[budget]["rounds"] == _Plan(layout, budget).rounds()  # the same plan on every rank
            # the owner stacks the very batches one F.orthogonalize_batched over all its matrices would
            mine = [u for u in one["units"] if _Plan(layout, None).owner[u[0]] == rank]
            assert res[budget]["batches"] == sorted((len(u), *_Plan(layout, None).shapes[u[0]]) for u in mine)
            for a, b, c in zip(res[budget]["o"], one["o"], res[budget]["again"]):
                assert torch.equal(a, b) and torch.equal(a, c)
            assert res[budget]["live"] == 0  # each round's buffers were freed before the next
        units = {tuple(u) for u in one["units"]}
        for budget in (TINY, 700):
            assert len(res[budget]["per_round"]) == len(res[budget]["rounds"])
            for (first, second), rnd in zip(res[budget]["per_round"], res[budget]["rounds"]):
                assert first <= budget or tuple(rnd) in units, (rank, rnd, first)  # over it: one batch alone
                assert second <= first  # the return trip holds no more than the way out
        spent = sum(first for first, _ in one["per_round"])
        assert max(first for first, _ in res[TINY]["per_round"]) < spent / 2  # what the bound buys
    # and the routed O is, bit for bit, what each owner's one F.orthogonalize_batched over all its matrices gives
    gen = torch.Generator().manual_seed(1)
    whole = {k: torch.randn(s, generator=gen) for k, s in mats.items()}
    plan, keys = _Plan(layout, None), list(dict.fromkeys(pc.key for lst in layout for pc in lst))
    want = {}
    for owner in range(world):
        mine = [k for j, k in enumerate(keys) if plan.owner[j] == owner]
        want.update(zip(mine, F.orthogonalize_batched([whole[k] for k in mine], 5, torch.float32)))
    for rank, res in enumerate(results):
        for pc, o in zip(layout[rank], res[TINY]["o"]):
            assert torch.equal(o, want[pc.key].reshape(-1)[pc.start : pc.start + pc.numel]), (rank, pc)


def test_bad_budgets_are_refused_naming_the_option():
    _, layout = _layout(1)
    for bad in (0, -1, 1.5, "1MB", True):
        with pytest.raises(ValueError, match="MatrixRouter: invalid max_bytes_in_flight"):
            MatrixRouter(layout, max_bytes_in_flight=bad)
    from pisa_zero.integrations.fsdp import prepare
    from pisa_zero.orthogonalizer import DTensorOrthogonalizer

    with pytest.raises(ValueError, match="prepare: invalid routing_bytes=0"):
        prepare(torch.nn.Linear(2, 2), routing_bytes=0)
    with pytest.raises(ValueError, match="DTensorOrthogonalizer: invalid max_bytes_in_flight"):
        DTensorOrthogonalizer(-3)


# ------------------------------------------------------------------------- every host: bounded == unbounded
def _ds_body(rank, world, cfg, steps):
    from tests.ds_scripts import common as C

    engine = C.ds_engine(cfg)
    C.ds_train(engine, steps)
    routes = engine.basic_optimizer._orthogonalizer._routes.values()
    return C.consensus_weights(engine), sum(len(router.rounds(4)) for router, _ in routes)


@pytest.mark.slow
def test_deepspeed_zero_2_and_3_bounded_rounds_bit_identical():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from distributed import require, run_scenarios

    require("deepspeed", extra="deepspeed")
    require("transformers", extra="transformers")
    from tests.ds_scripts import common as C

    nsisa = {"sigma": 30.0, "rho": 100.0, "preconditioner": "nsisa", "param_groups": "by_role"}
    nsisa |= {"other_options": {"lr": 3e-3}, "implementation": "foreach"}
    cfgs = {}
    for stage, zero in ((2, {}), (3, {"sub_group_size": 3000})):
        for name, extra in (("default", {}), ("tiny", {"routing_bytes": TINY})):
            cfgs[f"z{stage}_{name}"] = C.ds_config(stage, 2, params={**nsisa, **extra}, zero=zero)
    runs = run_scenarios({k: (lambda r, w, c=c: _ds_body(r, w, c, 3)) for k, c in cfgs.items()}, 2, timeout=400)
    for stage in (2, 3):
        for (w_tiny, rounds_tiny), (w_default, rounds_default) in zip(
            runs[f"z{stage}_tiny"], runs[f"z{stage}_default"]
        ):
            assert rounds_tiny > 2 * rounds_default, (stage, rounds_tiny, rounds_default)  # z3: one per sub-group
            assert w_tiny.keys() == w_default.keys()
            assert all(torch.equal(w_tiny[k], w_default[k]) for k in w_tiny), stage


def _fsdp_body(rank, world, budgets):
    from _consensus_common import agent_pools, loss_fn, make_model, rank_batch

    from pisa_zero.integrations.fsdp import prepare

    out = {}
    for budget in budgets:
        model = make_model()
        matrices = [p for p in model.parameters() if p.ndim == 2]
        rest = [p for p in model.parameters() if p.ndim != 2]
        groups = [
            {"params": matrices, "preconditioner": "nsisa"},
            {"params": rest, "preconditioner": "adamw", "lr": 3e-3},
        ]
        model, opt = prepare(model, groups=groups, routing_bytes=budget, implementation="foreach", sigma=10.0)
        pools = agent_pools(1, False)
        for t in range(3):
            x, y = rank_batch(pools, 0, rank, world, t, 16)
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        rounds = sum(len(router.rounds(4)) for router in opt._orthogonalizer._routers.values())
        out[budget] = ({n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}, rounds)
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_bounded_rounds_bit_identical(world):
    pytest.importorskip("sklearn")  # the digits data of the FSDP2 tests
    for res in run_distributed(_fsdp_body, world, [None, TINY], timeout=240):
        (w_default, rounds_default), (w_tiny, rounds_tiny) = res[None], res[TINY]
        assert rounds_default == 1 and rounds_tiny > 1
        assert all(torch.equal(w_tiny[k], w_default[k]) for k in w_default)


def _megatron_body(rank, world):
    import megatron_shim

    megatron_shim.install()
    from megatron.core import parallel_state as ps
    from test_megatron import NSISA_OPTIONS, _megatron_pisa, _megatron_step, _quiet, _weights

    _quiet()
    ps.initialize_model_parallel()
    out = {}
    for budget in (None, TINY):
        pisa = NSISA_OPTIONS | ({} if budget is None else {"routing_bytes": budget})
        ddp, optimizer = _megatron_pisa(seed=0, pisa=pisa, vocab=4096, clip_grad=0.0)
        for step in range(3):
            assert _megatron_step(ddp, optimizer, step, rank, world)[0]
        router = optimizer.chained_optimizers[0].nsisa_orthogonalizer.router
        out[budget] = (_weights(ddp.module), len(router.rounds(4)))
    return out


def test_megatron_bounded_rounds_bit_identical():
    from distributed import require

    require("megatron.core", extra="megatron")
    for res in run_distributed(_megatron_body, 2, timeout=300):
        (w_default, rounds_default), (w_tiny, rounds_tiny) = res[None], res[TINY]
        assert rounds_tiny > rounds_default == 1
        assert all(torch.equal(w_tiny[k], w_default[k]) for k in w_default)


# ----------------------------------------------------------------------------------- the option, refused
def test_routing_bytes_values_refused_naming_the_key():
    from engine.flags import parse_args
    from pisa_zero.integrations.deepspeed.config import PISASpec, parse_pisa_params, prepare_config

    nsisa = {"preconditioner": "nsisa"}
    for bad in (0, -1, 1.5, "256MiB", True, [1]):
        with pytest.raises(ValueError, match=r"optimizer\.params\.routing_bytes=.*expected an integer"):
            parse_pisa_params({**nsisa, "routing_bytes": bad})
    assert parse_pisa_params({**nsisa, "routing_bytes": 4096}).routing_bytes == 4096
    assert parse_pisa_params(nsisa).routing_bytes is None
    with pytest.raises(ValueError, match=r"optimizer\.params\.routing_bytes=4096 is read by no param group"):
        parse_pisa_params({"preconditioner": "sisa", "routing_bytes": 4096})
    spec = PISASpec({"preconditioner": "nsisa"}, False, None, "adamw", {}, 1, 4096)
    with pytest.raises(ValueError, match=r"optimizer\.params\.routing_bytes is read at zero_optimization\.stage 1"):
        prepare_config({"zero_optimization": {"stage": 0}}, spec)
    for argv in (["--backend", "fsdp2", "--routing-bytes", "0"], ["--backend", "single", "--routing-bytes", "9"]):
        with pytest.raises(SystemExit):
            parse_args(argv)
    with pytest.raises(SystemExit):
        parse_args(["--backend", "fsdp2", "--routing-bytes", "9", "--matrix-preconditioner", "sisa"])
    assert parse_args(["--backend", "fsdp2", "--routing-bytes", "4096"]).routing_bytes == 4096
