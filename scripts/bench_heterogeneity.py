#!/usr/bin/env python
"""Heterogeneous agents with rare meetings: PISA local steps vs FedAvg, DiLoCo and every-step averaging.

m agents, each with its own skewed data, simulated in ONE process on one thread (agent after agent, same model
object, weights swapped in). Every method gets the same local steps T per agent; a method that meets every H
steps does R = T/H rounds, each one all-reduce of the parameters across agents.

Tasks
    digits  label skew: scikit-learn digits, 5 agents holding 2 classes each; MLP 64-128-128-10; test accuracy.
    text    domain skew: the embedded stdlib corpus, 4 agents each holding its own packages
            (engine.data.partition_domains, as the engine's --heterogeneity); tiny GPT-2; val loss on an equal mix.

Methods (``--methods``)
    pisa        PISA mode B with H local steps per round: `pisa_zero.reference.ReferencePISA` (the simulation the
                distributed ``PISA(..., local_steps=H)`` is tested against). digits: SISA on every tensor;
                text: NSISA on block matrices + auxiliary AdamW (lr 3e-3) on the rest. H = 1 is today's mode B.
    pisa-prox   the same with ``prox_sigma = c·σ/H`` (proximal term, dual and consensus on a per-round scale).
    pisa-centred  pisa-prox with ``centred_dual=True``: the consensus averages the local points and the duals keep
                only their drift correction (Σα π = 0), SCAFFOLD-like, same bytes.
    fedavg      every agent runs its inner optimizer (Muon + AdamW on the rest, or AdamW) for H steps from the
                consensus; the round averages the weights. Inner state stays with its agent.
    diloco      DiLoCo (Douillard et al. 2023): the same inner steps; the outer gradient Δ = w − mean_i w_i feeds
                Nesterov SGD, lr 0.7, momentum 0.9 (torch.optim.SGD's rule, written out).
    sync        the agents' gradients averaged every step (data parallelism), one Muon or AdamW: H× the bytes.

    python scripts/bench_heterogeneity.py run --task text      # the grid, seed 0, then the best of each on seed 1
    python scripts/bench_heterogeneity.py report               # docs/benchmarks/heterogeneity.md + PNG
    python scripts/bench_heterogeneity.py smoke                # seconds: every method for 4 steps, a throw-away page

Results are cached in ``--results`` (JSON lines, one per run): an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from pisa_zero.reference import ReferencePISA  # noqa: E402

AUX_ADAMW_LR = 3e-3
# The keys a grid point or an exploration may set (anything else in a spec is the setting, not a hyper-parameter).
HYPER = ("lr", "sigma", "rho", "prox", "dual_damping", "outer_lr", "outer_momentum")
BETAS = (0.9, 0.95)
DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM = 0.7, 0.9


# --------------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """A model, each agent's batches and a held-out evaluation; ``matrix[k]`` marks Muon/NSISA tensors."""

    model: nn.Module
    params: list[nn.Parameter]
    matrix: list[bool]
    agents: int
    batch: object  # batch(agent, step) -> (x, y)
    loss: object  # loss(model, x, y) -> scalar tensor
    evaluate: object  # evaluate(model) -> {"loss": ..., ["accuracy": ...]}


def digits_task(seed: int, batch_size: int) -> Task:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # one split for every run
    test, train = order[:450], order[450:]
    shards = [train[(y[train] == 2 * a) | (y[train] == 2 * a + 1)] for a in range(5)]  # agent a: classes 2a, 2a+1
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    params = list(model.parameters())
    matrix = [p.ndim == 2 and p is not model[-1].weight for p in params]  # hidden matrices; the head on AdamW

    def batch(agent, step):
        gen = torch.Generator().manual_seed(hash((seed, agent, step)) % 2**62)
        idx = shards[agent][torch.randint(len(shards[agent]), (batch_size,), generator=gen)]
        return x[idx], y[idx]

    def loss(model, xb, yb):
        return nn.functional.cross_entropy(model(xb), yb)

    def evaluate(model):
        with torch.no_grad():
            logits = model(x[test])
        return {
            "loss": nn.functional.cross_entropy(logits, y[test]).item(),
            "accuracy": (logits.argmax(1) == y[test]).float().mean().item(),
        }

    return Task(model, params, matrix, 5, batch, loss, evaluate)


