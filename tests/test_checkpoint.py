"""DCP checkpoints: atomic writes, extra round-trip, resharding 4 → 2 → 1 ranks (mode A), per-agent state saved,
preserved and merged by the documented rule (mode B), and a writer killed mid-save."""

import json
import multiprocessing as mp
import os
import re
import signal
import sys

import pytest
import torch
import torch._inductor.config

sys.path.insert(0, os.path.dirname(__file__))

from _consensus_common import agent_pools, loss_fn, make_model, max_rel_err, rank_batch  # noqa: E402
from distributed import run_scenarios  # noqa: E402

from pisa_zero import PISA, checkpoint  # noqa: E402
from pisa_zero.consensus import AgentTopology  # noqa: E402
from pisa_zero.integrations.fsdp import prepare  # noqa: E402

HP = dict(sigma=10.0, rho=100.0, l2_lambda=0.01, eps=1e-8, implementation="foreach")
GLOBAL = 16
SAVE_AT, TOTAL = 4, 8


def groups(model):
    named = list(model.named_parameters())
    return [
        {"params": [p for _, p in named if p.ndim == 2], "preconditioner": "nsisa"},
        {"params": [p for _, p in named if p.ndim != 2], "preconditioner": "adamw", "lr": 3e-3},
    ]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def weights(model):
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def opt_state(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {
        (names[id(p)], k): _full(v).detach().clone() for p, s in opt.state.items() for k, v in s.items() if k != "step"
    }


def train(model, opt, start, stop, agents=1, agent=0, shard=0, shards=1, sizes=None):
    pools = agent_pools(agents, agents > 1)
    for t in range(start, stop):
        n = GLOBAL if sizes is None else sizes[agent]
        x, y = rank_batch(pools, agent, shard, shards, t, n)
        if sizes is not None:
            opt.set_local_batch_size(n // shards)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


def mode_a(world):
    model = make_model()
    return prepare(model, groups=groups(model), **HP)


def _save_mode_a(rank, world, root):
    # mode A: save at SAVE_AT, keep going to TOTAL (the uninterrupted run)
    model, opt = mode_a(world)
    train(model, opt, 0, SAVE_AT, shard=rank, shards=world)
    checkpoint.save(os.path.join(root, "a"), model, opt, extra={"step": SAVE_AT, "rank": rank})
    train(model, opt, SAVE_AT, TOTAL, shard=rank, shards=world)
    return {"a_final": weights(model)}


def _mode_b_model():
    topo = AgentTopology.build(agents=2)
    model = make_model()
    return topo, *prepare(model, topo, groups=groups(model), **HP)


def _save_mode_b(rank, world, root):
    # mode B, 2 agents × 2 shards, unequal batches: every agent's own state is saved
    topo, model, opt = _mode_b_model()
    train(model, opt, 0, SAVE_AT, 2, topo.agent_index, topo.shard_index, 2, sizes=[6, 10])
    checkpoint.save(os.path.join(root, "b"), model, opt)
    out = {"b_weights": weights(model), "b_state": opt_state(model, opt), "b_alpha": topo.alpha}
    train(model, opt, SAVE_AT, TOTAL, 2, topo.agent_index, topo.shard_index, 2, sizes=[6, 10])
    out["b_final"] = weights(model)
    return out


def _save_refused(rank, world, root):
    # a NaN in rank 3's shard only: every rank refuses the save (no deadlock), "b" stays the published one
    topo, model, opt = _mode_b_model()
    train(model, opt, 0, 1, 2, topo.agent_index, topo.shard_index, 2, sizes=[6, 10])
    if rank == 3:
        with torch.no_grad():
            model.inp.weight.to_local()[0, 0] = float("nan")
    try:
        checkpoint.save(os.path.join(root, "b"), model, opt)
    except ValueError as e:
        return str(e)
    return None


def _load_mode_a(rank, world, root):
    model, opt = mode_a(world)
    extra = checkpoint.load(os.path.join(root, "a"), model, opt)
    train(model, opt, SAVE_AT, TOTAL, shard=rank, shards=world)
    return {"extra": extra, "a_final": weights(model)}


def _load_mode_b(rank, world, root):
    # the same 2 agents on 1 rank each (k: 2 → 1): per-agent state preserved
    topo, model, opt = _mode_b_model()
    checkpoint.load(os.path.join(root, "b"), model, opt)
    out = {"b_weights": weights(model), "b_state": opt_state(model, opt)}
    train(model, opt, SAVE_AT, TOTAL, 2, topo.agent_index, 0, 1, sizes=[6, 10])  # continue with k = 1
    out["b_final"] = weights(model)
    return out


def _load_merged(rank, world, root):
    # 2 agents merged into 1 (mode A over 2 ranks): α-weighted average of their states
    model, opt = mode_a(world)
    checkpoint.load(os.path.join(root, "b"), model, opt)
    return opt_state(model, opt)


@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    """Saved on 4 ranks, then loaded on 2 (one launch each; every scenario its own test below)."""
    root = str(tmp_path_factory.mktemp("reshard"))
    saved = run_scenarios({"a": _save_mode_a, "b": _save_mode_b, "refused": _save_refused}, 4, root, timeout=240)
    loaded = run_scenarios({"a": _load_mode_a, "b": _load_mode_b, "merged": _load_merged}, 2, root, timeout=240)
    return root, saved, loaded


def _double(ws):
    return {k: v.double() for k, v in ws.items()}


@pytest.mark.slow
def test_mode_a_4_ranks_to_2(resharded):
    # mode A: 4 ranks → 2 ranks → continue == uninterrupted (fp32 round-off: gradient sums over 2 vs 4 ranks)
    root, saved, loaded = resharded
    assert os.path.islink(os.path.join(root, "a")) and os.path.isfile(os.path.join(root, "a", checkpoint.META))
    assert [r["extra"] for r in loaded["a"]] == [{"step": SAVE_AT, "rank": 0}, {"step": SAVE_AT, "rank": 1}]
    assert max_rel_err(loaded["a"][0]["a_final"], _double(saved["a"][0]["a_final"])) <= 1e-5


@pytest.mark.slow
def test_mode_a_4_ranks_to_1_process(resharded):
    # ... and → 1 process without torch.distributed
    root, saved, _ = resharded
    model = make_model()
    opt = PISA(groups(model), **HP)
    assert checkpoint.load(os.path.join(root, "a"), model, opt) == {"step": SAVE_AT, "rank": 0}
    train(model, opt, SAVE_AT, TOTAL)
    assert max_rel_err(weights(model), _double(saved["a"][0]["a_final"])) <= 1e-5


@pytest.mark.slow
def test_mode_b_per_agent_state_kept_from_4_ranks_to_2(resharded):
    # mode B: agent i's state on 2 ranks (k = 2 → 1) is exactly what agent i saved on 4 ranks; agents differ
    _, saved, loaded = resharded
    saved_b, loaded_b = saved["b"], loaded["b"]
    agent_of_rank4 = {0: 0, 2: 1}
    for new_rank, old_rank in ((0, 0), (1, 2)):
        got, want = loaded_b[new_rank]["b_state"], saved_b[old_rank]["b_state"]
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (agent_of_rank4[old_rank], key)
        for n, w in saved_b[0]["b_weights"].items():
            assert torch.equal(loaded_b[new_rank]["b_weights"][n], w)
    duals = [k for k in saved_b[0]["b_state"] if k[1] == "dual"]
    assert duals and any(not torch.equal(saved_b[0]["b_state"][k], saved_b[2]["b_state"][k]) for k in duals)


@pytest.mark.slow
def test_mode_b_continues_as_if_uninterrupted(resharded):
    # ... and training continues as if uninterrupted (fp32 round-off: gradient sums over 1 vs 2 ranks per agent)
    _, saved, loaded = resharded
    assert max_rel_err(loaded["b"][0]["b_final"], _double(saved["b"][0]["b_final"])) <= 1e-5


@pytest.mark.slow
def test_mode_b_merged_into_one_agent(resharded):
    # merge rule: α-weighted average of the two agents' states (α = 6/16 and 10/16)
    root, saved, loaded = resharded
    saved_b, merged = saved["b"], loaded["merged"][0]
    a0, a1 = saved_b[0]["b_alpha"], saved_b[2]["b_alpha"]
    assert (a0, a1) == pytest.approx((6 / 16, 10 / 16))
    for key, got in merged.items():
        want = a0 * saved_b[0]["b_state"][key] + a1 * saved_b[2]["b_state"][key]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # ... and in one process (2 agents → 1, no torch.distributed)
    model = make_model()
    opt = PISA(groups(model), **HP)
    checkpoint.load(os.path.join(root, "b"), model, opt)
    for key, got in opt_state(model, opt).items():
        torch.testing.assert_close(got, merged[key], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_nonfinite_shard_on_one_rank_refused_on_every_rank(resharded):
    root, saved, _ = resharded
    assert all("non-finite values (inf/NaN) in 'model.inp.weight' on rank 3" in r for r in saved["refused"])
    assert len([p for p in os.listdir(root) if p.startswith("b.v-")]) == 1  # nothing new written


def _killed_writer(path):
    torch.set_num_threads(1)
    torch._inductor.config.compile_threads = 1  # forked: the parent's compile thread pool has no threads here
    model = make_model()
    opt = PISA(groups(model), **HP)
    train(model, opt, 0, 2)
    checkpoint.save(path, model, opt, extra={"step": 2})
    train(model, opt, 2, 3)

    class KillWhilePickled:
        def __reduce__(self):
            os.kill(os.getpid(), signal.SIGKILL)  # the writer dies in the middle of writing checkpoint 2

    checkpoint.save(path, model, opt, extra={"step": 3, "boom": KillWhilePickled()})
    os._exit(0)


def test_single_process_roundtrip_and_killed_writer(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the writer ran on one thread: same reduction order, bitwise comparisons
    try:
        _roundtrip_and_killed_writer(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _roundtrip_and_killed_writer(tmp_path):
    path = str(tmp_path / "ckpt")
    proc = mp.get_context("fork").Process(target=_killed_writer, args=(path,))
    proc.start()
    proc.join(480)  # generous: 3 tiny steps and 2 saves, on a machine that may be loaded
    assert proc.exitcode == -signal.SIGKILL
    # the previous checkpoint is still there, complete, and loads
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith("ckpt.v-")]
    assert len(leftovers) == 2  # the published version and the orphaned partial one
    model = make_model()
    opt = PISA(groups(model), **HP)
    assert checkpoint.load(path, model, opt) == {"step": 2}
    ref_model = make_model()
    ref_opt = PISA(groups(ref_model), **HP)
    train(ref_model, ref_opt, 0, 2)
    for n, w in weights(ref_model).items():
        assert torch.equal(weights(model)[n], w)
    for key, v in opt_state(ref_model, ref_opt).items():
        assert torch.equal(opt_state(model, opt)[key], v)
    # resume == uninterrupted, bitwise (same process count, fp32)
    train(model, opt, 2, 5)
    train(ref_model, ref_opt, 2, 5)
    for n, w in weights(ref_model).items():
        assert torch.equal(weights(model)[n], w)
    # a second save replaces the first atomically and removes it
    checkpoint.save(path, model, opt, extra={"step": 5, "rng": torch.get_rng_state()})
    fresh = make_model()
    extra = checkpoint.load(path, fresh, PISA(groups(fresh), **HP))
    assert len([p for p in os.listdir(tmp_path) if p.startswith("ckpt.v-")]) == 2  # old version removed
    assert extra["step"] == 5 and torch.equal(extra["rng"], torch.get_rng_state())


def test_load_errors(tmp_path):
    model = make_model()
    opt = PISA(groups(model), **HP)
    with pytest.raises(ValueError, match="not a complete pisa_zero checkpoint"):
        checkpoint.load(tmp_path, model, opt)
    with pytest.raises(ValueError, match="extra="):
        checkpoint.save(tmp_path / "c", model, opt, extra=[1])
    with pytest.raises(ValueError, match="agents=3 onto agents=2"):
        checkpoint.agent_mapping(3, 2, 0, [1 / 3] * 3)
    assert checkpoint.agent_mapping(4, 2, 1, [0.1, 0.2, 0.3, 0.4]) == [(2, 0.3 / 0.7), (3, 0.4 / 0.7)]
    assert checkpoint.agent_mapping(2, 4, 3, [0.5, 0.5]) == [(1, 1.0)]


def _saved(tmp_path, steps=2):
    model = make_model()
    opt = PISA(groups(model), **HP)
    train(model, opt, 0, steps)
    path = str(tmp_path / "ckpt")
    version = checkpoint.save(path, model, opt, extra={"step": steps})
    return path, version, model, opt


def _fresh():
    model = make_model(seed=1)
    return model, PISA(groups(model), **HP)


def _corrupt(path, nan=True):
    """Overwrite 16 bytes in the middle of the largest tensor's data inside its .distcp file (found through DCP's
    own metadata): 0xFF… is a float32 NaN, so an unverified load gives NaN tensors. Returns the file."""
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(path).read_metadata().storage_data
    info = max(storage.values(), key=lambda i: i.length)
    file = os.path.join(path, info.relative_path)
    with open(file, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        f.write(b"\xff" * 16 if nan else b"\x3f" * 16)
    return file


def test_corrupted_or_missing_file_is_refused_by_name(tmp_path):
    # corrupted bytes inside a .distcp file used to load silently (NaN momentum -> NaN weights, exit 0)
    path, version, _, _ = _saved(tmp_path)
    with open(os.path.join(path, checkpoint.META)) as f:
        recorded = json.load(f)["sha256"]
    assert sorted(recorded) == sorted(checkpoint._checkpoint_files(version))
    assert any(name.endswith(".distcp") for name in recorded) and "extra/rank0.pt" in recorded
    before = weights(_fresh()[0])
    for nan in (True, False):  # NaN bytes, then finite-looking bytes that only a checksum can catch
        shard = _corrupt(path, nan)
        model, opt = _fresh()
        with pytest.raises(ValueError, match=rf"{re.escape(shard)} is corrupted"):
            checkpoint.load(path, model, opt)
        assert all(torch.equal(w, before[n]) for n, w in weights(model).items())  # refused before any tensor
    os.remove(os.path.join(path, "extra", "rank0.pt"))
    with pytest.raises(ValueError, match=r"extra/rank0\.pt is missing"):
        checkpoint.load(path, *_fresh())


def _drop_checksums(path: str) -> str:
    """Remove the sha256 entry of ``path``'s pisa_meta.json; returns that file's path."""
    meta_path = os.path.join(path, checkpoint.META)
    with open(meta_path) as f:
        meta = json.load(f)
    meta.pop("sha256", None)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return meta_path


def test_unverifiable_checkpoint_is_refused_by_name_unless_allowed(tmp_path):
    # a pisa_meta.json that lost its sha256 entry must not load finite garbage silently
    path, _, _, _ = _saved(tmp_path)
    meta_path = _drop_checksums(path)
    _corrupt(path, nan=False)  # finite-looking bytes: nothing but a checksum could catch them
    before = weights(_fresh()[0])
    model, opt = _fresh()
    with pytest.raises(ValueError, match=rf"{re.escape(meta_path)} records no sha256 checksums.*allow_unverified"):
        checkpoint.load(path, model, opt)
    assert all(torch.equal(w, before[n]) for n, w in weights(model).items())  # refused before any tensor
    with pytest.warns(UserWarning, match="loading unverified files"):
        assert checkpoint.load(path, *_fresh(), allow_unverified=True) == {"step": 2}


def test_unverifiable_checkpoint_with_nan_bytes_is_refused_by_key(tmp_path):
    # allowed unverified (or a writer that stored NaN): the finite check after loading names the tensor
    path, _, _, _ = _saved(tmp_path)
    meta_path = _drop_checksums(path)
    _corrupt(path)
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"non-finite values \(inf/NaN\) in '(model|optimizer)\..+' on rank 0"),
    ):
        checkpoint.load(path, *_fresh(), allow_unverified=True)
    with open(meta_path, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=re.escape(meta_path)):
        checkpoint.load(path, *_fresh())


@pytest.mark.parametrize("where", ["weight", "state"])
def test_save_refuses_nonfinite_and_keeps_the_last_good_checkpoint(tmp_path, where):
    # a NaN model used to be published as the newest checkpoint
    path, version, model, opt = _saved(tmp_path)
    with torch.no_grad():
        if where == "weight":
            model.blocks[0].weight[1, 2] = float("nan")
            key = "model.blocks.0.weight"
        else:
            opt.state[model.out.weight]["dual"][0, 0] = float("inf")
            key = "optimizer.state.out.weight.dual"
    with pytest.raises(ValueError, match=rf"refusing to write .*non-finite values \(inf/NaN\) in '{re.escape(key)}'"):
        checkpoint.save(path, model, opt, extra={"step": 3})
    assert os.path.realpath(path) == os.path.realpath(version)  # still the last good one
    assert [p for p in os.listdir(tmp_path) if p.startswith("ckpt.v-")] == [os.path.basename(version)]  # nothing new
    assert checkpoint.load(path, *_fresh()) == {"step": 2}
