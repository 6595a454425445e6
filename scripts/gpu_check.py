#!/usr/bin/env python
"""The GPU check: everything that needs CUDA, in one command that ends inside 8 minutes on one H100/H200.

    python3 scripts/gpu_check.py --out "$OUT"          # on the GPU machine (no network), from the repository root
    python scripts/gpu_check.py --dry --out /tmp/dry    # its plumbing on CPU, tiny sizes (CI runs this)

Stages, each under its own time limit, each recorded whatever its outcome:

1. ``install``: the wheels in ``--wheels`` (default ``.whl``) into a private folder put on ``PYTHONPATH`` — the
   packages the GPU machine's image lacks (DeepSpeed, megatron-core and their needs; its torch, transformers,
   tensorboard, pytest and hypothesis are used as they are). Prepare the folder on a machine with pip access,
   for the GPU machine's Python (3.12): ``bash scripts/gpu_wheels.sh .whl`` (``.whl`` is git-ignored; carry it).
2. ``device``: what the GPU and torch are.
3. ``tests``: the ``gpu``-marked tests (``pytest -m gpu``).
4. ``step``: ``scripts/bench_step.py --device cuda`` (PISA sisa / default / without the check, fused AdamW and
   the rest on 100M GPT-2-small-shaped tensors), written to ``docs/benchmarks/step_time_cuda.md``.
5. ``e2e``: one-GPU training (``engine/train.py --backend single``, GPT-2 124M, fp32) with PISA (NSISA +
   AdamW), PISA sisa, fused AdamW and Muon + AdamW; tokens/s is the median of the engine's ``perf/tokens_per_s``
   after the warm-up steps; written to ``docs/benchmarks/e2e_gpu.md``.

``--out`` gets four files (``summary.json``, ``log.txt`` with every stage's log, the two pages), since only that
folder comes back from a lent machine, and at most 8 files. ``--dry`` runs the same stages on CPU with tiny sizes,
collects the gpu tests instead of running them and writes its pages only to ``--out``. Exit status: 0 when every
stage passed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E_OPTIMIZERS = {  # name on the page: engine flags
    "PISA (NSISA + AdamW)": ["--optimizer", "pisa"],
    "PISA sisa": ["--optimizer", "pisa", "--matrix-preconditioner", "sisa", "--other-preconditioner", "sisa"],
    "AdamW (fused)": ["--optimizer", "adamw"],
    "Muon + AdamW": ["--optimizer", "muon"],
}
FULL = {"limit": {"tests": 180, "step": 90, "e2e": 60}, "e2e": ["--size", "124M", "--batch-size", "8",
        "--block-size", "1024", "--max-steps", "30"], "warmup": 10, "step": ["--millions", "100"]}  # fmt: skip
DRY = {"limit": {"tests": 120, "step": 180, "e2e": 120}, "e2e": ["--size", "tiny", "--batch-size", "2",
       "--block-size", "32", "--max-steps", "4"], "warmup": 1,
       "step": ["--millions", "0.5", "--steps", "2", "--rounds", "1", "--ns-millions", "0.5"]}  # fmt: skip


class Check:
    def __init__(self, out: str, dry: bool):
        self.out, self.dry = out, dry
        self.work = tempfile.mkdtemp(prefix="pisa_gpu_check_")  # logs, runs, the wheels' site: only pages go to out
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
        self.summary: dict[str, dict] = {}

    def run(self, stage: str, cmd: list[str], limit: float, log: str | None = None) -> bool:
        """``cmd`` under ``limit`` seconds, its output in ``--out``/``log``; records the stage's outcome."""
        log = os.path.join(self.work, log or f"{stage}.log")
        start = time.monotonic()
        with open(log, "w") as f:
            try:
                done = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
                rc = done.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        secs = round(time.monotonic() - start, 1)
        self.summary.setdefault(stage, {"ok": True, "runs": []})
        self.summary[stage]["runs"].append({"cmd": " ".join(cmd), "rc": rc, "seconds": secs})
        self.summary[stage]["ok"] &= rc == 0
        print(f"[gpu_check] {stage}: {' '.join(cmd[1:4])} ... -> {rc} in {secs} s", flush=True)
        return rc == 0

    def install(self, wheels: str) -> None:
        found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
        if not found:
            self.summary["install"] = {"ok": True, "note": f"no wheels in {wheels}: using the installed packages"}
            return
        site = os.path.join(self.work, "site")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
        if self.run("install", [*pip, "--upgrade", "--target", site, *found], 300):
            self.env["PYTHONPATH"] += os.pathsep + site

    def device(self) -> None:
        code = (
            "import json, torch; c = torch.cuda.is_available(); print(json.dumps({'torch': torch.__version__, "
            "'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name() if c else 'cpu (no CUDA)'}))"
        )
        r = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        ok = r.returncode == 0 and (self.dry or "no CUDA" not in r.stdout)
        self.summary["device"] = {"ok": ok, **(json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr})}

    def tests(self, limit: float) -> None:
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
        self.run("tests", [*cmd, "--collect-only"] if self.dry else cmd, limit)

    def step(self, flags: list[str], limit: float) -> None:
        page = os.path.join(self.out, "step_time_cuda.md" if not self.dry else "step_time_dry.md")
        device = "cpu" if self.dry else "cuda"
        cmd = [sys.executable, "scripts/bench_step.py", "--device", device, "--output", page, *flags]
        if self.run("step", cmd, limit) and not self.dry:
            shutil.copy(page, os.path.join(ROOT, "docs", "benchmarks", "step_time_cuda.md"))

    def e2e(self, flags: list[str], warmup: int, limit: float) -> None:
        device = "cpu" if self.dry else "cuda"
        rows = {}
        for name, extra in E2E_OPTIMIZERS.items():
            tag = name.split()[0].lower() + str(len(rows))
            run_dir = os.path.join(self.work, f"e2e_{tag}")
            cmd = [sys.executable, "engine/train.py", "--backend", "single", "--device", device, *flags, *extra]
            cmd += ["--out-dir", run_dir, "--cache-dir", os.path.join(self.work, "corpus")]  # the corpus built once
            cmd += ["--eval-interval", "0", "--ckpt-interval", "0", "--log-interval", "1"]
            cmd += ["--no-progress"]
            if self.run("e2e", cmd, limit, log=f"e2e_{tag}.log"):
                rows[name] = tokens_per_s(os.path.join(run_dir, "tensorboard"), warmup)
            shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)  # the final checkpoint: GBs
        page = os.path.join(self.out, "e2e_gpu.md" if not self.dry else "e2e_dry.md")
        with open(page, "w") as f:
            f.write(e2e_page(rows, flags, self.summary.get("device", {})))
        if self.summary["e2e"]["ok"] and not self.dry:
            shutil.copy(page, os.path.join(ROOT, "docs", "benchmarks", "e2e_gpu.md"))
        self.summary["e2e"]["tokens_per_s"] = rows

    def collect_logs(self, path: str, lines: int = 150) -> None:
        """Every stage's log, the last ``lines`` lines each, in one file (a lent machine returns at most 8)."""
        with open(path, "w") as out:
            for log in sorted(glob.glob(os.path.join(self.work, "*.log"))):
                with open(log, errors="replace") as f:
                    tail = f.readlines()[-lines:]
                out.write(f"===== {os.path.basename(log)} (last {len(tail)} lines)\n{''.join(tail)}\n")
        shutil.rmtree(self.work, ignore_errors=True)


