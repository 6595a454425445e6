"""The Megatron launch script (scripts/pretrain_gpt_pisa.py) is as safe as the engine.

- Every flag is used or refused by name before any work (the sweep, in the style of tests/test_engine.py).
- A truncated or corrupted checkpoint file (tracker, ``metadata.json``, ``.metadata``, ``common.pt``, a data file)
  is refused naming the file and what is wrong (one 1-rank run under the device shim, one test id per case).
- SIGINT/SIGTERM stop every rank after the same step with a final checkpoint at that iteration, which loads; no rank
  outlives its launcher. The script runs as a subprocess (2 ranks under ``torchrun`` on gloo, or 1 plain process)
  through a two-line runner that installs tests/megatron_shim.py first (Megatron's DDP is CUDA-only).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCRIPT = os.path.join(ROOT, "scripts", "pretrain_gpt_pisa.py")
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, ROOT)
from distributed import require, run_distributed  # noqa: E402

require("megatron.core", "megatron-core", extra="megatron")
import pretrain_gpt_pisa as script  # noqa: E402

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16"]
TINY += ["--micro-batch-size", "2", "--no-progress"]
#: generous bounds against a hang only; nothing asserts how fast anything was
HANG_S = 600


# ---------------------------------------------------------------------------------------------------- flags
BAD_FLAGS = [
    # a negative batch "trained" with loss 0.0, a negative interval saved every step
    (["--global-batch-size", "-8"], "--global-batch-size=-8: expected an integer >= 1"),
    (["--save", "ck", "--save-interval", "-1"], "--save-interval=-1: expected an integer >= 0"),
    (["--ffn-hidden-size", "-4"], "--ffn-hidden-size=-4: expected an integer >= 1"),
    (["--seq-length", "0"], "--seq-length=0: expected an integer >= 1"),
    (["--num-layers", "-1"], "--num-layers=-1: expected an integer >= 1"),
    (["--hidden-size", "0"], "--hidden-size=0: expected an integer >= 1"),
    (["--micro-batch-size", "-2"], "--micro-batch-size=-2: expected an integer >= 1"),
    (["--make-vocab-size-divisible-by", "0"], "--make-vocab-size-divisible-by=0: expected an integer >= 1"),
    (["--train-iters", "0"], "--train-iters=0: expected an integer >= 1"),
    (["--seed", "-1"], "--seed=-1: expected an integer >= 0"),
    (["--lr-warmup-iters", "-1"], "--lr-warmup-iters=-1: expected an integer >= 0"),
    (["--lr-decay-iters", "0"], "--lr-decay-iters=0: expected an integer >= 1"),
    (["--log-interval", "0"], "--log-interval=0: expected an integer >= 1"),
    (["--eval-interval", "-5"], "--eval-interval=-5: expected an integer >= 0"),
    (["--eval-interval", "2", "--eval-iters", "0"], "--eval-iters=0: expected an integer >= 1"),
    (["--pisa-preconditioner", "nsisa", "--pisa-ns-steps", "0"], "--pisa-ns-steps=0: expected an integer >= 1"),
    (["--pisa-diagnostics-interval", "-2"], "--pisa-diagnostics-interval=-2: expected an integer >= 0"),
    (["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size=0: expected an integer >= 1"),
    (["--pipeline-model-parallel-size", "2"], "only 1 is supported"),
    (["--hidden-dropout", "1.0"], "--hidden-dropout=1.0: expected in [0, 1)"),
    (["--attention-dropout", "-0.1"], "--attention-dropout=-0.1: expected in [0, 1)"),
    (["--init-method-std", "0"], "--init-method-std=0.0: expected a finite number > 0"),
    (["--fp16", "--loss-scale", "-1"], "--loss-scale=-1.0: expected a finite number > 0"),
    (["--fp16", "--initial-loss-scale", "inf"], "--initial-loss-scale=inf: expected a finite number > 0"),
    (["--lr", "nan"], "--lr=nan: expected a finite number > 0"),
    (["--lr", "thirty"], "--lr: invalid float value: 'thirty'"),
    (["--min-lr=-1e-5"], "--min-lr=-1e-05: expected a finite number >= 0"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], "--min-lr=0.001: expected 0 <= min-lr <= --lr"),
    (["--weight-decay", "nan"], "--weight-decay=nan: expected a finite number >= 0"),
    (["--clip-grad", "-1"], "--clip-grad=-1.0: expected a finite number >= 0"),
    (["--adam-beta1", "1.0"], "--adam-beta1=1.0: expected in [0, 1)"),
    (["--adam-beta2", "-0.5"], "--adam-beta2=-0.5: expected in [0, 1)"),
    (["--adam-eps", "0"], "--adam-eps=0.0: expected a finite number > 0"),
    (["--pisa-sigma", "0"], "--pisa-sigma=0.0: expected a finite number > 0"),
    (["--pisa-rho", "nan"], "--pisa-rho=nan: expected a finite number >= 0"),
    (["--pisa-aux-lr", "-1"], "--pisa-aux-lr=-1.0: expected a finite number > 0"),
    (["--pisa-beta2", "1"], "--pisa-beta2=1.0: expected in [0, 1)"),
    (["--pisa-eps", "0"], "--pisa-eps=0.0: expected a finite number > 0"),
    (["--pisa-preconditioner", "nsisa", "--pisa-momentum", "1.5"], "--pisa-momentum=1.5: expected in [0, 1)"),
    (["--pisa-l2-lambda", "-1"], "--pisa-l2-lambda=-1.0: expected a finite number >= 0"),
    (["--optimizer-offload-fraction", "1.5"], "--optimizer-offload-fraction=1.5: expected in [0, 1]"),
    (["--pisa-state-dtype", "fp16"], "--pisa-state-dtype: invalid choice: 'fp16'"),
    (["--lr-decay-style", "step"], "--lr-decay-style: invalid choice: 'step'"),
    (["--pisa-sig", "3"], "unrecognized arguments: --pisa-sig"),  # no abbreviations (as Megatron's parser)
    # sizes that must divide each other
    (
        ["--num-attention-heads", "3", "--tensor-model-parallel-size", "2"],
        "--num-attention-heads=3: not divisible by TP",
    ),
    (["--hidden-size", "30", "--num-attention-heads", "4"], "--hidden-size=30: not divisible by --num-attention-heads"),
    (["--tensor-model-parallel-size", "2", "--ffn-hidden-size", "33"], "--ffn-hidden-size=33: not divisible by TP"),
    (["--lr-warmup-iters", "100", "--train-iters", "100"], "--lr-warmup-iters=100: expected 0 <= warmup < decay"),
    # combinations that cannot work
    (["--bf16", "--fp16"], "--bf16 and --fp16: choose one"),
    (["--pisa-preconditioner", "nsisa", "--tensor-model-parallel-size", "2"], "nsisa needs --tensor-model-parallel"),
    (["--pisa-preconditioner", "nsisa", "--optimizer-cpu-offload"], "nsisa: not with --optimizer-cpu-offload"),
    (["--pisa-diagnostics-interval", "5"], "--pisa-diagnostics-interval writes PISA's residuals to TensorBoard"),
    # flags the rest of the command line would make do nothing
    (["--bf16", "--initial-loss-scale", "1024"], "--initial-loss-scale is the first scale of fp16's dynamic"),
    (["--fp16", "--loss-scale", "8", "--initial-loss-scale", "1024"], "it needs --fp16 without --loss-scale"),
    (["--pisa-other-preconditioner", "sisa", "--adam-beta1", "0.8"], "--adam-beta1 sets the auxiliary AdamW"),
    (["--pisa-other-preconditioner", "identity", "--pisa-aux-lr", "1e-3"], "--pisa-aux-lr sets the auxiliary AdamW"),
    (["--pisa-preconditioner", "adagrad", "--pisa-beta2", "0.99"], "--pisa-beta2 is sisa's second-moment decay"),
    (["--pisa-preconditioner", "identity", "--pisa-eps", "1e-6"], "--pisa-eps is the preconditioner's eps"),
    (["--pisa-momentum", "0.9"], "--pisa-momentum is nsisa's momentum: it needs --pisa-preconditioner nsisa"),
    (["--pisa-ns-steps", "3"], "--pisa-ns-steps is nsisa's Newton-Schulz count"),
    (["--pisa-ns-dtype", "float32"], "--pisa-ns-dtype is nsisa's Newton-Schulz precision"),
    (["--pisa-routing-bytes", "4096"], "--pisa-routing-bytes bounds nsisa's routing"),
    (
        ["--pisa-preconditioner", "nsisa", "--pisa-routing-bytes", "0"],
        "--pisa-routing-bytes=0: expected an integer >= 1",
    ),
    (["--pisa-preconditioner", "nsisa", "--pisa-ns-dtype", "fp8"], "--pisa-ns-dtype: invalid choice"),
    (["--lr-decay-style", "constant", "--min-lr", "1e-5"], "--min-lr is the end of the decay"),
    (["--lr-decay-style", "constant", "--lr-decay-iters", "50"], "--lr-decay-iters is the decay length"),
    (["--optimizer-offload-fraction", "0.5"], "--optimizer-offload-fraction is the offloaded fraction: it needs"),
    (["--eval-iters", "4"], "--eval-iters sizes each evaluation: it needs --eval-interval"),
    (["--save-interval", "10"], "--save-interval needs --save"),
    (["--no-load-optim"], "--no-load-optim needs --load"),
    (["--ckpt-format", "fully_reshardable"], "--ckpt-format needs --save or --load"),
    # paths
    (["--data-path", "/nonexistent/corpus"], "--data-path='/nonexistent/corpus': no such file or folder"),
    (["--load", "/nonexistent/ckpt"], "--load='/nonexistent/ckpt': no such folder"),
    (["--save", __file__], "--save=" + repr(__file__) + ": exists and is not a folder"),
    (["--tensorboard-dir", __file__], "--tensorboard-dir=" + repr(__file__) + ": exists and is not a folder"),
    (["--data-cache-dir", __file__], "--data-cache-dir=" + repr(__file__) + ": exists and is not a folder"),
]
#: flags with no wrong value of their own (they are always used)
ALWAYS_USED = {"-h", "--help", "--untie-embeddings-and-output-weights", "--no-progress"}


@pytest.mark.parametrize("argv, message", BAD_FLAGS)
def test_megatron_launch_every_bad_flag_is_named_before_any_work(argv, message, capsys, monkeypatch):
    """Out-of-range values, wrong types, sizes that do not divide, and flags the run would silently
    ignore, each refused by name at parse time (nothing imported from Megatron, no process group)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        script.parse_args(argv)
    assert message in capsys.readouterr().err


