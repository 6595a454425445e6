"""What a step costs besides arithmetic, counted on CPU: host syncs, compiled calls, finite checks, collectives.

A GPU step is fast only if the host never waits for the device and launches few graphs; these counts are the part of
that contract a CPU can check (the GPU timings are in docs/benchmarks/step_time_cuda.md).
"""

import contextlib
import os
import sys

import pytest
import torch

from pisa_zero import PISA
from pisa_zero import functional as F
from pisa_zero.reference import ReferencePISA

sys.path.insert(0, os.path.dirname(__file__))
from distributed import run_distributed  # noqa: E402

SHAPES = [(12, 7), (7, 12), (9,), (3, 4, 2)]
HP = dict(sigma=2.0, rho=10.0, l2_lambda=0.05, weight_decay=0.01)


def make_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def set_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.5 + 0.1


@contextlib.contextmanager
def count_host_reads(monkeypatch):
    """Every way Python code reads a tensor's value on the host (a device sync on a GPU) is counted."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    yield counts
    monkeypatch.undo()


@contextlib.contextmanager
def count_compiled_calls(monkeypatch):
    counts = {"kernel": 0, "list": 0}
    for key, factory in (("kernel", "_compiled_kernel"), ("list", "_compiled_list")):
        compiled = getattr(F, factory)()

        def counted(*args, _compiled=compiled, _key=key):
            counts[_key] += 1
            return _compiled(*args)

        monkeypatch.setattr(F, factory, lambda _counted=counted: _counted)
    yield counts


@pytest.mark.parametrize("skip_nonfinite, syncs", [(True, 1), (False, 0)])
def test_default_step_reads_the_host_once_for_the_skip_decision_only(monkeypatch, skip_nonfinite, syncs):
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:], "preconditioner": "adamw", "lr": 1e-3}]
    opt = PISA(groups, skip_nonfinite=skip_nonfinite, **HP)
    set_grads(params, 1)
    opt.step()  # compiles
    set_grads(params, 2)
    with count_host_reads(monkeypatch) as counts:
        opt.step()
    assert counts["n"] == syncs


def test_cpu_compiled_step_is_one_graph_call_per_tensor(monkeypatch):
    params = make_params()
    opt = PISA(params, **HP)
    set_grads(params, 1)
    opt.step()
    with count_compiled_calls(monkeypatch) as counts:
        opt.step()
    assert counts == {"kernel": len(SHAPES), "list": 0}


def test_gpu_style_step_is_one_graph_call_per_group_and_no_host_sync(monkeypatch):
    """The GPU layout (one graph over the whole list, step counters read in the kernel), forced on CPU."""
    monkeypatch.setattr(F, "_one_graph_per_list", lambda device: True)
    params = make_params()
    ref = ReferencePISA(params, **HP)
    opt = PISA(params, skip_nonfinite=False, **HP)
    for t in range(6):
        set_grads(params, t)
        grads = [p.grad.clone() for p in params]
        ref.step([lambda w, grads=grads: grads])
        if t < 5:
            opt.step()
            continue
        with count_compiled_calls(monkeypatch) as calls, count_host_reads(monkeypatch) as syncs:
            opt.step()
    assert calls == {"kernel": 0, "list": 1} and syncs["n"] == 0
    for p, r in zip(params, ref.w):
        assert ((p.detach().double() - r).norm() / r.norm()).item() <= 1e-6
    assert all(int(opt.state[p]["step"]) == 6 for p in params)


def test_a_flat_partition_is_one_compiled_call_and_a_schedule_never_recompiles(monkeypatch):
    """DeepSpeed ZeRO and Megatron's distributed optimizer hand PISA one flat 1-D fp32 partition per group: one
    compiled call. lr, σ, ρ and λ changing every step (a schedule) reach the graph as a tensor of scalars, so the
    graph compiled at the first step serves every later one (counted in dynamo's unique_graphs)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    F._compiled_kernel.cache_clear()
    partition = torch.nn.Parameter(torch.randn(10_007))
    opt = PISA([partition], implementation="compiled", **HP)
    set_grads([partition], 0)
    opt.step()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1  # the first step compiled (the counter counts what it should)
    for t in range(1, 6):
        group = opt.param_groups[0]
        group["lr"] = group["lr_ref"] * (1.0 - t / 10)
        group["sigma"], group["rho"], group["l2_lambda"] = HP["sigma"] * (1 + t), HP["rho"] / t, 0.05 + 0.01 * t
        set_grads([partition], t)
        with count_compiled_calls(monkeypatch) as calls:
            opt.step()
        monkeypatch.undo()
        assert calls == {"kernel": 1, "list": 0}
    assert counters["stats"]["unique_graphs"] == compiled, "a changing lr/sigma/rho/l2_lambda recompiled the kernel"


@pytest.mark.parametrize(
    "implementation, theirs",
    [("single", dict(foreach=False)), ("foreach", dict(foreach=True)), ("compiled", dict(fused=True))],
)
def test_auxiliary_adamw_is_torch_adamw_bit_for_bit(implementation, theirs):
    params = make_params()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = PISA(params, preconditioner="adamw", implementation=implementation, **hp)
    reference = torch.optim.AdamW(twins, **theirs, **hp)
    for t in range(20):
        set_grads(params, t)
        for p, q in zip(params, twins):
            q.grad = p.grad.clone()
        ours.step()
        reference.step()
    for p, q in zip(params, twins):
        assert torch.equal(p.detach(), q.detach())
    state = ours.state[params[0]]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and int(state["step"]) == 20


def test_one_finite_check_per_step(monkeypatch):
    """`PISA.step` reads the gradients for inf/NaN once; a NaN anywhere skips the whole step."""
    calls = {"n": 0}
    finite_flag = F.finite_flag

    def counted(tensors):
        calls["n"] += 1
        return finite_flag(tensors)

    monkeypatch.setattr(F, "finite_flag", counted)
    params = make_params()
    opt = PISA([{"params": params[:2]}, {"params": params[2:], "preconditioner": "adamw", "lr": 1e-3}], **HP)
    set_grads(params, 1)
    opt.step()
    assert calls["n"] == 1
    params[3].grad[0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in params]
    opt.step()
    assert calls["n"] == 2 and opt.nonfinite_steps_skipped == 1
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))


