"""scripts/bench_heterogeneity.py end to end in seconds: every method runs, the page is written, bytes fall by H."""

import importlib.util
import json
import math
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_heterogeneity.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_heterogeneity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


def test_smoke_study_writes_the_page(tmp_path):
    bench = load_script()
    page = bench.smoke(tmp_path)
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert {(r["task"], r["method"], r["inner"], r["H"]) for r in results} == {
        (task, m, inner, H) for task in ("digits", "text") for m, inner, H in bench.configurations(task) if H <= 4
    }
    for r in results:
        assert r["curve"] and all(math.isfinite(point["loss"]) for point in r["curve"])
        assert r["curve"][-1]["round"] == 4 // r["H"]
    # one all-reduce of the parameters per round: H local steps send 1/H of the every-step bytes
    by = {(r["task"], r["method"], r["H"]): r["bytes_per_agent"] for r in results}
    for task in ("digits", "text"):
        assert by[(task, "pisa", 4)] * 4 == by[(task, "pisa", 1)] == by[(task, "sync", 1)]
    assert (tmp_path / "heterogeneity.png").stat().st_size > 0
    for label in ("FedAvg, AdamW inner", "PISA local steps, prox_sigma = c·σ/H", "Muon, gradients averaged every step"):
        assert label in page
