#!/usr/bin/env python
"""Optimizer step time: PISA against torch AdamW (fused and foreach) on the same tensors, in the same process.

The tensors have GPT-2-small shapes (embeddings + blocks of 768-wide matrices, biases, norms), as many blocks as
fit the requested size. Every optimizer gets fresh copies and two warm-up steps (torch.compile builds its kernel
there). Fused AdamW, PISA's default step, PISA without the finite check and the check alone are alive together and
stepped in turn (3 × ``--steps`` steps each per round, a rotated order per step); the other rows get ``--steps``
timed steps one optimizer at a time. The table gives the median step time and the ratio to fused AdamW.

    python scripts/bench_step.py                       # 100M fp32 parameters, writes docs/benchmarks/step_time.md
    python scripts/bench_step.py --millions 10 --no-write
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from pisa_zero import PISA
from pisa_zero import functional as F

BASELINE = "torch AdamW fused"
CHECK_AFTER = "PISA sisa (default)"
CHECK_ROW = "finite check alone (what skip_nonfinite adds)"
BLOCK_SHAPES = [(768, 2304), (2304,), (768, 768), (768,), (768, 3072), (3072,), (3072, 768), (768,), (768,), (768,)]


def gpt2_like_shapes(millions: float) -> list[tuple[int, ...]]:
    shapes = [(50257, 768), (1024, 768)]
    total = lambda: sum(torch.Size(s).numel() for s in shapes)  # noqa: E731
    while total() < millions * 1e6:
        shapes += BLOCK_SHAPES
    return shapes


def make_params(shapes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in shapes]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return params


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn, device: str) -> float:
    """Wall time of one call of ``fn``, the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_steps(optimizer, steps: int, device: str) -> float:
    optimizer.step()
    optimizer.step()
    return statistics.median(seconds(optimizer.step, device) for _ in range(steps)) * 1e3