def tokens_per_s(logdir: str, warmup: int) -> float:
    """The median of ``perf/tokens_per_s`` over the steps after ``warmup`` (compilation, lazy state)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logdir, size_guidance={"scalars": 0})
    events.Reload()
    values = [e.value for e in events.Scalars("perf/tokens_per_s") if e.step > warmup]
    return statistics.median(values)


def e2e_page(rows: dict[str, float], flags: list[str], device: dict) -> str:
    base = rows.get("AdamW (fused)")
    lines = ["| optimizer | tokens/s | vs fused AdamW |", "|---|---:|---:|"]
    for name, value in rows.items():
        lines.append(f"| {name} | {value:,.0f} | {value / base:.3f}× |" if base else f"| {name} | {value:,.0f} | – |")
    return (
        "# One-GPU end-to-end throughput\n\n"
        f"Device: {device.get('device', '?')}, torch {device.get('torch', '?')} (CUDA {device.get('cuda', '?')}). "
        f"`engine/train.py --backend single` with `{' '.join(flags)}`, one run per optimizer, tokens/s the median of "
        "`perf/tokens_per_s` after the warm-up steps. Made by `python3 scripts/gpu_check.py --out DIR` "
        "(the whole GPU check; see its docstring).\n\n" + "\n".join(lines) + "\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for summary.json, logs and pages (created; $OUT on a lent GPU)")
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes, gpu tests collected only: the plumbing")
    p.add_argument("--wheels", default=os.path.join(ROOT, ".whl"), help="folder of wheels to install first")
    p.add_argument("--only", default="", help="comma-separated stages of: tests,step,e2e (default: all)")
    args = p.parse_args(argv)
    stages = [s for s in args.only.split(",") if s] or ["tests", "step", "e2e"]
    if set(stages) - {"tests", "step", "e2e"}:
        p.error(f"--only: unknown stage(s) {sorted(set(stages) - {'tests', 'step', 'e2e'})}")
    os.makedirs(args.out, exist_ok=True)
    plan = DRY if args.dry else FULL
    check = Check(os.path.abspath(args.out), args.dry)
    started = time.monotonic()
    check.install(args.wheels)
    check.device()
    if not check.summary["device"]["ok"]:
        print(f"[gpu_check] no CUDA device: {check.summary['device']}; use --dry on CPU", flush=True)
    else:
        if "tests" in stages:
            check.tests(plan["limit"]["tests"])
        if "step" in stages:
            check.step(plan["step"], plan["limit"]["step"])
        if "e2e" in stages:
            check.e2e(plan["e2e"], plan["warmup"], plan["limit"]["e2e"])
    check.summary["seconds"] = round(time.monotonic() - started, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(check.summary, f, indent=2)
    check.collect_logs(os.path.join(args.out, "log.txt"))
    ok = all(v["ok"] for k, v in check.summary.items() if isinstance(v, dict))
    print(f"[gpu_check] {'passed' if ok else 'FAILED'} in {check.summary['seconds']} s; {args.out}/summary.json")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