def text_task(seed: int, batch_size: int, block_size: int = 64, eval_windows: int = 48) -> Task:
    from engine.data import Batches, load_corpus, partition_domains, val_windows
    from engine.models import build_model
    from pisa_zero.param_groups import split_parameters

    corpus = load_corpus()
    parts = partition_domains(corpus, 4)
    streams = [
        Batches(corpus.train, block_size, batch_size, seed, a, [s for s in corpus.segments if s[0] in parts[a]])
        for a in range(4)
    ]
    held_out = val_windows(corpus.val, block_size, eval_windows)
    torch.manual_seed(seed)
    model = build_model("gpt2", "tiny", vocab_size=corpus.vocab_size, block_size=block_size)
    matrices, others = split_parameters(model)
    params = matrices + others
    matrix = [True] * len(matrices) + [False] * len(others)

    def loss(model, xb, yb):
        return nn.functional.cross_entropy(model(xb).logits.flatten(0, 1), yb.flatten())

    def evaluate(model):
        with torch.no_grad():
            return {"loss": loss(model, held_out[:, :-1], held_out[:, 1:]).item()}

    return Task(model, params, matrix, 4, lambda agent, step: streams[agent].get(step), loss, evaluate)


def make_task(spec: dict) -> Task:
    if spec["task"] == "digits":
        return digits_task(spec["seed"], spec["batch_size"])
    return text_task(spec["seed"], spec["batch_size"])


