#!/usr/bin/env python
"""Language-model defaults: a σ/ρ sweep for NSISA (+ auxiliary AdamW) and the comparison with tuned AdamW.

Tiny GPT-2 (2 layers × 128, engine/models.py "tiny") on the embedded byte-level corpus of the Python standard
library (engine/data.py), batch 16 × 128 tokens, single process, one thread per run. Validation loss on the
engine's fixed held-out windows every ``--eval-every`` steps.

    python scripts/bench_lm.py sweep      # one seed over the σ, ρ (and aux lr) grid: picks the default
    python scripts/bench_lm.py compare    # AdamW (best of --adamw-lrs) vs the default, --seeds seeds each

``compare`` reports the step at which the default first reaches AdamW's best final validation loss, as a fraction
of AdamW's steps, and writes docs/benchmarks/lm_defaults.md and lm_val_loss.png. Results are cached in
``--results`` (JSON lines), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_one(spec: dict) -> dict:
    """Train one configuration and return its validation curve."""
    import torch

    torch.set_num_threads(1)
    import pisa_zero
    from engine.data import Batches, load_corpus, val_windows
    from engine.models import build_model

    corpus = load_corpus()
    torch.manual_seed(spec["seed"])
    model = build_model("gpt2", "tiny", vocab_size=corpus.vocab_size, block_size=spec["block_size"])
    if spec["optimizer"] == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    else:
        groups = pisa_zero.param_groups(
            model,
            other_preconditioner=spec["other"],
            matrix_options=dict(sigma=spec["sigma"], rho=spec["rho"]),
            other_options=dict(lr=spec["aux_lr"]) if spec["other"] == "adamw" else dict(sigma=1.0, rho=100.0),
        )
        optimizer = pisa_zero.PISA(groups, skip_nonfinite=False)
    batches = Batches(corpus.train, spec["block_size"], spec["batch_size"], seed=spec["seed"], stream=0)
    held_out = val_windows(corpus.val, spec["block_size"], spec["eval_windows"])

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            logits = model(held_out[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), held_out[:, 1:].flatten())
        model.train()
        return loss.item()

    curve, start = [], time.time()
    for step in range(1, spec["steps"] + 1):
        x, y = batches.get(step)
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            curve.append((step, val_loss()))
    return {**spec, "curve": curve, "seconds": time.time() - start}


def key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in sorted(spec) if k not in ("curve", "seconds")}, sort_keys=True)


def run_all(specs: list[dict], results_path: Path, jobs: int) -> list[dict]:
    done = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            result = json.loads(line)
            done[key(result)] = result
    todo = [s for s in specs if key(s) not in done]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to do with {jobs} processes", flush=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(jobs) as pool, results_path.open("a") as out:
        for i, result in enumerate(pool.imap_unordered(run_one, todo), 1):
            out.write(json.dumps(result) + "\n")
            out.flush()
            done[key(result)] = result
            print(
                f"[{i}/{len(todo)}] {describe(result)}: final val {result['curve'][-1][1]:.3f} "
                f"({result['seconds']:.0f}s)",
                flush=True,
            )
    return [done[key(s)] for s in specs]


def describe(spec: dict) -> str:
    if spec["optimizer"] == "adamw":
        return f"AdamW lr={spec['lr']:g} seed={spec['seed']}"
    other = f"aux AdamW lr={spec['aux_lr']:g}" if spec["other"] == "adamw" else "sisa rest"
    return f"NSISA σ={spec['sigma']:g} ρ={spec['rho']:g} + {other} seed={spec['seed']}"


def base_spec(args, **kw) -> dict:
    spec = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        seed=0,
        optimizer="pisa",
        other="adamw",
        sigma=30.0,
        rho=100.0,
        aux_lr=3e-3,
        lr=None,
    )
    spec.update(kw)
    return spec


def sweep(args) -> None:
    specs = [
        base_spec(args, sigma=s, rho=r, aux_lr=a) for s, r, a in itertools.product(args.sigmas, args.rhos, args.aux_lrs)
    ]
    run_all(specs, args.results, args.jobs)
    # Report every sweep point in the cache (earlier sweeps with other grids included), best first.
    same = base_spec(args)
    results = [
        r
        for r in map(json.loads, args.results.read_text().splitlines())
        if r["optimizer"] == "pisa" and r["seed"] == 0 and all(r[k] == same[k] for k in ("steps", "batch_size"))
    ]
    results.sort(key=lambda r: r["curve"][-1][1])
    lines = [f"| σ | ρ | aux AdamW lr | val loss @{args.steps} |", "|---:|---:|---:|---:|"]
    lines += [f"| {r['sigma']:g} | {r['rho']:g} | {r['aux_lr']:g} | {r['curve'][-1][1]:.3f} |" for r in results]
    table = "\n".join(lines)
    print(table)
    (args.output.parent / "lm_sweep.md").write_text(
        "# NSISA σ/ρ sweep on the embedded corpus (seed 0)\n\n"
        "Commands: `python scripts/bench_lm.py sweep` (σ ∈ {10, 30, 80} × ρ ∈ {30, 100, 300}), then "
        "`python scripts/bench_lm.py sweep --sigmas 20 40 --rhos 100` and "
        "`python scripts/bench_lm.py sweep --sigmas 30 --rhos 100 --aux-lrs 1e-3 1e-2` (tiny GPT-2, batch "
        f"{args.batch_size}×{args.block_size}, 1 thread per run)\n\n{table}\n"
    )


def first_step_reaching(curve, target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def compare(args) -> None:
    adamw = [base_spec(args, optimizer="adamw", lr=lr, seed=s) for lr in args.adamw_lrs for s in args.seeds]
    ours = [base_spec(args, sigma=args.sigma, rho=args.rho, aux_lr=args.aux_lr, seed=s) for s in args.seeds]
    results = run_all(adamw + ours, args.results, args.jobs)
    by_lr = {lr: [r for r in results[: len(adamw)] if r["lr"] == lr] for lr in args.adamw_lrs}
    mean_final = {lr: statistics.mean(r["curve"][-1][1] for r in rs) for lr, rs in by_lr.items()}
    best_lr = min(mean_final, key=mean_final.get)
    rows, fractions = [], []
    for seed in args.seeds:
        baseline = next(r for r in by_lr[best_lr] if r["seed"] == seed)
        target = baseline["curve"][-1][1]
        adamw_steps = first_step_reaching(baseline["curve"], target)
        mine = next(r for r in results[len(adamw) :] if r["seed"] == seed)
        reached = first_step_reaching(mine["curve"], target)
        fraction = (reached / adamw_steps) if reached else float("inf")
        fractions.append(fraction)
        rows.append(
            f"| {seed} | {target:.3f} | {adamw_steps} | {mine['curve'][-1][1]:.3f} | "
            f"{reached if reached else 'not reached'} | {fraction:.2f}× |"
        )
    lines = [
        "# NSISA defaults vs tuned AdamW on the embedded corpus",
        "",
        f"Command: `python scripts/bench_lm.py compare --steps {args.steps} --seeds "
        f"{' '.join(map(str, args.seeds))}`  ",
        f"Model: tiny GPT-2 (2 layers × 128, byte vocabulary), batch {args.batch_size} × {args.block_size} tokens, "
        f"{args.steps} steps, validation every {args.eval_every} steps on {args.eval_windows} fixed held-out windows; "
        "single process, one thread per run, CPU.",
        "",
        "AdamW (betas 0.9/0.95, no weight decay), final validation loss averaged over seeds:",
        "",
        f"| AdamW lr | mean val loss @{args.steps} |",
        "|---:|---:|",
        *[f"| {lr:g}{' (best)' if lr == best_lr else ''} | {loss:.3f} |" for lr, loss in mean_final.items()],
        "",
        f"Default PISA: NSISA σ={args.sigma:g}, ρ={args.rho:g} on block matrices + auxiliary AdamW lr={args.aux_lr:g} "
        "on embeddings, norms and biases (`pisa_zero.param_groups`).",
        "",
        "| seed | AdamW best val loss | AdamW steps | PISA val loss @end | PISA steps to reach it | fraction |",
        "|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Worst seed: PISA reaches AdamW's best validation loss in {max(fractions):.2f}× AdamW's steps "
        "(the goal is ≤ 0.7×).",
        "",
        "![validation loss](lm_val_loss.png)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)
    plot(by_lr[best_lr], [r for r in results[len(adamw) :]], best_lr, args.output.parent / "lm_val_loss.png")


def plot(adamw_runs, pisa_runs, best_lr, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for runs, label, color in [
        (adamw_runs, f"AdamW lr={best_lr:g}", "tab:blue"),
        (pisa_runs, "PISA NSISA + aux AdamW (default)", "tab:red"),
    ]:
        for i, r in enumerate(runs):
            steps, losses = zip(*r["curve"])
            ax.plot(steps, losses, color=color, alpha=0.8, label=label if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("tiny GPT-2 on the Python stdlib corpus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["sweep", "compare"], help="sweep the grid, or compare the default with AdamW")
    parser.add_argument("--steps", type=int, default=300, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between validation evaluations")
    parser.add_argument("--eval-windows", type=int, default=64, help="held-out windows in the validation set")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds for compare")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="AdamW lr grid")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[10.0, 30.0, 80.0], help="σ grid (sweep)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[30.0, 100.0, 300.0], help="ρ grid (sweep)")
    parser.add_argument("--aux-lrs", type=float, nargs="+", default=[3e-3], help="auxiliary AdamW lr grid (sweep)")
    parser.add_argument("--sigma", type=float, default=30.0, help="default σ under test (compare)")
    parser.add_argument("--rho", type=float, default=100.0, help="default ρ under test (compare)")
    parser.add_argument("--aux-lr", type=float, default=3e-3, help="default auxiliary AdamW lr (compare)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs")
    parser.add_argument("--results", type=Path, default=Path(".cache/bench_lm.jsonl"), help="result cache")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks/lm_defaults.md"), help="report")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    sweep(args) if args.mode == "sweep" else compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
