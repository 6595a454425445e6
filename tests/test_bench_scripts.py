"""The benchmark scripts still run end to end (tiny settings, seconds): they write their page from real runs.

Nothing here is timed: the pages' numbers are the benchmarks' business (docs/benchmarks/README.md)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "scripts")
sys.path.insert(0, ROOT)
sys.path.insert(0, SCRIPTS)


def run_script(name, *argv, timeout=540):  # generous for a loaded 2-core machine (83 s alone); pytest's is 600
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, os.path.join(SCRIPTS, name), *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_bench_lm_tiny_grid_widens_and_writes_the_page(tmp_path):
    import bench_lm

    results, page = tmp_path / "runs.jsonl", tmp_path / "lm.md"
    tiny = ["--layers", "1", "--width", "16", "--heads", "2", "--steps", "6", "--warmup-steps", "2"]
    tiny += ["--eval-every", "3", "--eval-windows", "2", "--block-size", "16", "--batch-size", "2", "--jobs", "1"]
    argv = [*tiny, "--seeds", "0", "1", "--adamw-lrs", "1e-3", "1e-2", "--muon-lrs", "1e-3", "1e-2"]
    argv += ["--sigmas", "10", "100", "--max-widen", "1", "--results", str(results), "--output", str(page)]
    assert bench_lm.main(argv) == 0
    text = page.read_text()
    for label in ("AdamW", "Muon + AdamW", "PISA (NSISA + AdamW)"):
        assert f"- {label}: " in text
    assert page.with_suffix(".png").stat().st_size > 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    # a 2-point grid always has its best on an edge: each grid was widened by one point
    for opt in ("adamw", "muon", "pisa"):
        assert len({(r["lr"], r["sigma"]) for r in rows if r["optimizer"] == opt and r["seed"] == 0}) == 3
    assert {r["seed"] for r in rows} == {0, 1}
    # rerunning reuses the cache: nothing new is trained, the same page comes out
    assert bench_lm.main([*argv, "--cached-only"]) == 0
    assert len(results.read_text().splitlines()) == len(rows)


def test_bench_lm_rejects_steps_not_above_warmup(tmp_path):
    import bench_lm

    with pytest.raises(SystemExit, match="--steps=5"):
        bench_lm.main(["--steps", "5", "--warmup-steps", "5", "--results", str(tmp_path / "r.jsonl")])


@pytest.mark.slow
def test_bench_e2e_tiny_fsdp2_writes_the_page(tmp_path):
    page = tmp_path / "e2e.md"
    tiny = ["--layers", "1", "--width", "16", "--heads", "2", "--batch-size", "2", "--block-size", "16"]
    tiny += ["--rounds", "2", "--warmup", "1", "--steps", "1", "--implementation", "foreach"]
    run_script(
        "bench_e2e.py",
        *tiny,
        "--backends",
        "fsdp2-A",
        "--optimizers",
        "sisa",
        "adamw",
        "--results",
        str(tmp_path / "r.jsonl"),
        "--output",
        str(page),
    )
    text = page.read_text()
    assert "| FSDP2 mode A (2 shards) | PISA sisa |" in text and "| FSDP2 mode A (2 shards) | AdamW |" in text
    assert "sisa tokens/s" in text and "not built" not in text


@pytest.mark.slow
def test_bench_scale_tiny_pisa_writes_the_page(tmp_path):
    page = tmp_path / "scale.md"
    run_script(
        "bench_scale.py",
        "--sizes",
        "tiny",
        "--optimizers",
        "pisa",
        "--steps",
        "1",
        "--implementation",
        "foreach",
        "--results",
        str(tmp_path / "r.jsonl"),
        "--output",
        str(page),
        "--margin-gib",  # the tiny model needs little; the 4 GiB default made the test depend on the machine's load
        "0",
    )
    assert "| tiny |" in page.read_text()


@pytest.mark.slow
def test_bench_scale_nvme_offload_runs_the_shipped_nvme_config(tmp_path):
    page = tmp_path / "scale_nvme.md"
    argv = ["--sizes", "tiny", "--optimizers", "sisa", "--steps", "1", "--offload", "nvme", "--margin-gib", "0"]
    argv += ["--nvme-path", str(tmp_path / "swap"), "--results", str(tmp_path / "r.jsonl"), "--output", str(page)]
    run_script("bench_scale.py", *argv)
    text = page.read_text()
    assert "NVME offload" in text and "configs/pisa_zero3_nvme.json" in text and "| tiny |" in text
    assert "PISA (sisa + AdamW)" in text and not (tmp_path / "swap" / "tiny_sisa").exists()  # removed after the run


def test_bench_scale_skips_a_size_that_does_not_fit(tmp_path, monkeypatch):
    import bench_scale

    monkeypatch.setattr(bench_scale, "mem_available_gib", lambda: 1.0)
    page = tmp_path / "scale.md"
    argv = ["--sizes", "1B", "--results", str(tmp_path / "r.jsonl"), "--output", str(page)]
    assert bench_scale.main(argv) == 0
    text = page.read_text()
    assert "memory safety" in text and "1B" in text and "MemAvailable was 1.0 GiB" in text
