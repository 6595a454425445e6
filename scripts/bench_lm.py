#!/usr/bin/env python
"""Convergence: PISA vs tuned AdamW and tuned Muon on a 4-layer GPT-2, same data, same warm-up + cosine schedule.

    python scripts/bench_lm.py                         # the page: docs/benchmarks/lm_convergence.md (+ PNG)
    python scripts/bench_lm.py --data ~/my_text --output my_convergence.md    # the same on your own text

Every optimizer gets the same tuning effort: one scalar on a factor-2 grid (at least ``--grid-points`` points,
widened one point at a time while the best is on an edge), then ``--seeds`` seeds at its best point:

- AdamW (torch, fused when available; betas 0.9/0.95, no weight decay) on every parameter: lr;
- Muon (``torch.optim.Muon``, Nesterov 0.95, 5 Newton–Schulz steps, ``adjust_lr_fn="match_rms_adamw"``, no weight
  decay) on exactly the matrices ``pisa_zero.param_groups`` puts on NSISA, AdamW (lr ``--aux-lr``) on the rest: lr;
- PISA: NSISA on those matrices (ρ = ``--rho``, the shipped 100), auxiliary AdamW (lr ``--aux-lr``) on the rest: σ.

Every run: lr multiplied by the engine's schedule (linear warm-up over ``--warmup-steps``, cosine to 0.1× at the
end; PISA's σ and ρ scale by lr_ref/lr as in engine/train.py), batch ``--batch-size`` × ``--block-size`` tokens,
validation loss on fixed held-out windows every ``--eval-every`` steps, one process and one thread per run.
Results are cached in ``--results`` (JSON lines, keyed by every setting), so a rerun resumes where it stopped and
regenerating the page after a finished run costs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OPTIMIZERS = ("adamw", "muon", "pisa")
LABELS = {"adamw": "AdamW", "muon": "Muon + AdamW", "pisa": "PISA (NSISA + AdamW)"}
KNOB = {"adamw": "lr", "muon": "lr", "pisa": "sigma"}  # the one tuned scalar of each optimizer


def lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """engine/train.py's schedule: linear warm-up, then cosine from 1 to ``floor`` at the last step."""
    if step <= warmup:
        return step / max(warmup, 1)
    progress = min(1.0, (step - warmup) / max(steps - warmup, 1))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build(spec: dict):
    """(model, optimizers, reference lr of every group) for one run."""
    import torch
    from transformers import GPT2LMHeadModel

    import pisa_zero
    from engine.models import gpt2_config

    torch.manual_seed(spec["seed"])
    config = gpt2_config(
        spec["vocab_size"], spec["block_size"], width=spec["width"], layers=spec["layers"], heads=spec["heads"]
    )
    model = GPT2LMHeadModel(config)
    matrices, others = (g["params"] for g in pisa_zero.param_groups(model))  # NSISA's matrices, the rest
    adamw_kw = dict(betas=(0.9, 0.95), weight_decay=0.0)
    if spec["optimizer"] == "adamw":
        optimizers = [torch.optim.AdamW(model.parameters(), lr=spec["lr"], **adamw_kw)]
    elif spec["optimizer"] == "muon":
        optimizers = [
            torch.optim.Muon(matrices, lr=spec["lr"], weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
            torch.optim.AdamW(others, lr=spec["aux_lr"], **adamw_kw),
        ]
    else:
        groups = pisa_zero.param_groups(
            model,
            matrix_options=dict(sigma=spec["sigma"], rho=spec["rho"]),
            other_options=dict(lr=spec["aux_lr"]),
        )
        optimizers = [pisa_zero.PISA(groups, skip_nonfinite=False, implementation="foreach")]  # no compile time
    for opt in optimizers:
        for g in opt.param_groups:
            g.setdefault("lr_ref", g["lr"])
    return model, optimizers


def run_one(spec: dict) -> dict:
    """Train one configuration; return its validation curve [(step, loss)] and its wall time."""
    import torch

    torch.set_num_threads(1)
    from engine.data import Batches, load_corpus, val_windows

    corpus = load_corpus(spec["data"])
    model, optimizers = build({**spec, "vocab_size": corpus.vocab_size})
    batches = Batches(corpus.train, spec["block_size"], spec["batch_size"], seed=spec["seed"], stream=0)
    held_out = val_windows(corpus.val, spec["block_size"], spec["eval_windows"])
    loss_fn = torch.nn.functional.cross_entropy

    def val_loss() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(
                loss_fn(model(w[:, :-1]).logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
                for w in held_out.split(16)
            )
        model.train()
        return total / held_out[:, 1:].numel()

    curve, start = [], time.time()
    for step in range(1, spec["steps"] + 1):
        factor = lr_factor(step, spec["steps"], spec["warmup"])
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["lr_ref"] * factor
        x, y = batches.get(step)
        loss = loss_fn(model(x).logits.flatten(0, 1), y.flatten())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):  # diverged: the rest of the curve is inf
            curve += [(s, float("inf")) for s in range(step, spec["steps"] + 1) if s % spec["eval_every"] == 0]
            break
        if step % spec["eval_every"] == 0 or step == spec["steps"]:
            curve.append((step, val_loss()))
            save_partial(spec, curve)
    return {**spec, "curve": curve, "seconds": time.time() - start}


def partial_path(spec: dict) -> Path | None:
    """Where an unfinished run keeps its curve so far (``$BENCH_LM_PARTIAL``, set by main), or None."""
    folder = os.environ.get("BENCH_LM_PARTIAL")
    return Path(folder) / (hashlib.sha1(key(spec).encode()).hexdigest()[:16] + ".json") if folder else None


def save_partial(spec: dict, curve) -> None:
    path = partial_path(spec)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({**spec, "curve": curve}))
        os.replace(tmp, path)


