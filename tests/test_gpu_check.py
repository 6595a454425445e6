"""scripts/gpu_check.py's plumbing on CPU (--dry): every stage runs and is recorded, the pages name every
optimizer, and only the four files a lent machine can return land in --out; scripts/gpu_wheels.sh parses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_exercises_every_stage(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "--dry", "--out", str(out), "--wheels", str(tmp_path / "none")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["e2e_dry.md", "log.txt", "step_time_dry.md", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary[s]["ok"] for s in ("install", "device", "tests", "step", "e2e")), summary
    assert "--collect-only" in summary["tests"]["runs"][0]["cmd"]  # dry: the gpu tests are collected, not run
    assert len(summary["e2e"]["runs"]) == len(gpu_check.E2E_OPTIMIZERS)
    rates = summary["e2e"]["tokens_per_s"]
    assert set(rates) == set(gpu_check.E2E_OPTIMIZERS) and all(v > 0 for v in rates.values())
    page = (out / "e2e_dry.md").read_text()
    assert all(f"| {name} |" in page for name in gpu_check.E2E_OPTIMIZERS)
    assert "| torch AdamW fused |" in (out / "step_time_dry.md").read_text()
    assert "===== tests.log" in (out / "log.txt").read_text()


def test_unknown_stage_is_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--dry", "--out", str(tmp_path / "x"), "--only", "tests,bench"])
    assert "unknown stage(s) ['bench']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_wheels_script_parses_and_wheels_are_ignored():
    subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_wheels.sh")], check=True)
    ignored = subprocess.run(["git", "check-ignore", "-q", ".whl/x.whl"], cwd=ROOT)
    assert ignored.returncode == 0, ".whl/ must be git-ignored (the wheels travel as a carried path)"