def test_megatron_launch_the_sweep_covers_every_flag():
    """A flag added to the script without a case in BAD_FLAGS (or a reason to be in ALWAYS_USED) fails here."""
    swept = {a.split("=")[0] for argv, _ in BAD_FLAGS for a in argv if a.startswith("--")}
    every = {opt for action in script.parser()._actions for opt in action.option_strings}
    assert every - swept - ALWAYS_USED == set()


def test_megatron_launch_global_batch_must_fit_the_world(capsys, monkeypatch):
    """The world-size checks: at parse time under a launcher (WORLD_SIZE), again after the process group."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        script.parse_args(["--micro-batch-size", "4", "--global-batch-size", "6"])
    assert "--global-batch-size=6: not a multiple of --micro-batch-size x DP = 4 x 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.parse_args(["--tensor-model-parallel-size", "4", "--num-attention-heads", "4"])
    assert "--tensor-model-parallel-size=4: does not divide the world size 2" in capsys.readouterr().err
    monkeypatch.delenv("WORLD_SIZE")
    args = script.parse_args(["--micro-batch-size", "4", "--global-batch-size", "6"])
    assert script.check_world(args, 2) == ["--global-batch-size=6: not a multiple of --micro-batch-size x DP = 4 x 2"]
    assert script.check_world(args, 1) == ["--global-batch-size=6: not a multiple of --micro-batch-size x DP = 4 x 1"]
    assert script.check_world(script.parse_args(["--global-batch-size", "8"]), 2) == []


# ---------------------------------------------------------------------------------------------- checkpoints
def _truncate(rel: str, keep: float = 0.5):
    def corrupt(ckpt: str, folder: str) -> None:
        path = os.path.join(folder, rel)
        with open(path, "r+b") as f:
            f.truncate(int(os.path.getsize(path) * keep))

    return corrupt


def _overwrite(rel: str):
    """The same length, 64 bytes in the middle replaced: only a checksum can tell."""

    def corrupt(ckpt: str, folder: str) -> None:
        path = os.path.join(folder, rel)
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\xa5" * 64)

    return corrupt


def _tracker(text: str):
    def corrupt(ckpt: str, folder: str) -> None:
        with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(text)

    return corrupt


def _remove(rel: str):
    return lambda ckpt, folder: os.remove(os.path.join(folder, rel))


#: (case, how the checkpoint is damaged, extra flags, what the refusal says); the folder is iter_0000002
CORRUPTIONS = {
    "tracker_empty": (_tracker(""), [], "latest_checkpointed_iteration.txt: the file is empty (truncated)"),
    "tracker_not_a_number": (_tracker("tw\x00"), [], "latest_checkpointed_iteration.txt: 'tw\\x00' is not an it"),
    "tracker_names_a_missing_folder": (_tracker("7"), [], "names {ckpt}/iter_0000007, which does not exist"),
    "metadata_json_truncated": (_truncate("metadata.json"), [], "metadata.json: cannot be read, the file is trunc"),
    "index_truncated": (_truncate(".metadata"), [], "iter_0000002/.metadata: cannot be read, the file is trunc"),
    "index_empty": (_truncate(".metadata", 0.0), [], "iter_0000002/.metadata: cannot be read, the file is trunc"),
    "index_missing": (_remove(".metadata"), [], "iter_0000002: no .metadata (the index of every tensor's bytes)"),
    "common_truncated": (_truncate("common.pt"), [], "iter_0000002/common.pt: cannot be read, the file is trunc"),
    "common_missing": (_remove("common.pt"), [], "iter_0000002: no common.pt (iteration, scheduler and optimizer"),
    "data_file_truncated": (_truncate("__0_1.distcp"), [], "iter_0000002/__0_1.distcp is truncated: "),
    "data_file_missing": (_remove("__0_0.distcp"), [], "iter_0000002/__0_0.distcp is missing (.metadata indexes it)"),
    "data_file_corrupted": (_overwrite("__0_0.distcp"), [], "__0_0.distcp is corrupted (its SHA-256 differs"),
    "another_model": (lambda c, f: None, ["--hidden-size", "64"], "saved with --hidden-size=32 (this run: 64)"),
}


def _checkpoint_errors_body(rank, world, tmp):
    import contextlib
    import io
    import shutil

    import megatron_shim

    megatron_shim.install()
    common = [*TINY, "--data-path", os.path.join(tmp, "data"), "--lr-decay-style", "constant"]
    saved = os.path.join(tmp, "saved")
    script.main([*common, "--train-iters", "2", "--save", saved])
    out = {}
    for case, (corrupt, flags, _) in [("intact", (lambda c, f: None, [], None)), *CORRUPTIONS.items()]:
        ckpt = os.path.join(tmp, case)
        shutil.copytree(saved, ckpt)
        corrupt(ckpt, os.path.join(ckpt, "iter_0000002"))
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                result = script.main([*common, *flags, "--train-iters", "3", "--load", ckpt])
            out[case] = ("ran", result["iteration"])
        except BaseException as e:  # noqa: BLE001 - what the user would see (torch's CheckpointException too)
            out[case] = ("refused", f"{type(e).__name__}: {e}\n{err.getvalue()}".replace(ckpt, "{ckpt}"))
    return out


@pytest.fixture(scope="module")
def checkpoint_errors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron_ckpt_errors")
    _token_data(tmp / "data")
    return run_distributed(_checkpoint_errors_body, 1, str(tmp), timeout=HANG_S)[0]


def test_megatron_launch_an_intact_checkpoint_loads_and_continues(checkpoint_errors):
    assert checkpoint_errors["intact"] == ("ran", 3)


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_megatron_launch_a_damaged_checkpoint_file_is_named(checkpoint_errors, case):
    """Issue 20: these gave a bare ValueError from int(), CheckpointException "ranks:dict_keys([0])", a zip error,
    "'str' object has no attribute 'iterdir'", or (bytes overwritten in a data file) loaded wrong weights silently."""
    status, message = checkpoint_errors[case]
    assert status == "refused", message
    assert CORRUPTIONS[case][2] in message, message


# ---------------------------------------------------------------------------------------------------- stops
def _token_data(folder) -> None:
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(os.path.join(folder, "train.npy"), rng.integers(0, 100, 20000).astype(np.uint16))
    np.save(os.path.join(folder, "val.npy"), rng.integers(0, 100, 2000).astype(np.uint16))


@pytest.fixture
def launch(tmp_path):
    """(command prefix for one process, for 2 torchrun ranks, the environment, the flags): the script with the
    device shim installed first, on the tiny model and a token corpus."""
    runner = tmp_path / "run_shimmed.py"
    runner.write_text(
        "import runpy, sys\n"
        "import megatron_shim\n"
        "megatron_shim.install()\n"
        f"sys.argv[0] = {SCRIPT!r}\n"
        f"runpy.run_path({SCRIPT!r}, run_name='__main__')\n"
    )
    _token_data(tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([HERE, ROOT, env.get("PYTHONPATH", "")])
    # torchrun SIGKILLs its ranks this long after forwarding a stop (default 30 s): a loaded machine must not matter
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = str(HANG_S)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    flags = [*TINY, "--data-path", str(tmp_path / "data"), "--log-interval", "1", "--lr-decay-style", "constant"]
    one = [sys.executable, str(runner)]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(runner)]
    return one, two, env, flags


def _wait_for_log(proc, log_path, pattern: str) -> None:
    """Until the log holds ``pattern`` (the run is in its loop); fails if the run ends first or hangs."""
    deadline = time.monotonic() + HANG_S
    while time.monotonic() < deadline:
        if re.search(pattern, log_path.read_text()):
            return
        assert proc.poll() is None, f"the run ended before logging {pattern!r}:\n{log_path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {pattern!r} in the log: the run hung")


def _stop(cmd, env, log_path, sig, to_group: bool):
    """Start ``cmd``, wait for iteration 3, send ``sig``; returns (exit status, log, the pids seen, those alive)."""
    psutil = require("psutil", extra="megatron")

    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_log(proc, log_path, r"iteration 3/")
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        if to_group:
            os.killpg(proc.pid, sig)  # Ctrl-C at a terminal: the launcher's process group
        else:
            proc.send_signal(sig)
        proc.wait(timeout=HANG_S)
        procs = [psutil.Process(pid) for pid in family[1:] if psutil.pid_exists(pid)]
        _, alive = psutil.wait_procs(procs, timeout=HANG_S)
        alive = [p.pid for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode, log_path.read_text(), family, alive


def _stopped_at(log: str, name: str) -> int:
    found = re.search(rf"stopped at iteration (\d+) \({name}\): saved \S+iter_(\d+); continue", log)
    assert found, log[-3000:]
    assert found.group(1).lstrip("0") == found.group(2).lstrip("0")
    return int(found.group(1))


def _resume(one, env, flags, ckpt, iteration: int, log_path) -> str:
    """One plain process loads the stop's checkpoint and takes one more step."""
    cmd = [*one, *flags, "--load", str(ckpt), "--save", str(ckpt), "--train-iters", str(iteration + 1)]
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=HANG_S).returncode
    text = log_path.read_text()
    assert code == 0, text[-3000:]
    assert f"resumed from {ckpt} at iteration {iteration}" in text and f"iteration {iteration + 1}/" in text, text
    return text