def key(spec: dict) -> str:
    return json.dumps({k: spec[k] for k in sorted(spec) if k not in ("curve", "seconds")}, sort_keys=True)


class Runner:
    """Runs specs (``jobs`` processes, or in this process when 1) and caches every result as one JSON line."""

    def __init__(self, path: Path, jobs: int, cached_only: bool = False):
        self.path, self.jobs, self.done, self.cached_only = path, jobs, {}, cached_only
        self.missing: dict[str, dict] = {}  # key -> spec of the runs not run (cached_only)
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    result = json.loads(line)
                    self.done[key(result)] = result

    def run(self, specs: list[dict]) -> list[dict | None]:
        """The results of ``specs`` in order; None for those not run (``cached_only``)."""
        finished = {}
        for r in self.done.values():
            finished[r["optimizer"]] = finished.get(r["optimizer"], 0) + 1
        todo = interleave(list({key(s): s for s in specs if key(s) not in self.done}.values()), finished)
        print(f"{len(specs)} runs: {len(specs) - len(todo)} cached, {len(todo)} to run", flush=True)
        if todo and self.cached_only:
            self.missing.update({key(s): s for s in todo})
        elif todo:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.jobs == 1:
                results = map(run_one, todo)
                pool = None
            else:
                pool = mp.get_context("spawn").Pool(min(self.jobs, len(todo)))
                results = pool.imap_unordered(run_one, todo)
            with self.path.open("a") as out:
                for i, result in enumerate(results, 1):
                    out.write(json.dumps(result) + "\n")
                    out.flush()
                    self.done[key(result)] = result
                    print(
                        f"  [{i}/{len(todo)}] {describe(result)}: val {final(result):.4f} ({result['seconds']:.0f} s)",
                        flush=True,
                    )
            if pool is not None:
                pool.close()
                pool.join()
        return [self.done.get(key(s)) for s in specs]


def interleave(specs: list[dict], finished: dict[str, int]) -> list[dict]:
    """Run order: the optimizers in turn — the one with the fewest finished runs first — each grid from its middle
    out, so that a run stopped early (a shared machine, a deadline) has the likeliest-best points of every
    optimizer rather than all of one."""
    queues = {}
    for s in specs:
        queues.setdefault(s["optimizer"], []).append(s)
    order = []
    for o, q in queues.items():
        ranked = sorted(q, key=lambda s, o=o: s[KNOB[o]])
        mid = (len(q) - 1) / 2
        middle_out = [s for _, s in sorted(enumerate(ranked), key=lambda item, mid=mid: abs(item[0] - mid))]
        order += [(finished.get(o, 0) + i, OPTIMIZERS.index(o), s) for i, s in enumerate(middle_out)]
    return [s for *_, s in sorted(order, key=lambda item: item[:2])]