def time_interleaved(builds: dict, shapes, steps: int, device: str) -> dict[str, float]:
    """Median step time of each optimizer, all alive at once and stepped in turn (a rotated order per step), with the
    finite check alone timed in the same rotation: drifts of the machine (a VM's memory bandwidth moved by 1.5x
    between rounds here) fall on all of them alike."""
    optimizers, grads = {}, None
    for name, build in builds.items():
        params = make_params(shapes, device)
        optimizers[name] = build(params)
        optimizers[name].step()
        optimizers[name].step()
        if name == CHECK_AFTER:
            grads = [p.grad for p in params]
    timed = {**{name: opt.step for name, opt in optimizers.items()}, CHECK_ROW: lambda: F.all_finite(grads)}
    times = {name: [] for name in timed}
    order = list(timed)
    for i in range(steps):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            times[name].append(seconds(timed[name], device))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def newton_schulz_ms(shapes, steps: int, device: str, dtype: torch.dtype | None = None) -> float:
    """Time of the batched Newton–Schulz of every 2-D tensor (what nsisa adds on top of the elementwise step), in
    ``dtype`` (default: the one PISA uses on ``device``)."""
    matrices = [torch.randn(s, device=device) for s in shapes if len(s) == 2]
    dtype = dtype or F.ns_compute_dtype(torch.device(device))
    F.orthogonalize_batched(matrices, 5, dtype)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        F.orthogonalize_batched(matrices, 5, dtype)
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--millions", type=float, default=100.0, help="parameter count in millions (default 100)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per optimizer (median reported)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians over rounds reported")
    parser.add_argument(
        "--ns-millions",
        type=float,
        default=10.0,
        help="model size for the Newton–Schulz share of an nsisa step (NS is compute-bound: minutes at 100M on CPU)",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("docs/benchmarks/step_time.md"), help="markdown file to write"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    args = parser.parse_args(argv)

    shapes = gpt2_like_shapes(args.millions)
    numel = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"{numel / 1e6:.1f}M fp32 parameters in {len(shapes)} tensors, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    # The target's three rows (and the check alone) are stepped in turn, all alive at once; the others one at a time.
    paired = {
        BASELINE: lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        CHECK_AFTER: lambda ps: PISA(ps, sigma=1.0, rho=1000.0),
        "PISA sisa, skip_nonfinite=False": lambda ps: PISA(ps, sigma=1.0, rho=1000.0, skip_nonfinite=False),
    }
    candidates = {
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "PISA adagrad": lambda ps: PISA(ps, preconditioner="adagrad"),
        "PISA identity": lambda ps: PISA(ps, preconditioner="identity"),
        "PISA sisa foreach": lambda ps: PISA(ps, implementation="foreach"),
    }
    # Rounds interleave the optimizers so that a noisy neighbour slows all of them alike; each round's ratio is to
    # the fused AdamW of the same round, and the medians over rounds are reported.
    times: dict[str, list[float]] = {name: [] for name in [*paired, *candidates, CHECK_ROW]}
    ratios: dict[str, list[float]] = {name: [] for name in times}
    load_before = os.getloadavg()[0]
    for round_index in range(args.rounds):
        for name, ms in time_interleaved(paired, shapes, 3 * args.steps, args.device).items():
            times[name].append(ms)
            print(f"  round {round_index + 1}: {name:45s} {ms:8.1f} ms", flush=True)
        for name, build in candidates.items():
            params = make_params(shapes, args.device)
            ms = time_steps(build(params), args.steps, args.device)
            times[name].append(ms)
            print(f"  round {round_index + 1}: {name:45s} {ms:8.1f} ms", flush=True)
            del params
        for name in times:
            ratios[name].append(times[name][-1] / times[BASELINE][-1])
    load_after = os.getloadavg()[0]
    rows = [(name, statistics.median(times[name]), statistics.median(ratios[name])) for name in times]

    block_matrices = [s for s in BLOCK_SHAPES if len(s) == 2]  # what param_groups puts on nsisa
    ns_shapes = list(block_matrices)
    while sum(torch.Size(s).numel() for s in ns_shapes) < args.ns_millions * 1e6:
        ns_shapes += block_matrices
    ns_numel = sum(torch.Size(s).numel() for s in ns_shapes)
    params = make_params(ns_shapes, args.device)
    nsisa = PISA(params, preconditioner="nsisa", skip_nonfinite=False)
    nsisa_ms = time_steps(nsisa, max(2, args.steps // 3), args.device)
    ns_ms = newton_schulz_ms(ns_shapes, 2, args.device)
    del params
    params = make_params(ns_shapes, args.device)
    muon = torch.optim.Muon(params, lr=0.02, adjust_lr_fn="match_rms_adamw")  # its NS runs in bf16 on every device
    muon_ms = time_steps(muon, max(2, args.steps // 3), args.device)
    ns_bf16_ms = newton_schulz_ms(ns_shapes, 2, args.device, torch.bfloat16)
    print(
        f"  nsisa at {ns_numel / 1e6:.1f}M: step {nsisa_ms:.1f} ms, Newton–Schulz {ns_ms:.1f} ms "
        f"({100 * ns_ms / nsisa_ms:.0f}% of the step); torch Muon {muon_ms:.1f} ms; NS in bf16 {ns_bf16_ms:.1f} ms",
        flush=True,
    )

    on_cuda = args.device.startswith("cuda")
    machine = torch.cuda.get_device_name() if on_cuda else platform.processor() or platform.machine()
    lines = [
        f"# Optimizer step time ({'CUDA' if on_cuda else 'CPU'})",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python scripts/bench_step.py "
        f"--millions {args.millions:g} --steps {args.steps} "
        f"--rounds {args.rounds} --ns-millions {args.ns_millions:g} --device {args.device}`  ",
        f"Machine: {machine}, {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}, Python {sys.version.split()[0]}  ",
        f"Tensors: {numel / 1e6:.1f}M fp32 parameters with GPT-2-small shapes ({len(shapes)} tensors); "
        f"{args.rounds} rounds; in each, fused AdamW, PISA's default, PISA without the check and the check alone are "
        f"alive together and stepped in turn ({3 * args.steps} steps each, a rotated order per step, after two warm-up "
        f"steps), then every other row alone ({args.steps} steps); the table gives the median over rounds of the "
        "median step time and of the ratio to the same round's fused AdamW. "
        f"1-minute load average {load_before:.1f} before, {load_after:.1f} after "
        f"({'nothing else was running' if load_before < 1 else 'other work was running: noisy'}).",
        "",
        "| optimizer | ms/step | ratio to AdamW fused |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.1f} | {ratio:.2f}× |" for name, ms, ratio in rows]
    ratio = {name: r for name, _, r in rows}
    default, plain, check = ratio[CHECK_AFTER], ratio["PISA sisa, skip_nonfinite=False"], ratio[CHECK_ROW]
    verdict = "met" if default <= 1.1 else f"missed by {default - 1.1:.2f}×"
    lines += [
        "",
        f"Target (issue 11): the default step ≤ 1.10× fused AdamW: {verdict}. Without the check the step is "
        f"{plain:.2f}×; the check alone (one read of the gradients) {check:.2f}×.",
    ]
    lines += [
        "",
        f"NSISA on {ns_numel / 1e6:.1f}M parameters of block matrices (what `param_groups` puts on nsisa): "
        f"{nsisa_ms:.1f} ms/step, of which batched Newton–Schulz "
        f"({'bf16 on CUDA' if on_cuda else 'fp32 on CPU'}) {ns_ms:.1f} ms ({100 * ns_ms / nsisa_ms:.0f}%). "
        "NS is compute-bound (O(rows·cols·min) per matrix); the elementwise part is memory-bound like AdamW. "
        f"`torch.optim.Muon` on the same matrices: {muon_ms:.1f} ms/step ({nsisa_ms / muon_ms:.2f}× for nsisa); "
        f"Muon runs its Newton–Schulz in bf16 on every device — the same batched NS in bf16 here takes "
        f"{ns_bf16_ms:.1f} ms ({ns_ms / ns_bf16_ms:.1f}× faster than PISA's {'bf16' if on_cuda else 'fp32'}).",
        "",
        "`PISA sisa (default)` is `implementation=None` (the torch.compile'd fused kernel) with the default "
        "`skip_nonfinite=True`: one read of every gradient (a sum per tensor) and one host sync, before any state is "
        "touched. It cannot share the kernel's pass: a skip must be decided before the first tensor is written, and "
        "the kernel writes each tensor as it reads its gradient (doing both in one pass would need a second copy of "
        "the state, more traffic than the read). The kernel moves 7 fp32 words per parameter (read w, g, π, v; "
        "write w, π, v), the check 1: where both run at memory bandwidth the check costs 1/7 ≈ 0.14× of the "
        "kernel, so the default step reaches 1.10× fused AdamW (which moves the same 7 words) only if PISA's "
        "kernel runs at ≤ 0.96× of AdamW's.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