@pytest.mark.slow
def test_megatron_launch_ctrl_c_under_torchrun_stops_both_ranks_with_a_final_checkpoint(launch, tmp_path):
    """Issue 20: Ctrl-C printed a KeyboardInterrupt traceback on every rank and wrote no checkpoint. Now torchrun
    forwards the SIGINT (its ranks are in their own sessions), both ranks finish the same step, write iter_N, exit;
    the checkpoint loads (at 1 rank: DP 2 -> 1)."""
    one, two, env, flags = launch
    ckpt = tmp_path / "ckpt"
    cmd = [*two, *flags, "--train-iters", "100000", "--save", str(ckpt)]
    code, log, family, alive = _stop(cmd, env, tmp_path / "run.log", signal.SIGINT, to_group=True)
    assert alive == [], f"processes outlived torchrun: {alive}"
    assert len(family) >= 3, family  # torchrun and its two ranks were seen
    assert code != 0  # torchrun's own status after a signal
    assert "KeyboardInterrupt" not in log, log[-3000:]
    iteration = _stopped_at(log, "SIGINT")
    assert iteration >= 3
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(iteration)
    assert (ckpt / f"iter_{iteration:07d}" / script.MANIFEST).is_file()
    assert sorted(p.name for p in ckpt.iterdir()) == [f"iter_{iteration:07d}", "latest_checkpointed_iteration.txt"]
    _resume(one, env, flags, ckpt, iteration, tmp_path / "resume.log")