def describe(spec: dict) -> str:
    knob = KNOB[spec["optimizer"]]
    return f"{LABELS[spec['optimizer']]} {knob}={spec[knob]:g} seed={spec['seed']}"


def final(result: dict) -> float:
    return result["curve"][-1][1]


def spec_for(args, optimizer: str, value: float, seed: int) -> dict:
    spec = dict(
        data=args.data,
        layers=args.layers,
        width=args.width,
        heads=args.heads,
        steps=args.steps,
        warmup=args.warmup_steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        seed=seed,
        optimizer=optimizer,
        aux_lr=None if optimizer == "adamw" else args.aux_lr,
        rho=args.rho if optimizer == "pisa" else None,
        lr=None,
        sigma=None,
    )
    spec[KNOB[optimizer]] = value
    return spec


def tune(args, runner: Runner, initial: dict) -> tuple[dict, dict]:
    """Best value of each optimizer's knob on the first seed: its grid, widened by a factor of 2 at a time while the
    best is on an edge (every optimizer's next points run together, so the processes stay busy)."""
    grids = {o: sorted(v) for o, v in initial.items()}
    best, losses = {}, {}
    for _ in range(args.max_widen + 1):
        specs = [spec_for(args, o, v, args.seeds[0]) for o in OPTIMIZERS for v in grids[o]]
        results = {key(s): r for s, r in zip(specs, runner.run(specs)) if r is not None}
        edge = False
        for o in OPTIMIZERS:
            found = {v: results.get(key(spec_for(args, o, v, args.seeds[0]))) for v in grids[o]}
            losses[o] = {v: final(r) for v, r in found.items() if r is not None}
            if not losses[o] or len(losses[o]) < len(found):  # --cached-only and not all run yet: no widening
                if losses[o]:
                    best[o] = min(losses[o], key=losses[o].get)
                continue
            best[o] = min(losses[o], key=losses[o].get)
            if best[o] == grids[o][0]:
                grids[o].insert(0, grids[o][0] / 2)
            elif best[o] == grids[o][-1]:
                grids[o].append(grids[o][-1] * 2)
            else:
                continue
            edge = True
        if not edge:
            break
    for o in best:
        if best[o] in (min(losses[o]), max(losses[o])):
            print(f"warning: {o} best {KNOB[o]}={best[o]:g} is still on the edge of its grid", flush=True)
    return best, losses


