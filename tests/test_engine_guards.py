"""engine/train.py's guards before and around the work: what a resume honours or refuses, one run per
--out-dir, writable folders, verified checkpoints, the DeepSpeed default optimizer, size flags against memory.

Each refusal is checked to come before any work: the model factory is replaced by one that fails the test."""
# ruff: noqa: F811  (test_engine's fixtures `run` and `cache_dir` are imported to be used as fixtures)

import contextlib
import json
import os
import re
import socket
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from distributed import run_distributed, skip_or_fail  # noqa: E402
from test_engine import ROOT, TINY, cache_dir, env, run, scalars  # noqa: E402, F401

from engine import models, resume, sizes  # noqa: E402
from engine.flags import parse_args  # noqa: E402
from engine.rundir import RunLock  # noqa: E402
from engine.train import main  # noqa: E402

BASE = ["--max-steps", 4, "--ckpt-interval", 2, "--eval-interval", 0, "--schedule", "constant"]
BASE += ["--log-interval", 1, "--diag-interval", 1]


@pytest.fixture
def no_work(monkeypatch):
    """Building the model is the first work: a refusal must come before it."""
    import engine.train

    def boom(*args, **kwargs):
        raise AssertionError("work started: the model was being built")

    monkeypatch.setattr(engine.train, "build_model", boom)


@contextlib.contextmanager
def lock_held_by_another_process(out_dir):
    """A separate process holding <out_dir>/.lock (the test waits for its "held" line: no sleeps)."""
    os.makedirs(out_dir, exist_ok=True)
    code = "import sys, time; from engine.rundir import RunLock; assert RunLock(sys.argv[1]).acquire() is None"
    code += "; print('held', flush=True); time.sleep(3600)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(out_dir)], cwd=ROOT, env=env(), stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"held"
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------------------- 1. resume honours/refuses
def test_resume_honours_explicit_sigma_rho_and_aux_lr(run, tmp_path, capsys):
    """They gave a result bitwise equal to resuming without them (the load brought back the checkpoint's groups)."""
    assert run(*BASE) == 0
    middle = tmp_path / "run" / "checkpoints" / "step_000002"
    assert run(*BASE, "--resume", middle, out="same") == 0
    capsys.readouterr()
    assert run(*BASE, "--resume", middle, "--sigma", 60, "--rho", 200, "--aux-lr", "1e-3", out="changed") == 0
    out = capsys.readouterr().out
    assert "--sigma 60.0 (the checkpoint's: 30.0; nsisa)" in out and "--rho 200.0 (the checkpoint's: 100.0" in out
    assert "--aux-lr 0.001 (the checkpoint's: 0.003; adamw)" in out
    s, same, changed = (scalars(tmp_path / d / "tensorboard") for d in ("run", "same", "changed"))
    assert same["train/loss"][4] == s["train/loss"][4]
    assert changed["pisa/nsisa/sigma"][4] == 60.0 and changed["pisa/nsisa/rho"][4] == 200.0
    assert changed["train/lr/adamw"][4] == pytest.approx(1e-3) and same["train/lr/adamw"][4] == pytest.approx(3e-3)
    assert changed["train/loss"][4] != same["train/loss"][4]


def test_resume_honours_and_logs_another_batch_size_and_grad_accum(run, tmp_path, capsys):
    """They were accepted silently."""
    assert run(*BASE) == 0
    capsys.readouterr()
    middle = tmp_path / "run" / "checkpoints" / "step_000002"
    assert run(*BASE, "--resume", middle, "--batch-size", 4, "--grad-accum", 2, out="changed") == 0
    out = capsys.readouterr().out
    assert "--batch-size 4 (the checkpoint's: 8)" in out and "--grad-accum 2 (the checkpoint's: 1)" in out
    tokens = scalars(tmp_path / "changed" / "tensorboard")["train/tokens"]
    assert tokens[4] == 2 * 8 * 64 + 2 * (4 * 2 * 64)  # 2 steps of the checkpoint's batch, then 2 of this run's


@pytest.mark.parametrize("flag, saved, now", [("matrix", "nsisa", "sisa"), ("other", "adamw", "sisa")])
def test_resume_refuses_another_preconditioner_naming_both_values(run, tmp_path, no_work, flag, saved, now):
    """--matrix-preconditioner sisa on an nsisa checkpoint failed with "Missing key ... second_moment"."""
    import engine.train

    with pytest.MonkeyPatch.context() as m:  # this first run builds its model
        m.setattr(engine.train, "build_model", models.build_model)
        assert run("--max-steps", 2, "--eval-interval", 0) == 0
    key = f"{flag}_preconditioner"
    expected = rf"saved with {key}='{saved}' \(--{key.replace('_', '-')}\), this run has {key}='{now}'"
    with pytest.raises(ValueError, match=expected):
        run("--max-steps", 4, "--resume", f"--{key.replace('_', '-')}", now)


