"""The non-finite skip decided from the clip's gradient norm (``PISA.step(grad_norm=)``, the engine's ``--clip-grad``)
against the separate finite check: the same decisions on inf/NaN in any tensor, the same steps, and no second read
of the gradients."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed import run_distributed  # noqa: E402

import pisa_zero  # noqa: E402
from engine import backends  # noqa: E402
from engine.flags import parse_args  # noqa: E402
from pisa_zero import PISA  # noqa: E402
from pisa_zero import functional as F  # noqa: E402

BAD_VALUES = (math.inf, -math.inf, math.nan)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))


def grads_for(model, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen) * scale for p in model.parameters()]


def cases(model):
    """Clean gradients, then one inf/-inf/NaN in each tensor in turn."""
    yield None
    for i, _ in enumerate(model.parameters()):
        for value in BAD_VALUES:
            yield i, value


def poisoned(grads, case):
    grads = [g.clone() for g in grads]
    if case is not None:
        i, value = case
        grads[i].view(-1)[-1] = value
    return grads


@pytest.fixture
def finite_reads(monkeypatch):
    """Counts the separate finite check's reads of the gradients."""
    calls = []
    real = F.finite_flag
    monkeypatch.setattr(F, "finite_flag", lambda tensors: calls.append(len(tensors)) or real(tensors))
    return calls


@pytest.mark.parametrize("preconditioner", ["sisa", "nsisa"])
def test_a_non_finite_grad_norm_skips_exactly_where_the_separate_check_does(preconditioner, finite_reads):
    for case in cases(tiny_model()):
        checked, from_norm = tiny_model(), tiny_model()
        kw = dict(matrix_preconditioner=preconditioner, other_preconditioner="adamw")
        opt_checked = PISA(pisa_zero.param_groups(checked, **kw), sigma=2.0, rho=10.0, implementation="foreach")
        opt_norm = PISA(pisa_zero.param_groups(from_norm, **kw), sigma=2.0, rho=10.0, implementation="foreach")
        for step in range(3):  # the bad value at step 1 only: a step before it and one after it
            grads = poisoned(grads_for(checked, step), case if step == 1 else None)
            for model in (checked, from_norm):
                for p, g in zip(model.parameters(), grads):
                    p.grad = g.clone()
            opt_checked.step()
            reads = len(finite_reads)
            opt_norm.step(grad_norm=torch.nn.utils.get_total_norm([p.grad for p in from_norm.parameters()]))
            assert len(finite_reads) == reads, "step(grad_norm=) read the gradients again"
        assert opt_norm.nonfinite_steps_skipped == opt_checked.nonfinite_steps_skipped == (case is not None)
        for a, b in zip(checked.parameters(), from_norm.parameters()):
            assert torch.equal(a, b), (case, preconditioner)


def test_grad_norm_is_refused_where_nothing_is_skipped():
    model = tiny_model()
    opt = PISA(model.parameters(), sigma=1.0, rho=1.0, skip_nonfinite=False)
    with pytest.raises(ValueError, match=r"step\(grad_norm=\).*skip_nonfinite=False"):
        opt.step(grad_norm=torch.tensor(1.0))


def single_backend(optimizer, clip):
    implementation = ["--implementation", "foreach"] if optimizer == "pisa" else []
    args = parse_args(["--optimizer", optimizer, "--clip-grad", str(clip), *implementation])
    model = tiny_model()
    return backends.Single(model, args, torch.device("cpu")), args


def reference_optimizer(model, backend, args):
    """The same optimizer as the back end's, built here: PISA from the engine's groups and options, or AdamW."""
    if args.optimizer == "pisa":
        return [PISA(backends.groups_for(model, args), **backends.pisa_options(args))]
    return backends.baseline_optimizers(model, args)


@pytest.mark.parametrize("optimizer", ["pisa", "adamw"])
def test_clip_grad_clips_to_the_norm_and_skips_on_a_non_finite_one(optimizer, finite_reads):
    clip = 0.5
    backend, args = single_backend(optimizer, clip)
    reference = tiny_model()
    ref_opts = reference_optimizer(reference, backend, args)
    flags, veto = torch.zeros(2, dtype=torch.float64), torch.zeros((), dtype=torch.bool)
    for step, case in enumerate([None, (0, math.nan), None, (2, math.inf), None]):
        grads = poisoned(grads_for(reference, step), case)
        for model in (backend.model, reference):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
        reads = len(finite_reads)
        stepped, _ = backend.step(flags, veto)
        assert len(finite_reads) == reads, "--clip-grad: the gradients were read again for the finite check"
        assert stepped == (case is None)
        norm = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), clip)  # torch's own clip
        if torch.isfinite(norm):
            for opt in ref_opts:
                opt.step()
        for opt in ref_opts:
            opt.zero_grad(set_to_none=True)
        for a, b in zip(backend.model.parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"step {step}")
    assert any(not torch.equal(a, b) for a, b in zip(backend.model.parameters(), tiny_model().parameters()))


def test_without_clip_grad_the_separate_check_reads_the_gradients(finite_reads):
    backend, _ = single_backend("adamw", 0.0)
    for p, g in zip(backend.model.parameters(), grads_for(backend.model, 0)):
        p.grad = g
    backend.step(torch.zeros(2, dtype=torch.float64), torch.zeros((), dtype=torch.bool))
    assert finite_reads, "no clip: the step must still check the gradients"


def _fsdp2_clip(rank, world, clip, steps):
    torch.set_num_threads(1)
    args = parse_args(["--clip-grad", str(clip), "--implementation", "foreach", "--backend", "fsdp2"])
    backend = backends.FSDP2(tiny_model(), args, torch.device("cpu"))
    flags, veto = torch.zeros(2, dtype=torch.float64), torch.zeros((), dtype=torch.bool)
    stepped = []
    for step in range(steps):
        grads = poisoned(grads_for(tiny_model(), step), (1, math.nan) if step == 1 and rank == 1 else None)
        for p, g in zip(backend.model.parameters(), grads):  # this rank's shard of its own full gradient (the NaN
            # sits in the last element, which rank 1's shard holds): src_data_rank=None, no scatter from rank 0
            p.grad = torch.distributed.tensor.distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        stepped.append(backend.step(flags, veto)[0])
    return stepped, [p.full_tensor() for p in backend.model.parameters()]


def test_fsdp2_clip_grad_uses_the_norm_over_every_rank_and_every_rank_skips_together():
    clip, steps = 0.5, 3
    results = run_distributed(_fsdp2_clip, 2, clip, steps)
    args = parse_args(["--clip-grad", str(clip), "--implementation", "foreach"])
    reference = tiny_model()
    (opt,) = reference_optimizer(reference, None, args)
    for step in range(steps):
        grads = grads_for(reference, step)
        for p, g in zip(reference.parameters(), grads):
            p.grad = g.clone()
        if step != 1:  # rank 1's NaN at step 1 skips it on both ranks
            torch.nn.utils.clip_grad_norm_(list(reference.parameters()), clip)
            opt.step()
        opt.zero_grad(set_to_none=True)
    for stepped, params in results:
        assert stepped == [True, False, True]
        for a, b in zip(params, reference.parameters()):
            torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_clip_grad_is_refused_in_mode_b():
    with pytest.raises(SystemExit):
        parse_args(["--clip-grad", "1.0", "--agents", "2"])