def first_step_reaching(curve, target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def params_of(args) -> int:
    from engine.models import count_parameters

    model, _ = build(spec_for(args, "adamw", 1e-3, 0) | {"vocab_size": 256})
    return count_parameters(model)


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    """The seeds' mean validation curve (every run evaluates at the same steps)."""
    return [(points[0][0], statistics.mean(p[1] for p in points)) for points in zip(*(r["curve"] for r in runs))]


def report(args, grids, best, seeds, n_params: int, corpus_note: str, missing: int) -> str:
    present = [o for o in OPTIMIZERS if seeds.get(o)]
    means = {o: statistics.mean(map(final, seeds[o])) for o in present}
    spreads = {o: (min(map(final, seeds[o])), max(map(final, seeds[o]))) for o in present}
    baselines = [o for o in ("adamw", "muon") if o in present]
    baseline = min(baselines, key=means.get) if baselines else None

    def knob(o, v):
        return f"{'σ' if o == 'pisa' else 'lr'}={v:g}"

    seed_list = " ".join(map(str, args.seeds))
    lines = [
        "# Convergence: PISA vs tuned AdamW and tuned Muon",
        "",
        f"Command: `{args.command}`  ",
        f"Model: GPT-2 from a config, {args.layers} layers × {args.width} ({args.heads} heads), tied embeddings, "
        f"vocabulary 256 (bytes), {n_params / 1e6:.2f}M parameters. Data: {corpus_note}. Batch {args.batch_size} × "
        f"{args.block_size} tokens, {args.steps} steps, the same schedule for everyone (linear warm-up "
        f"{args.warmup_steps} steps, cosine to 0.1×), validation loss (nats/byte) on {args.eval_windows} fixed "
        f"held-out windows every {args.eval_every} steps. One process, one thread per run, CPU (2 cores shared with "
        "other work: wall times vary, losses do not).",
        "",
        "Equal tuning effort: one scalar per optimizer on a factor-2 grid (seed 0), widened while the best was on an "
        f"edge; then seeds {seed_list} at each best point. Muon (`torch.optim.Muon`, "
        '`adjust_lr_fn="match_rms_adamw"`, no weight decay) runs on exactly the matrices `pisa_zero.param_groups` '
        "gives NSISA; Muon and PISA both use "
        f"AdamW lr {args.aux_lr:g} (betas 0.9/0.95) on embeddings, norms and biases; AdamW alone uses betas "
        f"0.9/0.95, no weight decay. PISA: ρ = {args.rho:g} (the shipped value), σ tuned.",
        "",
    ]
    if missing:
        lines += [
            f"**Partial results** ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): {missing} planned runs had "
            "not finished when this page was written; rerunning the command completes them (finished runs are "
            "cached) and widens a grid whose best is still on an edge.",
            "",
        ]
    if baseline:
        target = means[baseline]
        lines += [
            f"## Result (seeds at each best point; target: {LABELS[baseline]}'s mean final loss {target:.4f})",
            "",
            "| optimizer | best setting | seeds | final val loss, mean | min – max | first step the seeds' mean "
            "curve reaches the target |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for o in present:
            lo, hi = spreads[o]
            reached = first_step_reaching(mean_curve(seeds[o]), target)
            when = f"{reached} ({reached / args.steps:.2f}× the run)" if reached else "not reached"
            lines.append(
                f"| {LABELS[o]} | {knob(o, best[o])} | {len(seeds[o])} | {means[o]:.4f} | {lo:.4f} – {hi:.4f} | "
                f"{when} |"
            )
        ranked = sorted(present, key=means.get)
        if len(ranked) > 1:
            gap = means[ranked[1]] - means[ranked[0]]
            overlap = spreads[ranked[0]][1] >= spreads[ranked[1]][0]
            tie = " — within the seed spread (their min–max ranges overlap): a tie." if overlap else " (seeds apart)."
            lines += [
                "",
                f"**{LABELS[ranked[0]]} has the lowest mean final validation loss**, {gap:.4f} below "
                f"{LABELS[ranked[1]]}{tie}",
            ]
    lines += ["", "## Grids (seed 0, final validation loss)", ""]
    for o in OPTIMIZERS:
        if not grids.get(o):
            lines.append(f"- {LABELS[o]}: no finished run yet")
            continue
        row = ", ".join(
            f"{knob(o, v)}: {'diverged' if not math.isfinite(loss) else f'{loss:.4f}'}"
            + (" (best)" if v == best.get(o) else "")
            for v, loss in sorted(grids[o].items())
        )
        lines.append(f"- {LABELS[o]}: {row}")
    lines += ["", f"![validation loss]({args.plot.name})", ""]
    return "\n".join(lines)


def in_progress(partial: list[dict], finished: list[dict], every: int = 50) -> str:
    """Every run so far, finished or not, side by side at equal steps: the same schedule up to any step for all (one
    --steps for every run), so an unfinished run's curve compares with the others' at the steps it has reached."""
    if not partial:
        return ""
    runs = sorted(
        [(r, False) for r in finished] + [(r, True) for r in partial],
        key=lambda item: (OPTIMIZERS.index(item[0]["optimizer"]), item[0]["seed"], item[0][KNOB[item[0]["optimizer"]]]),
    )
    last = max(r["curve"][-1][0] for r, _ in runs)
    steps = sorted({s for r, _ in runs for s, _ in r["curve"] if s % every == 0 and s <= last} | {last})
    head = [f"{describe(r)}{' (running)' if running else ''}" for r, running in runs]
    lines = [
        "## Every run so far at equal steps (validation loss; unfinished runs up to the step they reached)",
        "",
        "| step | " + " | ".join(head) + " |",
        "|---:|" + "---:|" * len(runs),
    ]
    for step in steps:
        cells = [f"{dict(r['curve'])[step]:.4f}" if step in dict(r["curve"]) else "" for r, _ in runs]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args, seeds: dict, best: dict, partial: list[dict]) -> None:
    """The seeds at each best setting (solid); while some runs are unfinished, their curves so far (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = {"adamw": "tab:blue", "muon": "tab:green", "pisa": "tab:red"}
    lows = []
    curves = [(r, "-", i == 0) for o in seeds for i, r in enumerate(seeds[o])] + [(r, "--", True) for r in partial]
    for r, style, labelled in curves:
        o = r["optimizer"]
        steps, losses = zip(*r["curve"])
        lows.append(min(losses))
        label = f"{LABELS[o]} {'σ' if o == 'pisa' else 'lr'}={r[KNOB[o]]:g}{' (running)' if style == '--' else ''}"
        ax.plot(steps, losses, style, color=colors[o], alpha=0.75, lw=1.2, label=label if labelled else None)
    if lows:
        ax.set_ylim(min(lows) - 0.05, min(lows) + 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title(f"GPT-2 {args.layers}×{args.width}: validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="text file/folder or token files (engine/data.py); default: stdlib")
    p.add_argument("--layers", type=int, default=4, help="GPT-2 layers")
    p.add_argument("--width", type=int, default=256, help="GPT-2 width (n_embd)")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--steps", type=int, default=1000, help="training steps per run")
    p.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up steps (then cosine to 0.1x)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    p.add_argument("--block-size", type=int, default=64, help="tokens per sequence")
    p.add_argument("--eval-every", type=int, default=25, help="steps between validation evaluations")
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows in the validation set")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds at each best point (first: grid)")
    p.add_argument("--adamw-lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3, 1.2e-2], help="AdamW lr grid")
    p.add_argument("--muon-lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3, 1.6e-2], help="Muon lr grid")
    p.add_argument("--sigmas", type=float, nargs="+", default=[10.0, 20.0, 40.0, 80.0], help="PISA σ grid")
    p.add_argument("--rho", type=float, default=100.0, help="PISA ρ (not tuned: the shipped value)")
    p.add_argument("--aux-lr", type=float, default=3e-3, help="AdamW lr on the non-matrix params (Muon and PISA)")
    p.add_argument("--max-widen", type=int, default=3, help="grid points each grid may add while its best is an edge")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument(
        "--cached-only",
        action="store_true",
        help="run nothing: write the page from the runs already in --results (marked partial if some are missing)",
    )
    p.add_argument("--results", type=Path, default=Path(".cache/bench_lm.jsonl"), help="result cache (JSON lines)")
    p.add_argument("--output", type=Path, default=Path("docs/benchmarks/lm_convergence.md"), help="the page")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps <= args.warmup_steps or args.steps < args.eval_every:
        raise SystemExit(f"invalid --steps={args.steps}: must exceed --warmup-steps and --eval-every")
    if args.jobs < 1:
        raise SystemExit(f"invalid --jobs={args.jobs}: expected >= 1")
    flags = list(argv if argv is not None else sys.argv[1:])
    for flag, takes_value in (("--cached-only", False), ("--jobs", True)):  # they do not change the results
        if flag in flags:
            i = flags.index(flag)
            del flags[i : i + 1 + takes_value]
    args.command = " ".join(["python scripts/bench_lm.py", *flags])
    args.plot = args.output.with_suffix(".png")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["BENCH_LM_PARTIAL"] = str(args.results) + ".partial"  # unfinished runs' curves, for partial pages
    from engine.data import load_corpus

    corpus = load_corpus(args.data)  # builds the byte cache once here, not in every worker; fails before any run
    corpus_note = (
        f"{'the Python standard library source (engine default)' if args.data is None else args.data}, "
        f"{len(corpus.train) / 1e6:.1f}M train / {len(corpus.val) / 1e6:.2f}M held-out bytes"
    )
    runner = Runner(args.results, args.jobs, cached_only=args.cached_only)
    best, grids = tune(args, runner, {"adamw": args.adamw_lrs, "muon": args.muon_lrs, "pisa": args.sigmas})
    runs = runner.run([spec_for(args, o, best[o], s) for o in best for s in args.seeds])
    seeds = {o: [r for r in runs if r is not None and r["optimizer"] == o] for o in best}
    partial = [json.loads(p.read_text()) for p in map(partial_path, runner.missing.values()) if p.exists()]

    def same_settings(r):  # everything but the seed and the tuned knob
        spec = spec_for(args, r["optimizer"], r[KNOB[r["optimizer"]]], r["seed"])
        return all(r.get(k) == v for k, v in spec.items())

    finished = [r for r in runner.done.values() if same_settings(r)]
    text = report(args, grids, best, seeds, params_of(args), corpus_note, len(runner.missing))
    text += in_progress(partial, finished)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    plot(args, seeds, best, partial)
    print(text)
    print(f"wrote {args.output} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