def _control_collectives(rank, world):
    """Mode B and FSDP2-style mode A topologies: one control all-reduce per step, and every rank skips together."""
    import torch.distributed as dist

    from pisa_zero.consensus import AgentTopology

    counts = []
    original = dist.all_reduce

    def counted(tensor, *args, **kwargs):
        counts[-1] += 1
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    out = {}
    for agents in (world, 1):
        params = make_params()
        opt = PISA(params, consensus=AgentTopology.build(agents=agents), implementation="foreach", **HP)
        per_step, totals = [], []
        for t in range(4):
            set_grads(params, t)
            if t == 1 and rank == 1:
                params[0].grad[0, 0] = float("nan")
            counts.append(0)
            opt.step(extra=[rank + 1.0, t], veto=t == 3 and rank == 0)  # a loop's loss/stop flags ride along
            per_step.append(counts[-1])
            totals.append(opt.extra_totals)
        out[agents] = (per_step, opt.nonfinite_steps_skipped, int(opt.state[params[0]]["step"]), totals)
    dist.all_reduce = original
    return out


def test_one_control_all_reduce_per_step_and_agreed_skip():
    totals = [[3.0, 2.0 * t] for t in range(4)]
    for result in run_distributed(_control_collectives, 2, timeout=120):
        # NaN on rank 1 at step 1 and a veto from rank 0 at step 3: both ranks skip both steps
        assert result[2] == ([1, 1, 1, 1], 2, 2, totals)  # mode B (2 agents): no reduce-scatter is an all-reduce
        assert result[1] == ([1, 1, 1, 1], 2, 2, totals)  # one agent over both ranks (FSDP2's mode A)


def test_extra_and_veto_without_a_topology():
    params = make_params()
    opt = PISA(params, **HP)
    set_grads(params, 0)
    opt.step(extra=[2.5, 1.0])
    assert opt.extra_totals == [2.5, 1.0] and int(opt.state[params[0]]["step"]) == 1
    opt.step(veto=True)
    assert opt.nonfinite_steps_skipped == 1 and int(opt.state[params[0]]["step"]) == 1


# ------------------------------------------------------------------------------------------------ engine/train.py
ENGINE_ARGS = ["--block-size", "32", "--batch-size", "4", "--eval-windows", "8", "--no-progress", "--warmup-steps", "1"]
ENGINE_ARGS += ["--max-steps", "4", "--eval-interval", "0", "--ckpt-interval", "0"]
ENGINE_ARGS += ["--diag-interval", "1000", "--no-tensorboard"]


def _per_step_counts(monkeypatch, counted_module, name):
    """Calls of ``counted_module.name`` during each training step (steps start at the first micro-batch)."""
    from engine import data

    steps, original_get = [], data.Batches.get
    original = getattr(counted_module, name)

    def get(self, step, micro=0):
        if micro == 0:
            steps.append(0)
        return original_get(self, step, micro)

    def counted(*args, **kwargs):
        if steps:
            steps[-1] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(data.Batches, "get", get)
    monkeypatch.setattr(counted_module, name, counted)
    return steps


def _engine_fsdp2(rank, world, cache_dir, out_dir):
    import torch.distributed as dist

    from engine.train import main

    class Patch:  # a minimal monkeypatch: the process ends after this function
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    dist.init_process_group = lambda *args, **kwargs: None  # run_distributed has made the gloo group
    steps = _per_step_counts(Patch(), dist, "all_reduce")
    argv = [*ENGINE_ARGS, "--backend", "fsdp2", "--implementation", "foreach", "--cache-dir", cache_dir]
    argv += ["--out-dir", out_dir]
    assert main(argv) == 0
    return steps


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    from engine import data

    path = str(tmp_path_factory.mktemp("corpus_cache"))
    data.load_corpus(None, path)
    return path


@pytest.mark.parametrize("optimizer", ["pisa", "adamw"])
def test_engine_single_checks_the_gradients_once_per_step(
    monkeypatch, corpus_cache, tmp_path, optimizer, one_torch_thread
):
    from engine.train import main

    steps = _per_step_counts(monkeypatch, F, "finite_flag")
    argv = [*ENGINE_ARGS, "--backend", "single", "--optimizer", optimizer]
    argv += ["--implementation", "foreach"] if optimizer == "pisa" else []
    argv += ["--cache-dir", corpus_cache, "--out-dir", str(tmp_path)]
    assert main(argv) == 0
    assert steps[:3] == [1, 1, 1]  # step 4 adds the final checkpoint's check of the weights


def test_engine_fsdp2_makes_one_control_all_reduce_per_step(corpus_cache, tmp_path):
    for steps in run_distributed(_engine_fsdp2, 2, corpus_cache, str(tmp_path), timeout=240):
        # step 1 adds the diagnostics' all-reduces, step 4 the final evaluation; steps 2 and 3 are plain steps
        assert steps[1:3] == [1, 1], steps