def _mode_b(rank, world, cache, root):
    """FSDP2 mode B, 2 agents, H = 2: a checkpoint mid-round (step 3), then resumes with other round flags."""
    import torch.distributed as dist

    dist.init_process_group = lambda *args, **kwargs: None  # run_distributed made the gloo group
    base = [*TINY, "--cache-dir", cache, "--backend", "fsdp2", "--agents", "2", "--local-steps", "2"]
    base += ["--eval-interval", "0", "--schedule", "constant", "--log-interval", "1", "--ckpt-interval", "3"]
    assert main([*base, "--max-steps", "3", "--out-dir", f"{root}/run"]) == 0
    middle = f"{root}/run/checkpoints/step_000003"
    out = {}
    for name, extra in (("same", []), ("prox", ["--prox-sigma", "5"]), ("h3", ["--local-steps", "3"])):
        argv = [*base, *extra, "--max-steps", "5", "--resume", middle, "--out-dir", f"{root}/{name}"]
        try:
            out[name] = main(argv)
        except ValueError as e:
            out[name] = str(e)
    try:
        main([*base, "--centred-dual", "--max-steps", "5", "--resume", middle, "--out-dir", f"{root}/centred"])
    except ValueError as e:
        out["centred"] = str(e)
    return out


@pytest.mark.slow
def test_mode_b_resume_refuses_other_local_steps_and_centred_dual_and_honours_prox_sigma(cache_dir, tmp_path):
    """A different --local-steps reinterpreted or dropped the open round; --prox-sigma / --centred-dual were
    ignored."""
    results = run_distributed(_mode_b, 2, cache_dir, str(tmp_path), timeout=400)
    for r in results:
        assert r["same"] == 0 and r["prox"] == 0
        assert "saved with local_steps=2 (--local-steps), this run has local_steps=3" in r["h3"]
        assert "saved with centred_dual=False (--centred-dual), this run has centred_dual=True" in r["centred"]
    same, prox = (scalars(tmp_path / d / "tensorboard") for d in ("same", "prox"))
    assert prox["train/loss"][5] != same["train/loss"][5]  # round 2 closed at step 4 with σ_p = 5