# ------------------------------------------------------------------------------------------- simulation
def load_weights(task: Task, weights: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, w in zip(task.params, weights):
            p.copy_(w)


def gradients(task: Task, weights: list[torch.Tensor], agent: int, step: int) -> list[torch.Tensor]:
    """Agent ``agent``'s gradients at ``weights`` on its batch of local step ``step``."""
    load_weights(task, weights)
    for p in task.params:
        p.grad = None
    task.loss(task.model, *task.batch(agent, step)).backward()
    return [p.grad.detach().clone() for p in task.params]


def schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine to 10%: the factor on every lr (PISA: σ and ρ scale by its inverse)."""
    if step <= warmup:
        return step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class Inner:
    """One agent's (or the sync run's) inner optimizer on its own copy of the weights: Muon + AdamW, or AdamW."""

    def __init__(self, weights, matrix, kind: str, lr: float):
        self.weights = [nn.Parameter(w.clone()) for w in weights]
        mats = [w for w, is_m in zip(self.weights, matrix) if is_m and kind == "muon"]
        rest = [w for w, is_m in zip(self.weights, matrix) if not (is_m and kind == "muon")]
        self.optimizers = [
            torch.optim.AdamW(rest, lr=AUX_ADAMW_LR if kind == "muon" else lr, betas=BETAS, weight_decay=0.0)
        ]
        if mats:
            self.optimizers.append(torch.optim.Muon(mats, lr=lr, weight_decay=0.0, momentum=0.95, nesterov=True))
        self.base_lrs = [[g["lr"] for g in o.param_groups] for o in self.optimizers]

    def step(self, grads, factor: float) -> None:
        for o, lrs in zip(self.optimizers, self.base_lrs):
            for g, lr in zip(o.param_groups, lrs):
                g["lr"] = lr * factor
        for w, g in zip(self.weights, grads):
            w.grad = g
        for o in self.optimizers:
            o.step()

    def set(self, weights) -> None:
        with torch.no_grad():
            for p, w in zip(self.weights, weights):
                p.copy_(w)


def run_one(spec: dict) -> dict:
    """Train one (task, method, H, hyper-parameters, seed) and return its evaluation curve."""
    torch.set_num_threads(1)
    task = make_task(spec)
    m, total, H = task.agents, spec["steps"], spec["H"]
    warmup = max(1, total // 12)
    w0 = [p.detach().clone() for p in task.params]
    method, curve = spec["method"], []
    eval_every = max(H, spec["eval_every"])
    start = time.time()

    def record(step, weights):
        load_weights(task, weights)
        curve.append({"step": step, "round": step // H, **task.evaluate(task.model)})

    if method.startswith("pisa"):
        kinds = ["nsisa" if is_m else "adamw" for is_m in task.matrix] if spec["task"] == "text" else "sisa"
        options = dict(sigma=spec["sigma"], rho=spec["rho"], lr=1.0, adamw_lr=AUX_ADAMW_LR, betas=BETAS)
        if method in ("pisa-prox", "pisa-centred"):
            options["prox_sigma"] = spec["prox"] * spec["sigma"] / H
        if method == "pisa-centred":
            options["centred_dual"] = True
        options.update({k: spec[k] for k in ("dual_damping", "outer_lr", "outer_momentum") if k in spec})
        ref = ReferencePISA(w0, m, preconditioner=kinds, local_steps=H, dtype=torch.float32, **options)
        for step in range(1, total + 1):
            fns = [lambda w, a=a, step=step: gradients(task, w, a, step) for a in range(m)]
            ref.step(fns, lr=schedule(step, total, warmup))
            if step % eval_every == 0:
                record(step, ref.w)
    elif method == "sync":
        inner = Inner(w0, task.matrix, spec["inner"], spec["lr"])
        for step in range(1, total + 1):
            grads = [gradients(task, [w.detach() for w in inner.weights], a, step) for a in range(m)]
            inner.step([sum(g[k] for g in grads) / m for k in range(len(w0))], schedule(step, total, warmup))
            if step % eval_every == 0:
                record(step, [w.detach() for w in inner.weights])
    else:  # fedavg, diloco
        agents = [Inner(w0, task.matrix, spec["inner"], spec["lr"]) for _ in range(m)]
        w = [t.clone() for t in w0]
        outer_momentum = [torch.zeros_like(t) for t in w]
        for step in range(1, total + 1):
            factor = schedule(step, total, warmup)
            for a, agent in enumerate(agents):
                agent.step(gradients(task, [t.detach() for t in agent.weights], a, step), factor)
            if step % H:
                continue
            mean = [sum(agent.weights[k].detach() for agent in agents) / m for k in range(len(w))]
            if method == "fedavg":
                w = mean
            else:  # SGD with Nesterov on the outer gradient Δ = w − mean: buf ← μ buf + Δ; w ← w − lr (Δ + μ buf)
                for k, target in enumerate(mean):
                    delta = w[k] - target
                    outer_momentum[k] = DILOCO_OUTER_MOMENTUM * outer_momentum[k] + delta
                    w[k] = w[k] - DILOCO_OUTER_LR * (delta + DILOCO_OUTER_MOMENTUM * outer_momentum[k])
            for agent in agents:
                agent.set(w)
            if step % eval_every == 0:
                record(step, w)
    numel = sum(t.numel() for t in w0)
    collectives = total if method == "sync" else total // H
    ring = 2 * (m - 1) / m  # an all-reduce (reduce-scatter + all-gather) sends this many vectors per agent
    return {
        **spec,
        "curve": curve,
        "parameters": numel,
        "bytes_per_agent": collectives * ring * 4 * numel,
        "seconds": time.time() - start,
    }


# ------------------------------------------------------------------------------------------------ study
# Each method's tuning grid (equal size per method and H): the hyper-parameters that vary, everything else fixed.
GRIDS = {
    "digits": {
        ("sync", "adamw"): [dict(lr=lr) for lr in (3e-3, 1e-2, 3e-2)],
        ("sync", "muon"): [dict(lr=lr) for lr in (0.03, 0.1, 0.3)],
        ("fedavg", "adamw"): [dict(lr=lr) for lr in (3e-3, 1e-2, 3e-2)],
        ("fedavg", "muon"): [dict(lr=lr) for lr in (0.03, 0.1, 0.3)],
        ("diloco", "adamw"): [dict(lr=lr) for lr in (3e-3, 1e-2, 3e-2)],
        ("diloco", "muon"): [dict(lr=lr) for lr in (0.03, 0.1, 0.3)],
        ("pisa", None): [dict(sigma=s, rho=100.0) for s in (0.03, 0.1, 0.3)],
        ("pisa-prox", None): [dict(sigma=s, rho=100.0, prox=1.0) for s in (0.1, 0.3, 1.0)],
        ("pisa-centred", None): [dict(sigma=s, rho=100.0, prox=1.0) for s in (0.1, 0.3, 1.0)],
    },
    "text": {
        ("sync", "adamw"): [dict(lr=lr) for lr in (1e-3, 3e-3)],
        ("sync", "muon"): [dict(lr=lr) for lr in (0.01, 0.03)],
        ("fedavg", "adamw"): [dict(lr=lr) for lr in (1e-3, 3e-3)],
        ("fedavg", "muon"): [dict(lr=lr) for lr in (0.01, 0.03)],
        ("diloco", "adamw"): [dict(lr=lr) for lr in (1e-3, 3e-3)],
        ("diloco", "muon"): [dict(lr=lr) for lr in (0.01, 0.03)],
        ("pisa-prox", None): [dict(sigma=30.0, rho=100.0, prox=c) for c in (0.5, 1.0)],
        ("pisa-centred", None): [dict(sigma=30.0, rho=100.0, prox=c) for c in (0.5, 1.0)],
    },
}
# Text, plain update: its σ must shrink with H (the measurements), so its two grid points depend on H.
TEXT_PISA_SIGMAS = {1: (30.0, 10.0), 4: (10.0, 3.0), 16: (3.0, 1.0), 64: (1.0, 0.3)}
LOCAL_STEPS = {"digits": (1, 4, 16, 64), "text": (1, 4, 16, 64)}
BASELINE_LOCAL_STEPS = {"digits": (4, 16, 64), "text": (4, 16, 64)}
SETTINGS = {
    "digits": dict(steps=256, batch_size=32, eval_every=16),
    "text": dict(steps=128, batch_size=4, eval_every=16),
}


# The longer text run of the page: the points tuned at T = 128 (every step, H = 16, 64), rerun at T = 384.
LONG_RUN = "--rerun-best-at 384 --local-steps 1 16 64 --methods sync pisa pisa-prox pisa-centred fedavg diloco " + (
    "--inner muon --seeds 0 1 --explore --jobs 2"
)

# Item 6's further candidates, tried at H = 16 on seed 0 on top of the tuned prox form (reported, not in the grid).
EXPLORE = {
    "text": [
        dict(method="pisa-prox", H=16, sigma=30.0, rho=100.0, prox=1.0, dual_damping=True),
        dict(method="pisa-prox", H=16, sigma=30.0, rho=100.0, prox=1.0, outer_lr=0.5, outer_momentum=0.9),
        dict(method="pisa-centred", H=16, sigma=30.0, rho=100.0, prox=0.5, outer_lr=0.5, outer_momentum=0.9),
    ],
    "digits": [
        dict(method="pisa-prox", H=16, sigma=0.3, rho=100.0, prox=1.0, dual_damping=True),
        dict(method="pisa-prox", H=16, sigma=0.3, rho=100.0, prox=1.0, outer_lr=0.5, outer_momentum=0.9),
    ],
}


def grid(task: str, method: str, inner: str | None, H: int) -> list[dict]:
    if task == "text" and method == "pisa":
        return [dict(sigma=s, rho=100.0) for s in TEXT_PISA_SIGMAS[H]]
    return GRIDS[task][(method, inner)]


def configurations(task: str) -> list[tuple[str, str | None, int]]:
    """(method, inner optimizer, H) of the study, in the order they run: the issue's target (H = 16, 64) first."""
    out = [("sync", "muon", 1), ("sync", "adamw", 1)]
    for H in sorted(set(LOCAL_STEPS[task]) - {1}, key=lambda H: (H not in (16, 64), H)):
        out += [("pisa-centred", None, H), ("pisa-prox", None, H)]
        if H in BASELINE_LOCAL_STEPS[task]:
            out += [(m, inner, H) for inner in ("muon", "adamw") for m in ("fedavg", "diloco")]
        out += [("pisa", None, H)]
        if H == 16:
            out += [("pisa", None, 1)]
    return out


