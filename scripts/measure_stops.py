"""What each stop does under each launcher: the table in docs/engine.md ("Stops").

    python scripts/measure_stops.py [--launchers single,deepspeed,torchrun] [--work /tmp/stops]

For each launcher it starts engine/train.py (2 CPU ranks; tiny model, a checkpoint every 2 steps), waits for the
first checkpoint, then sends either Ctrl-C (SIGINT to the whole process group, as a terminal does) or SIGTERM to the
top process only (as a job scheduler does), and prints one JSON line: the top process's exit status (negative: killed
by that signal), seconds until it and every rank are gone, the checkpoint named by ``latest`` before and after, and
the rank's "stopped at step" line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--block-size", "64", "--batch-size", "8", "--eval-windows", "16", "--no-progress", "--warmup-steps", "3"]
TINY += ["--implementation", "foreach", "--max-steps", "100000", "--ckpt-interval", "2", "--eval-interval", "0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(launcher: str, out: str, cache: str) -> list[str]:
    flags = [*TINY, "--cache-dir", cache, "--out-dir", out]
    if launcher == "deepspeed":
        ds = ["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), "engine/train.py"]
        return [*ds, "--deepspeed_config", "configs/pisa_zero3.json", *flags]
    if launcher == "torchrun":
        return ["torchrun", "--standalone", "--nproc_per_node", "2", "engine/train.py", "--backend", "fsdp2", *flags]
    return [sys.executable, "engine/train.py", *flags]


def ranks_of(top: psutil.Process, launcher: str) -> list[psutil.Process]:
    if launcher == "single":
        return [top]
    children = top.children(recursive=True)
    if launcher == "deepspeed":
        return [c for c in children if any(a.startswith("--local_rank") for a in c.cmdline())]
    return [c for c in children if "engine/train.py" in c.cmdline() and "torchrun" not in " ".join(c.cmdline()[:2])]


def measure(launcher: str, how: str, work: str, env: dict) -> dict:
    out = os.path.join(work, f"{launcher}-{how}")
    shutil.rmtree(out, ignore_errors=True)
    latest = os.path.join(out, "checkpoints", "latest")
    with open(out + ".log", "w") as log:
        top = subprocess.Popen(
            command(launcher, out, os.path.join(work, "cache")),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    while not (os.path.exists(latest) and open(latest).read().strip() >= "step_000002"):
        if top.poll() is not None:
            raise RuntimeError(open(out + ".log").read()[-3000:])
        time.sleep(0.2)
    ranks = ranks_of(psutil.Process(top.pid), launcher)
    before, started = open(latest).read().strip(), time.time()
    if how == "ctrl-c":
        os.killpg(top.pid, signal.SIGINT)
    else:
        top.send_signal(signal.SIGTERM)
    code = top.wait(timeout=300)
    top_s = time.time() - started
    _, alive = psutil.wait_procs([r for r in ranks if r.pid != top.pid], timeout=120)
    ranks_s = time.time() - started
    for r in alive:
        r.kill()
    with open(out + ".log") as f:
        text = f.read()
    return dict(
        launcher=launcher,
        signal=how,
        top_status=code,
        top_gone_s=round(top_s, 1),
        ranks_gone_s=round(ranks_s, 1),
        ranks_alive_after_120s=len(alive),
        latest_before=before,
        latest_after=open(latest).read().strip(),
        stopped=[line for line in text.splitlines() if "stopped at step" in line][:1],
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--launchers", default="single,deepspeed,torchrun", help="comma-separated")
    p.add_argument("--work", default="/tmp/pisa_zero_stops", help="scratch folder (runs and logs)")
    args = p.parse_args()
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for launcher in args.launchers.split(","):
        for how in ("ctrl-c", "sigterm-top"):
            print(json.dumps(measure(launcher, how, args.work, env)), flush=True)


if __name__ == "__main__":
    main()