# ------------------------------------------------------------------------------------------ 2. one run per folder
def test_a_second_run_on_the_same_out_dir_is_refused_naming_the_holder(run, tmp_path, no_work):
    """Two runs on one --out-dir both exited 0, their checkpoints interleaved and one run's final checkpoint was
    gone. The lock goes with its holder, however it ends: a SIGKILLed holder leaves no stale lock."""
    folder = tmp_path / "run"
    with lock_held_by_another_process(folder) as holder:
        with pytest.raises(SystemExit, match=rf"--out-dir {folder} is in use by another run: pid {holder.pid} on "):
            run("--max-steps", 2)
        holder.kill()  # a crash of the holder
        holder.wait()
        with pytest.raises(AssertionError, match="work started"):  # the lock is free: the run gets to its work
            run("--max-steps", 2)
    lock = RunLock(str(folder))
    assert lock.acquire() is None  # released when main() returned
    holder = json.loads((folder / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(SystemExit, match=f"pid {os.getpid()} on "):  # ... and refused again while held here
        run("--max-steps", 2)
    lock.release()


def _refused_ranks(rank, world, argv):
    import torch.distributed as dist

    import engine.train

    dist.init_process_group = lambda *args, **kwargs: None
    engine.train.build_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started"))
    try:
        main(argv)
    except SystemExit as e:
        return str(e)
    return "ran"


def test_every_rank_learns_of_the_refusal(cache_dir, tmp_path):
    """Under a launcher only rank 0 takes the lock; the other ranks must exit with it, not train on alone."""
    folder = tmp_path / "run"
    argv = [*TINY, "--cache-dir", cache_dir, "--backend", "fsdp2", "--out-dir", str(folder), "--max-steps", "2"]
    with lock_held_by_another_process(folder) as holder:
        results = run_distributed(_refused_ranks, 2, argv, timeout=240)
    assert all(f"is in use by another run: pid {holder.pid}" in r for r in results), results


def test_a_read_only_out_dir_is_found_before_training(run, tmp_path, no_work):
    """A read-only --out-dir or checkpoints/ was found only at the first save, after the steps were spent."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (tmp_path / "rw" / "checkpoints").mkdir(parents=True)
    mounted = []
    try:
        for where in (ro, tmp_path / "rw" / "checkpoints"):
            if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)]).returncode:
                skip_or_fail("needs a read-only tmpfs (mount -t tmpfs -o ro), which this machine does not permit")
            mounted.append(where)
        with pytest.raises(SystemExit, match=rf"--out-dir {ro}: cannot write to {ro} \(Read-only file system\)"):
            run("--max-steps", 2, out=ro)
        checkpoints = tmp_path / "rw" / "checkpoints"
        with pytest.raises(SystemExit, match=rf"cannot write to {checkpoints} .*no step was spent"):
            run("--max-steps", 2, out="rw")
    finally:
        for where in mounted:
            subprocess.run(["umount", str(where)], check=True)


# -------------------------------------------------------------------------------------- 3. unverified checkpoints
def test_an_unverifiable_checkpoint_is_refused_by_name_unless_allowed(run, tmp_path, capsys):
    """A checkpoint whose pisa_meta.json lost its sha256 entry loaded (finite garbage) and was published as latest,
    with no notice."""
    assert run("--max-steps", 2, "--eval-interval", 0) == 0
    meta = tmp_path / "run" / "checkpoints" / "step_000002" / "pisa_meta.json"
    recorded = json.loads(meta.read_text())
    del recorded["sha256"]
    meta.write_text(json.dumps(recorded))
    expected = rf"{re.escape(str(meta))} records no sha256 checksums.*--allow-unverified-checkpoint"
    with pytest.raises(ValueError, match=expected):
        run("--max-steps", 4, "--eval-interval", 0, "--resume")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_000002"
    capsys.readouterr()
    assert run("--max-steps", 4, "--eval-interval", 0, "--resume", "--allow-unverified-checkpoint") == 0
    assert f"warning: {meta} records no sha256 checksums" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ 5. DeepSpeed JSON and sizes
def test_a_deepspeed_json_without_an_optimizer_block_trains_the_documented_default(tmp_path):
    """It trained PISA sisa with σ = 1, ρ = 1000 in one group over every parameter, and said nothing."""
    from engine import dsconfig
    from pisa_zero.deepspeed import parse_pisa_params

    path = tmp_path / "no_optimizer.json"
    path.write_text('{"zero_optimization": {"stage": 3}}')

    def config(*flags):
        said = []
        args = parse_args(["--deepspeed_config", str(path), *flags])
        return dsconfig.deepspeed_config(args, args.explicit, None, say=said.append), said

    cfg, said = config()
    spec = parse_pisa_params(cfg["optimizer"]["params"])
    assert cfg["optimizer"]["type"] == "PISA" and spec.auto_groups
    assert (spec.matrix_preconditioner, spec.other_preconditioner) == ("nsisa", "adamw")
    assert spec.kwargs["sigma"] == 30.0 and spec.kwargs["rho"] == 100.0 and spec.other_options["lr"] == 3e-3
    assert any("no_optimizer.json has no 'optimizer' block: training the engine's default" in s for s in said)
    spec = parse_pisa_params(config("--sigma", "5", "--matrix-preconditioner", "sisa")[0]["optimizer"]["params"])
    assert spec.kwargs["sigma"] == 5.0 and spec.matrix_preconditioner == "sisa" and "momentum" not in spec.kwargs
    cfg, _ = config("--optimizer", "adamw", "--lr", "1e-4")
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.95]}}
    assert config("--optimizer", "muon")[0]["optimizer"]["params"]["muon_lr"] == 0.02


def test_the_deepspeed_json_tensorboard_and_scheduler_follow_the_flags(tmp_path):
    """The JSON's ``tensorboard`` section is pointed at the run's folder (off without one: --no-tensorboard); its
    ``scheduler`` is kept with --schedule config and otherwise dropped, saying so."""
    from engine import dsconfig

    path = tmp_path / "with_scheduler.json"
    scheduler = {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}
    tensorboard = {"enabled": False, "output_path": "/elsewhere"}
    path.write_text(json.dumps({"tensorboard": tensorboard, "scheduler": scheduler}))
    said = []
    args = parse_args(["--deepspeed_config", str(path)])
    cfg = dsconfig.deepspeed_config(args, args.explicit, str(tmp_path / "tb"), say=said.append)
    assert cfg["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "deepspeed"}
    assert "scheduler" not in cfg and any("use --schedule config to keep it" in s for s in said), said
    args = parse_args(["--deepspeed_config", str(path), "--schedule", "config"])
    cfg = dsconfig.deepspeed_config(args, args.explicit, None, say=said.append)
    assert cfg["tensorboard"]["enabled"] is False and cfg["scheduler"] == scheduler


def test_the_memory_estimate_names_the_largest_parts_flags():
    args = parse_args(["--block-size", "100000000", "--batch-size", "16"])
    config = models.model_config("gpt2", "tiny", 256, args.block_size)
    parts = sizes.terms(args, config, n_params=12_800_000_000, world=1)
    host = [(b, "host", what) for b, _, what in parts]
    message = sizes.memory_problem(host, {"host": 64 * 2**30, "device": None})
    assert "one rank needs at least" in message and "64.0 GiB are available" in message
    assert "logits: --batch-size 16 x --block-size 100000000 x vocabulary 256" in message  # the largest part
    assert sizes.memory_problem(host, {"host": None, "device": None}) is None  # unknown: not refused
    assert sizes.memory_problem(host[-1:], {"host": 64 * 2**30}) is None


# --------------------------------------------------------------------------------------- the sweeps, per entry point
def _fake_checkpoint(tmp_path, argv, world=1, **saved) -> str:
    """A checkpoint folder holding what the check before the build reads: run.json (as ``argv`` would write it, with
    ``saved`` changed) and, for FSDP2/single, a pisa_meta.json with its checksums."""
    args = parse_args(argv)
    folder = tmp_path / "fake" / "step_000002"
    folder.mkdir(parents=True)
    ds = {"optimizer": json.load(open(args.deepspeed_config)).get("optimizer")} if args.deepspeed_config else None
    settings = {**resume.settings(args, world, 256, ds), "sha256": {}, **saved}
    (folder / "run.json").write_text(json.dumps(settings))
    (folder / "pisa_meta.json").write_text(json.dumps({"format": 1, "agents": 1, "alphas": [1.0], "sha256": {}}))
    return str(folder)


def _init_from(tmp_path) -> str:
    model = models.build_model("gpt2", "tiny", block_size=64)
    model.save_pretrained(tmp_path / "hf64")
    return str(tmp_path / "hf64")


def _checkpoints_a_file(tmp_path) -> list[str]:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "checkpoints").write_text("")
    return []


def _no_sha(tmp_path, argv):
    folder = _fake_checkpoint(tmp_path, argv)
    with open(os.path.join(folder, "pisa_meta.json"), "w") as f:
        f.write(json.dumps({"format": 1, "agents": 1, "alphas": [1.0]}))
    return folder


SINGLE_CASES = [
    ("block size beyond the data", lambda p, a: ["--block-size", "100000000"],
     "--block-size 100000000: the validation split"),
    ("more memory than any machine", lambda p, a: ["--batch-size", "100000000"],
     "cannot fit: one rank needs at least"),
    ("init-from positions", lambda p, a: ["--init-from", _init_from(p), "--block-size", "128"],
     "--block-size 128 exceeds the 64 positions of --init-from"),
    ("checkpoints/ is a file", lambda p, a: _checkpoints_a_file(p), "checkpoints (File exists); checked before"),
    ("another matrix preconditioner", lambda p, a: ["--resume", _fake_checkpoint(p, a, matrix_preconditioner="sisa")],
     "saved with matrix_preconditioner='sisa' (--matrix-preconditioner), this run has matrix_preconditioner='nsisa'"),
    ("another model", lambda p, a: ["--resume", _fake_checkpoint(p, a, model="llama")],
     "saved with model='llama' (--model)"),
    ("unverifiable", lambda p, a: ["--resume", _no_sha(p, a)], "records no sha256 checksums"),
]  # fmt: skip


@pytest.mark.parametrize("name, extra, message", SINGLE_CASES, ids=[c[0] for c in SINGLE_CASES])
def test_every_bad_run_is_refused_before_any_work(cache_dir, tmp_path, no_work, name, extra, message):
    """engine/train.py, one process: each refused by name before the model is built."""
    argv = [*TINY, "--cache-dir", cache_dir, "--out-dir", str(tmp_path / "out"), "--max-steps", "2"]
    argv += extra(tmp_path, argv)
    with pytest.raises((SystemExit, ValueError)) as refused:
        main(argv)
    assert message in str(refused.value)


def _ranks_cases(rank, world, cases, backend):
    import torch.distributed as dist

    import engine.train

    if backend == "fsdp2":
        dist.init_process_group = lambda *args, **kwargs: None
    engine.train.build_model = lambda *a, **k: (_ for _ in ()).throw(AssertionError("work started"))
    out = []
    for argv in cases:
        try:
            main(argv)
            out.append("ran")
        except (SystemExit, ValueError) as e:
            out.append(str(e))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["fsdp2", "deepspeed"])
def test_every_bad_run_is_refused_on_every_rank_before_any_work(cache_dir, tmp_path, backend, monkeypatch):
    """torchrun (fsdp2) and deepspeed ranks: each refusal reaches every rank, named, before the model is built."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    head = [*TINY, "--cache-dir", cache_dir, "--max-steps", "2"]
    head += ["--backend", "fsdp2"] if backend == "fsdp2" else ["--deepspeed_config", f"{ROOT}/configs/pisa_zero3.json"]
    base = [*head, "--out-dir", str(tmp_path / "out")]
    corrupted = _fake_checkpoint(tmp_path, base, world=2)
    if backend == "deepspeed":  # a DeepSpeed checkpoint's files are checked against run.json's sums
        saved = json.load(open(f"{corrupted}/run.json"))
        open(f"{corrupted}/model.pt", "w").write("written at save")
        saved["sha256"] = {"model.pt": "0" * 64}
        open(f"{corrupted}/run.json", "w").write(json.dumps(saved))
    cases = {
        "--block-size 100000000: the validation split": [*base, "--block-size", "100000000"],
        "cannot fit: one rank needs at least": [*base, "--batch-size", "100000000"],
        "this run has local_steps=1": [*base, "--resume", _fake_checkpoint(tmp_path / "h", base, 2, local_steps=4)],
        "is in use by another run": [*head, "--out-dir", str(tmp_path / "held")],
    }
    if backend == "deepspeed":
        cases["model.pt is corrupted"] = [*base, "--resume", corrupted]
    with lock_held_by_another_process(tmp_path / "held"):
        results = run_distributed(_ranks_cases, 2, list(cases.values()), backend, timeout=400)
    for rank_result in results:
        for message, got in zip(cases, rank_result):
            assert message in got, (message, got)


# ------------------------------------------------------------------------------ 6. documented flags reach their use
def test_optimizer_flags_reach_the_optimizers_groups():
    """--momentum and --l2-lambda (the matrix group), --beta2 (sisa groups), --other-preconditioner, --aux-lr and
    --aux-weight-decay (the auxiliary group) land in the PISA the single back end builds, each where it belongs."""
    import torch

    from engine import backends

    model = models.build_model("gpt2", "tiny")
    flags = ["--momentum", "0.8", "--l2-lambda", "0.01", "--aux-lr", "2e-3", "--aux-weight-decay", "0.05"]
    by_kind = {
        g["preconditioner"]: g for g in backends.Single(model, parse_args(flags), torch.device("cpu")).pisa.param_groups
    }
    assert set(by_kind) == {"nsisa", "adamw"}
    assert (by_kind["nsisa"]["momentum"], by_kind["nsisa"]["l2_lambda"]) == (0.8, 0.01)
    assert (by_kind["adamw"]["lr"], by_kind["adamw"]["weight_decay"]) == (2e-3, 0.05)
    sisa = parse_args([*flags[:4], "--beta2", "0.9", "--other-preconditioner", "sisa"])
    groups = backends.Single(model, sisa, torch.device("cpu")).pisa.param_groups
    assert {g["preconditioner"] for g in groups} == {"nsisa", "sisa"}
    assert all(g["beta2"] == 0.9 and g["l2_lambda"] == 0.01 for g in groups)


def test_min_lr_ratio_is_the_cosine_floor():
    from engine.train import lr_factor

    args = parse_args(["--max-steps", "100", "--warmup-steps", "10", "--min-lr-ratio", "0.25"])
    assert lr_factor(5, args) == 0.5 and lr_factor(10, args) == 1.0
    assert lr_factor(55, args) == pytest.approx(0.25 + 0.75 * 0.5) and lr_factor(100, args) == pytest.approx(0.25)


def test_val_fraction_splits_a_single_token_file(tmp_path):
    import numpy as np

    from engine.train import load_data

    np.save(tmp_path / "tokens.npy", (np.arange(1000) % 50).astype(np.uint16))
    args = parse_args(["--data", str(tmp_path / "tokens.npy"), "--val-fraction", "0.1"])
    args.cache_dir = str(tmp_path / "cache")
    corpus = load_data(args, 0)
    assert (len(corpus.train), len(corpus.val)) == (900, 100)
    assert list(corpus.val[:3]) == [0, 1, 2]  # the held-out tokens are the file's last tenth


def test_dist_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from engine.train import setup_distributed

    seen = {}
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: seen.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    setup_distributed(parse_args(["--backend", "fsdp2", "--dist-timeout", "42", "--device", "cpu"]))
    assert seen["backend"] == "gloo" and seen["timeout"] == datetime.timedelta(seconds=42)