def spec_for(task: str, method: str, inner: str | None, H: int, hp: dict, seed: int, settings: dict) -> dict:
    return dict(task=task, method=method, inner=inner, H=H, seed=seed, **settings, **hp)


def key(spec: dict) -> str:
    return json.dumps(
        {k: v for k, v in sorted(spec.items()) if k not in ("curve", "seconds", "parameters", "bytes_per_agent")},
        sort_keys=True,
    )


def load_results(path: Path) -> dict[str, dict]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                result = json.loads(line)
                done[key(result)] = result
    return done


def score(result: dict) -> float:
    """Lower is better: final test error (digits) or final validation loss (text)."""
    final = result["curve"][-1]
    return 1.0 - final["accuracy"] if "accuracy" in final else final["loss"]


def run_specs(specs: list[dict], path: Path, done: dict, jobs: int) -> None:
    todo = [s for s in specs if key(s) not in done]
    print(f"{len(specs)} runs, {len(specs) - len(todo)} cached, {len(todo)} to do with {jobs} processes", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mp.get_context("spawn").Pool(jobs) as pool, path.open("a") as out:
        for i, result in enumerate(pool.imap(run_one, todo), 1):  # in order: the target's runs come first
            out.write(json.dumps(result) + "\n")
            out.flush()
            done[key(result)] = result
            print(f"[{i}/{len(todo)}] {describe(result)}: {result['curve'][-1]} ({result['seconds']:.0f}s)", flush=True)


def describe(spec: dict) -> str:
    hp = {k: spec[k] for k in HYPER if k in spec}
    inner = f"-{spec['inner']}" if spec.get("inner") else ""
    return f"{spec['task']} {spec['method']}{inner} H={spec['H']} {hp} seed={spec['seed']}"


def best_of(task: str, method: str, inner, H: int, settings: dict, done: dict, seed: int = 0) -> dict | None:
    runs = [done.get(key(spec_for(task, method, inner, H, hp, seed, settings))) for hp in grid(task, method, inner, H)]
    runs = [r for r in runs if r is not None]
    return min(runs, key=score) if runs else None


def study(args) -> None:
    settings = dict(SETTINGS[args.task])
    if args.steps:
        settings["steps"] = args.steps
    done = load_results(args.results)
    configs = [
        c
        for c in configurations(args.task)
        if (not args.methods or c[0] in args.methods)
        and (not args.local_steps or c[2] in args.local_steps)
        and (not args.inner or c[1] in (None, args.inner))
    ]
    if args.rerun_best_at:
        # The points tuned at the task's T, rerun (not retuned) at a longer T: does a gap close with more rounds?
        longer = {**settings, "steps": args.rerun_best_at}
        specs = []
        for m, inner, H in configs:
            best = best_of(args.task, m, inner, H, settings, done)
            if best is None:
                raise SystemExit(f"--rerun-best-at: {m} {inner} H={H} has no tuned run at T={settings['steps']} yet")
            hp = {k: best[k] for k in HYPER if k in best}
            specs += [spec_for(args.task, m, inner, H, hp, seed, longer) for seed in args.seeds]
        if args.explore:
            specs += [dict(task=args.task, inner=None, seed=0, **longer, **e) for e in EXPLORE[args.task]]
        run_specs(specs, args.results, done, args.jobs)
        return
    grid_specs = [
        spec_for(args.task, m, inner, H, hp, 0, settings)
        for m, inner, H in configs
        for hp in grid(args.task, m, inner, H)
    ]
    run_specs(grid_specs, args.results, done, args.jobs)
    for seed in args.seeds[1:]:
        again = []
        for m, inner, H in configs:
            best = best_of(args.task, m, inner, H, settings, done)
            hp = {k: best[k] for k in HYPER if k in best}
            again.append(spec_for(args.task, m, inner, H, hp, seed, settings))
        run_specs(again, args.results, done, args.jobs)
    if args.explore:
        run_specs(
            [dict(task=args.task, inner=None, seed=0, **settings, **e) for e in EXPLORE[args.task]],
            args.results,
            done,
            args.jobs,
        )


# ----------------------------------------------------------------------------------------------- report
LABELS = {
    ("sync", "adamw"): "AdamW, gradients averaged every step",
    ("sync", "muon"): "Muon, gradients averaged every step",
    ("pisa", None): "PISA local steps (the issue's plain update)",
    ("pisa-prox", None): "PISA local steps, prox_sigma = c·σ/H",
    ("pisa-centred", None): "PISA local steps, centred dual, prox_sigma = c·σ/H",
    ("fedavg", "muon"): "FedAvg, Muon inner",
    ("fedavg", "adamw"): "FedAvg, AdamW inner",
    ("diloco", "muon"): "DiLoCo, Muon inner",
    ("diloco", "adamw"): "DiLoCo, AdamW inner",
}


def label(r: dict) -> str:
    return "PISA mode B, every step" if r["method"] == "pisa" and r["H"] == 1 else LABELS[(r["method"], r["inner"])]


def summarise(task: str, done: dict, settings: dict) -> list[dict]:
    """One row per (method, inner, H): the seed-0 best grid point and its final metric over every seed run."""
    rows = []
    for method, inner, H in configurations(task):
        best = best_of(task, method, inner, H, settings, done)
        if best is None:
            continue
        hp = {k: best[k] for k in HYPER if k in best}
        seeds = [done.get(key(spec_for(task, method, inner, H, hp, seed, settings))) for seed in range(3)]
        seeds = [r for r in seeds if r is not None]
        finals = [r["curve"][-1] for r in seeds]
        rows.append(
            dict(
                method=method,
                inner=inner,
                H=H,
                hp=hp,
                runs=seeds,
                rounds=settings["steps"] // H,
                loss=statistics.mean(f["loss"] for f in finals),
                accuracy=statistics.mean(f["accuracy"] for f in finals) if "accuracy" in finals[0] else None,
                spread=max(score(r) for r in seeds) - min(score(r) for r in seeds),
                mbytes=best["bytes_per_agent"] / 1e6,
                grid=[
                    (g, done.get(key(spec_for(task, method, inner, H, g, 0, settings))))
                    for g in grid(task, method, inner, H)
                ],
            )
        )
    return rows


def hp_text(hp: dict) -> str:
    return ", ".join(f"{'c' if k == 'prox' else k}={v:g}" for k, v in hp.items())


def table(rows: list[dict], task: str) -> list[str]:
    metric = "test accuracy" if task == "digits" else "val loss"
    lines = [
        f"| method | H | rounds | MB sent per agent | tuned (seed 0) | {metric} (mean) | seeds | spread | "
        "grid (seed 0) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        value = r["accuracy"] if task == "digits" else r["loss"]
        grid_text = "; ".join(
            f"{hp_text(g)}: {(res['curve'][-1]['accuracy'] if task == 'digits' else res['curve'][-1]['loss']):.3f}"
            for g, res in r["grid"]
            if res is not None
        )
        lines.append(
            f"| {label(r)} | {r['H']} | {r['rounds']} | {r['mbytes']:.1f} | "
            f"{hp_text(r['hp'])} | {value:.3f} | {len(r['runs'])} | {r['spread']:.3f} | {grid_text} |"
        )
    return lines


def find(rows, method, inner, H):
    return next((r for r in rows if (r["method"], r["inner"], r["H"]) == (method, inner, H)), None)


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's target on text: PISA-local vs FedAvg-Muon and DiLoCo at H = 16, 64; vs the best sync at H = 16."""
    sync = [r for r in rows if r["H"] == 1]
    if not sync:
        return []
    best_sync = min(sync, key=lambda r: r["loss"])
    sync_name = label(best_sync)
    lines = []
    for H in (16, 64):
        for method in ("pisa-centred", "pisa-prox", "pisa"):
            mine = find(rows, method, None, H)
            if mine is None:
                continue
            rivals = [
                find(rows, "fedavg", "muon", H),
                find(rows, "diloco", "muon", H),
                find(rows, "diloco", "adamw", H),
            ]
            rivals = [r for r in rivals if r is not None]
            parts = [f"{label(r)} {r['loss']:.3f} ({mine['loss'] - r['loss']:+.3f})" for r in rivals]
            gap = (mine["loss"] / best_sync["loss"] - 1) * 100
            lines.append(
                f"- H = {H}, {LABELS[(method, None)]}: {mine['loss']:.3f} vs "
                + ", ".join(parts)
                + f"; vs the best every-step method ({sync_name}, {best_sync['loss']:.3f}): {gap:+.1f}%"
            )
    return lines


def tried_lines(task: str, done: dict, settings: dict) -> list[str]:
    """Item 6: every PISA local-step form and setting run on seed 0 (grid points and explorations), by H."""
    metric = "accuracy" if task == "digits" else "loss"
    runs = [
        r
        for r in done.values()
        if r["task"] == task
        and r["method"].startswith("pisa")
        and r["H"] > 1
        and r["seed"] == 0
        and all(r[k] == v for k, v in settings.items())
    ]
    lines = [
        f"| H | form | setting | final {'test accuracy' if task == 'digits' else 'val loss'} |",
        "|---:|---|---|---:|",
    ]
    for r in sorted(runs, key=lambda r: (r["H"], r["method"], score(r))):
        extra = {k: r[k] for k in ("dual_damping", "outer_lr", "outer_momentum") if k in r}
        setting = hp_text({k: r[k] for k in ("sigma", "rho", "prox") if k in r})
        setting += "".join(f", {k}={v}" for k, v in extra.items())
        lines.append(f"| {r['H']} | {LABELS[(r['method'], None)]} | {setting} | {r['curve'][-1][metric]:.3f} |")
    return lines


FINDINGS_START, FINDINGS_END = "<!-- findings: written by hand, kept by `report` -->", "<!-- end of findings -->"


def kept_findings(output: Path) -> str:
    """The page's hand-written findings (between the markers), so that regenerating the tables keeps them."""
    old = output.read_text() if output.exists() else ""
    if FINDINGS_START in old and FINDINGS_END in old:
        return old[old.index(FINDINGS_START) : old.index(FINDINGS_END) + len(FINDINGS_END)] + "\n"
    return f"{FINDINGS_START}\n{FINDINGS_END}\n"


def report(results: Path, output: Path, settings: dict = SETTINGS) -> str:
    """Write the page (and its PNG) from every cached run that matches ``settings``; returns the page."""
    done = load_results(results)
    sections = {task: summarise(task, done, settings[task]) for task in ("digits", "text")}
    header = [
        "# Heterogeneous agents, rare meetings: PISA local steps vs FedAvg, DiLoCo and every-step averaging",
        "",
        "Commands (`scripts/bench_heterogeneity.py`; one thread per run, `nice -n 10`, OMP_NUM_THREADS=1; every run "
        "is cached in `.cache/bench_heterogeneity.jsonl`, so the commands resume):",
        "",
        "    python scripts/bench_heterogeneity.py run --task digits --seeds 0 1",
        "    python scripts/bench_heterogeneity.py run --task text --seeds 0 1 --explore --jobs 2",
        f"    python scripts/bench_heterogeneity.py run --task text {LONG_RUN}",
        "    python scripts/bench_heterogeneity.py report",
        "",
        "Every method gets the same local steps per agent and the same per-agent batch; a method meeting every H steps "
        "does T/H rounds (one all-reduce of the parameters per round; MB = 2(m−1)/m · 4 bytes · parameters · "
        "all-reduces, what a ring all-reduce sends per agent). Every method has the same number of grid points at "
        "each H, tuned on seed 0; the chosen point is re-run on the further seeds. The agents are simulated one after "
        "the other in one process: PISA through `pisa_zero.reference.ReferencePISA(local_steps=H)` (the simulation "
        "the distributed `PISA(..., local_steps=H)` is tested against), FedAvg/DiLoCo/every-step with "
        "`torch.optim.Muon` (+ AdamW lr 3e-3 on embeddings, norms, biases and the digits head) or `torch.optim.AdamW` "
        "(betas 0.9/0.95, no weight decay). DiLoCo is written from the paper (torchft is not installed here): outer "
        "gradient Δ = w − mean_i w_i, Nesterov SGD lr 0.7, momentum 0.9. Schedules: linear warm-up over T/12 steps, "
        "cosine to 10% (PISA: σ, ρ scale by its inverse).",
        "",
    ]

    def section(task, rows, st, heading, intro, target_heading, tried_heading) -> list[str]:
        out = [heading, "", intro, ""] + table(rows, task) + [""]
        if task == "text":
            out += [target_heading, ""] + target_lines(rows) + [""]
        return out + tried_heading + tried_lines(task, done, st) + [""]

    lines, plotted = [], dict(sections)
    for task, rows in sections.items():
        if not rows:
            continue
        st = settings[task]
        intro = f"{st['steps']} local steps per agent, batch {st['batch_size']} per agent per step."
        tried = [f"Every PISA local-step run on {task} (seed 0): the forms and settings tried for item 6.", ""]
        lines += section(task, rows, st, f"## {task}", intro, "Target check (issue 12):", tried)
        for steps in sorted({r["steps"] for r in done.values() if r["task"] == task and r["steps"] > st["steps"]}):
            longer = {**st, "steps": steps}
            rows_long = summarise(task, done, longer)
            if rows_long:
                plotted[f"{task}, T = {steps}"] = rows_long
                times = steps // st["steps"]
                heading = f"### {task}, T = {steps}: the points tuned at T = {st['steps']}, rerun {times}× longer"
                intro = f"Not retuned (the grid column shows the one point run); {steps} local steps per agent."
                lines += section(task, rows_long, longer, heading, intro, "Target check at this length:", [])
    lines += ["![curves](heterogeneity.png)", ""]
    text = "\n".join(header + [kept_findings(output)] + lines)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(text)
    plot(plotted, output.with_suffix(".png"))
    return text


def plot(sections: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sections), 3, figsize=(16, 4.5 * len(sections)), squeeze=False)
    colors = {
        ("sync", "adamw"): "tab:gray",
        ("sync", "muon"): "black",
        ("pisa", None): "tab:orange",
        ("pisa-prox", None): "tab:red",
        ("pisa-centred", None): "tab:purple",
        ("fedavg", "muon"): "tab:blue",
        ("fedavg", "adamw"): "tab:cyan",
        ("diloco", "muon"): "tab:green",
        ("diloco", "adamw"): "tab:olive",
    }
    for row_axes, (task, rows) in zip(axes, sections.items()):
        digits = task.startswith("digits")
        metric = "accuracy" if digits else "loss"
        for ax, H in zip(row_axes[:2], (16, 64)):
            for r in rows:
                if r["H"] not in (1, H):
                    continue
                style = "--" if r["H"] == 1 else "-"
                for i, run in enumerate(r["runs"]):
                    steps = [p["step"] for p in run["curve"]]
                    ax.plot(
                        steps,
                        [p[metric] for p in run["curve"]],
                        style,
                        color=colors[(r["method"], r["inner"])],
                        alpha=0.8,
                        label=label(r) if i == 0 else None,
                    )
            ax.set_title(f"{task}: H = {H} (dashed: every step)")
            ax.set_xlabel(f"local steps per agent (rounds × {H})")
            ax.set_ylabel("test accuracy" if digits else "validation loss")
            if not digits:
                ax.set_ylim(top=3.2)
            ax.grid(alpha=0.3)
        ax = row_axes[2]
        for r in rows:
            value = r["accuracy"] if digits else r["loss"]
            ax.scatter(r["mbytes"], value, color=colors[(r["method"], r["inner"])])
            ax.annotate(f"H={r['H']}", (r["mbytes"], value), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("MB sent per agent (whole run)")
        ax.set_ylabel("final " + ("test accuracy" if digits else "validation loss"))
        ax.set_title(f"{task}: final value vs bytes")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


SMOKE_SETTINGS = {
    "digits": dict(steps=4, batch_size=8, eval_every=1),
    "text": dict(steps=4, batch_size=2, eval_every=1),
}


def smoke(directory: Path) -> str:
    """Every configuration with H <= 4 for 4 steps on both tasks (seconds), then the page, all under ``directory``."""
    results = directory / "results.jsonl"
    with results.open("a") as out:
        for task, settings in SMOKE_SETTINGS.items():
            for method, inner, H in configurations(task):
                if H <= 4:
                    spec = spec_for(task, method, inner, H, grid(task, method, inner, H)[0], 0, settings)
                    out.write(json.dumps(run_one(spec)) + "\n")
    return report(results, directory / "heterogeneity.md", SMOKE_SETTINGS)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "mode", choices=["run", "report", "smoke"], help="run the study, write the page, or a smoke run"
    )
    parser.add_argument("--task", choices=["digits", "text"], default="digits", help="which skew to study (run)")
    parser.add_argument("--methods", nargs="*", default=None, help="restrict the run to these methods")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seed 0 tunes; the rest rerun the best")
    parser.add_argument("--local-steps", type=int, nargs="*", default=None, help="restrict the run to these H")
    parser.add_argument("--inner", choices=["muon", "adamw"], default=None, help="restrict baselines to this inner")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each on one thread)")
    parser.add_argument("--explore", action="store_true", help="also run the task's item-6 candidates (EXPLORE)")
    parser.add_argument("--steps", type=int, default=None, help="local steps per agent (default: the task's)")
    parser.add_argument(
        "--rerun-best-at",
        type=int,
        default=None,
        metavar="T",
        help="rerun each configuration's point tuned at the task's T (seed 0) at T local steps, for --seeds "
        "(and --explore's candidates); no grid",
    )
    parser.add_argument("--results", type=Path, default=Path(".cache/bench_heterogeneity.jsonl"), help="result cache")
    parser.add_argument("--output", type=Path, default=Path("docs/benchmarks/heterogeneity.md"), help="the page")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.mode == "run":
        study(args)
    elif args.mode == "report":
        report(args.results, args.output)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as directory:
            smoke(Path(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