@pytest.mark.slow
def test_megatron_launch_sigterm_stops_with_a_final_checkpoint_and_status_143(launch, tmp_path):
    """Issue 20: SIGTERM (a scheduler's stop) to a plain ``python`` run: the step finishes, iter_N is written, the
    exit status is 128 + 15, no child process (dist_checkpointing's writer) is left; the checkpoint loads."""
    one, _, env, flags = launch
    ckpt = tmp_path / "ckpt"
    cmd = [*one, *flags, "--train-iters", "100000", "--save", str(ckpt), "--save-interval", "2"]
    code, log, _, alive = _stop(cmd, env, tmp_path / "run.log", signal.SIGTERM, to_group=False)
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert alive == [], f"processes outlived the run: {alive}"
    iteration = _stopped_at(log, "SIGTERM")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(iteration)
    _resume(one, env, flags, ckpt, iteration, tmp_path / "resume.log")


def test_stop_request_close_puts_the_handlers_back():
    """engine/stops.py's StopRequest.close() (the script's loop can run more than once in one process); the
    engine never calls it, so its behaviour is unchanged."""
    from engine.stops import StopRequest

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop = StopRequest(watch_launcher=False)
    assert all(signal.getsignal(s) == stop._signal for s in before)
    os.kill(os.getpid(), signal.SIGTERM)  # recorded, not fatal
    assert stop.reason == "SIGTERM" and stop.exit_code == 128 + signal.SIGTERM
    stop.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_megatron_launch_nsisa_precision_and_routing_reach_the_optimizer(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--pisa-preconditioner", "nsisa", "--pisa-ns-dtype", "float32", "--pisa-routing-bytes", "4096"]
    options = script.pisa_options(script.parse_args(argv))
    assert (options["ns_dtype"], options["routing_bytes"]) == ("float32", 4096)
    assert "routing_bytes" not in script.pisa_options(script.parse_args(["--pisa-preconditioner", "nsisa"]))
