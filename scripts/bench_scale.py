#!/usr/bin/env python
"""Scale: the largest GPT-2 that trains here for a few steps with PISA, and the same with AdamW.

    python scripts/bench_scale.py                      # 124M then 350M, PISA and AdamW: docs/benchmarks/scale.md
    python scripts/bench_scale.py --sizes 124M 350M 1B # also 1B, only if the machine has the memory free
    python scripts/bench_scale.py --offload nvme --sizes 124M 1B --output docs/benchmarks/scale_nvme.md

2 CPU ranks, DeepSpeed ZeRO-3 with the optimizer offloaded to the CPU (configs/pisa_zero3_offload.json: bf16
parameters, fp32 masters; PISA nsisa on the block matrices + auxiliary AdamW), the model built inside
``deepspeed.zero.Init`` so no rank ever holds it whole. Baseline: the same config with ``"type": "AdamW"``, which
DeepSpeed runs as its CPU Adam (``DeepSpeedCPUAdam``) under optimizer offload. Per (size, optimizer): one fresh
pair of processes, ``--warmup`` untimed steps then ``--steps`` timed steps of ``--batch-size`` × ``--block-size``
tokens per rank; reports parameters, peak RSS per rank (VmHWM) and in total, seconds per step (median), the disk
bytes read and written per step (``/proc/self/io``) and the loss of the first and last steps. ``--offload nvme``
runs configs/pisa_zero3_nvme.json instead (ZeRO-Infinity: optimizer state and parameters in ``--nvme-path``; needs
``apt-get install libaio-dev``). PISA runs as nsisa + AdamW (``pisa``) and as sisa + AdamW (``sisa``).

Memory safety: before each launch the script reads MemAvailable and predicts the launch's
total peak RSS from the bytes per parameter measured at the previous size (or ``--bytes-per-param`` before any);
it skips the size — and says so on the page, with the numbers — unless MemAvailable exceeds the prediction by
``--margin-gib``. Results are cached in ``--results`` (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

OPTIMIZERS = ("adamw", "sisa", "pisa")  # AdamW first at each size: its line helps predict PISA's memory
LABELS = {"pisa": "PISA (nsisa + AdamW)", "sisa": "PISA (sisa + AdamW)", "adamw": "DeepSpeed CPU Adam (AdamW)"}
CONFIGS = {"cpu": "pisa_zero3_offload.json", "nvme": "pisa_zero3_nvme.json"}


def _meminfo_gib(field: str) -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/meminfo has no {field}")


def mem_available_gib() -> float:
    return _meminfo_gib("MemAvailable")


def mem_total_gib() -> float:
    return _meminfo_gib("MemTotal")


def config_for(spec: dict) -> dict:
    offload = spec.get("offload", "cpu")
    with open(ROOT / "configs" / CONFIGS[offload]) as f:
        config = json.load(f)
    for block in ("offload_optimizer", "offload_param"):
        if config["zero_optimization"].get(block, {}).get("device") == "nvme":
            config["zero_optimization"][block]["nvme_path"] = spec["nvme_path"]
    for k in ("scheduler", "tensorboard"):
        config.pop(k, None)
    config.update(
        train_micro_batch_size_per_gpu=spec["batch_size"],
        gradient_accumulation_steps=1,
        gradient_clipping=0.0,
        steps_per_print=10**9,
    )
    if spec["implementation"] != "auto":
        config["optimizer"]["params"]["implementation"] = spec["implementation"]
    if spec["optimizer"] == "sisa":
        config["optimizer"]["params"]["preconditioner"] = "sisa"
        for key in ("momentum", "ns_steps"):
            config["optimizer"]["params"].pop(key, None)
    if spec["optimizer"] == "adamw":
        config["optimizer"] = {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.0}}
    return config


def worker(spec: dict, out_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from bench_e2e import _status_kib, lm_loss

    import pisa_zero.deepspeed
    from engine.data import Batches, load_corpus
    from engine.models import build_model

    deepspeed.utils.logger.setLevel("WARNING")
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    corpus = load_corpus(None)
    batches = Batches(corpus.train, spec["block_size"], spec["batch_size"], seed=0, stream=rank)
    config = config_for(spec)
    start = time.perf_counter()
    with torch.device("meta"):  # the lazy imports (transformers → torch._dynamo) must not run under zero.Init
        build_model(spec["family"], spec["size"], vocab_size=corpus.vocab_size, block_size=spec["block_size"])
    with deepspeed.zero.Init(config_dict_or_path=config, dtype=torch.bfloat16):
        model = build_model(spec["family"], spec["size"], vocab_size=corpus.vocab_size, block_size=spec["block_size"])
    params = sum(getattr(p, "ds_numel", p.numel()) for p in {id(p): p for p in model.parameters()}.values())
    engine, *_ = pisa_zero.deepspeed.initialize(model=model, config=config)
    built_s = time.perf_counter() - start
    times, losses, io = [], [], []
    for s in range(spec["warmup"] + spec["steps"]):
        if s == spec["warmup"]:
            io.append(_io_bytes())
        x, y = batches.get(s)
        dist.barrier()
        t = time.perf_counter()
        loss = lm_loss(engine(input_ids=x).logits, y)
        engine.backward(loss)
        engine.step()
        dist.barrier()
        times.append(time.perf_counter() - t)
        losses.append(loss.item())
    result = {
        "rank": rank,
        "params": params,
        "build_s": built_s,
        "step_s": times[spec["warmup"] :],
        "losses": losses,
        "rss_peak_mib": _status_kib("VmHWM") / 1024,
        # storage bytes this rank read + wrote per timed step (/proc/self/io; NVMe offload swaps through O_DIRECT)
        "io_bytes_per_step": (sum(_io_bytes()) - sum(io[0])) / max(spec["steps"], 1),
        "optimizer": type(
            engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
        ).__name__,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _io_bytes() -> tuple[int, int]:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def report(args, rows: list[dict], skipped: list[str]) -> str:
    loads = [r["load1"] for r in rows if "load1" in r]
    load = (
        f"1-minute load average {min(loads):.1f} – {max(loads):.1f} at the launches' ends"
        if loads
        else "load not recorded"
    )
    quiet = bool(loads) and max(loads) < 3.0
    lines = [
        f"# Scale: the largest GPT-2 that trains here with PISA (2 ranks, ZeRO-3, {args.offload.upper()} offload, bf16 "
        "parameters)",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {os.cpu_count()} CPU cores, {mem_total_gib():.0f} GiB, no GPU; {load} "
        + ("(nothing else running). " if quiet else "(other work running: s/step is slow and noisy; peak RSS is not). ")
        + f"DeepSpeed ZeRO-3 as configs/{CONFIGS[args.offload]} sets it"
        + (" (optimizer state and parameters on NVMe: a disk folder), " if args.offload == "nvme" else ", ")
        + "bf16 parameters and fp32 masters, model built under `deepspeed.zero.Init`, GPT-2 from engine/models.py "
        f"with the byte vocabulary (256), {args.batch_size} × {args.block_size} tokens per rank per step, "
        f"{args.warmup} warm-up + {args.steps} timed steps.",
        "",
        "| size | parameters | optimizer | peak RSS per rank, GiB (max) | total peak RSS, GiB | bytes/param (total "
        "RSS) | s/step (median) | disk read + write per step, GiB (both ranks) | loss first → last | RSS vs AdamW "
        "| s/step vs AdamW |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    by = {(r["size"], r["optimizer"]): r for r in rows}
    for r in rows:
        base = by.get((r["size"], "adamw"))
        rss = max(x["rss_peak_mib"] for x in r["ranks"]) / 1024
        total = sum(x["rss_peak_mib"] for x in r["ranks"]) / 1024
        step = statistics.median(r["ranks"][0]["step_s"])
        params = r["ranks"][0]["params"]
        if base:
            base_total = sum(x["rss_peak_mib"] for x in base["ranks"]) / 1024
            ratios = f"{total / base_total:.3f}× | {step / statistics.median(base['ranks'][0]['step_s']):.3f}×"
        else:
            ratios = " | "
        io = sum(x.get("io_bytes_per_step", 0.0) for x in r["ranks"]) / 2**30
        losses = r["ranks"][0]["losses"]
        lines.append(
            f"| {r['size']} | {params / 1e6:,.1f}M | {LABELS[r['optimizer']]} (`{r['ranks'][0]['optimizer']}`) | "
            f"{rss:.2f} | {total:.2f} | {total * 2**30 / params:.1f} | {step:.1f} | {io:.2f} | "
            f"{losses[0]:.3f} → {losses[-1]:.3f} | {ratios} |"
        )
    if skipped:
        lines += ["", "Not run:", "", *[f"- {s}" for s in skipped]]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    from engine.models import SIZES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", choices=SIZES, default=["124M", "350M"], help="sizes, smallest first")
    p.add_argument("--family", choices=("gpt2", "llama"), default="gpt2", help="model family (engine/models.py)")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS), help="optimizers")
    p.add_argument(
        "--offload",
        choices=tuple(CONFIGS),
        default="cpu",
        help="cpu: configs/pisa_zero3_offload.json; nvme: configs/pisa_zero3_nvme.json (ZeRO-Infinity)",
    )
    p.add_argument(
        "--nvme-path", type=Path, default=Path(".cache/nvme_swap"), help="nvme: the swap folder (emptied per launch)"
    )
    p.add_argument("--batch-size", type=int, default=1, help="sequences per rank per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument(
        "--implementation",
        choices=("auto", "single", "foreach", "compiled"),
        default="auto",
        help="PISA kernels (auto: the library's default)",
    )
    p.add_argument("--bytes-per-param", type=float, default=80.0, help="total-RSS guess before any size was measured")
    p.add_argument("--margin-gib", type=float, default=4.0, help="MemAvailable must exceed the prediction by this")
    p.add_argument("--timeout", type=float, default=5400.0, help="seconds one launch may take")
    p.add_argument("--results", type=Path, default=Path(".cache/bench_scale.jsonl"), help="result cache")
    p.add_argument("--output", type=Path, default=Path("docs/benchmarks/scale.md"), help="the page")
    p.add_argument("--cached-only", action="store_true", help="run nothing: write the page from --results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def approx_params(family: str, size: str) -> int:
    import torch

    from engine.models import build_model, count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(family, size, vocab_size=256, block_size=128))


def predict_gib(rows: list[dict], optimizer: str, params: int, guess: float, offload: str = "cpu") -> tuple[float, str]:
    """Total peak RSS (GiB) predicted for ``params`` parameters: a line through the two largest sizes measured with
    this optimizer (fixed cost + bytes/param); with one size of its own, a line through it with the other
    optimizer's slope; else one size's bytes/param (an over-estimate: it folds the fixed cost in), or ``guess``
    bytes/param before any."""

    def points_of(name):
        return sorted(
            (r["ranks"][0]["params"], sum(x["rss_peak_mib"] for x in r["ranks"]) / 1024)
            for r in rows
            if r["optimizer"] == name and r.get("offload", "cpu") == offload
        )

    points = points_of(optimizer)
    if len(points) >= 2:
        (n0, m0), (n1, m1) = points[-2:]
        slope = (m1 - m0) / (n1 - n0)
        how = f"line through {n0 / 1e6:.0f}M and {n1 / 1e6:.0f}M: {slope * 2**30:.1f} B/param"
        return m1 + slope * (params - n1), how
    others = [points_of(o) for o in OPTIMIZERS if o != optimizer]
    other = next((pts for pts in others if len(pts) >= 2), None)
    if points and other:
        (n0, m0), (n1, m1) = other[-2:]
        slope = (m1 - m0) / (n1 - n0)
        (n, m) = points[-1]
        how = f"{n / 1e6:.0f}M measured + the other optimizer's {slope * 2**30:.1f} B/param"
        return m + slope * (params - n), how
    if points:
        n0, m0 = points[-1]
        return m0 / n0 * params, f"{m0 * 2**30 / n0:.1f} B/param measured at {n0 / 1e6:.0f}M"
    return guess * params / 2**30, f"{guess:g} B/param, a guess before any measurement"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.worker_out)
        return 0
    from bench_e2e import key, launch

    flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--cached-only")
    args.command = f"python scripts/bench_scale.py {flags}".rstrip()
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[key(r)] = r
    rows, skipped = [], []
    args.results.parent.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        for opt in args.optimizers:
            spec = dict(
                kind="scale",
                family=args.family,
                size=size,
                optimizer=opt,
                world=2,
                batch_size=args.batch_size,
                block_size=args.block_size,
                warmup=args.warmup,
                steps=args.steps,
                implementation=args.implementation,
                offload=args.offload,
            )
            if args.offload == "nvme":
                spec["nvme_path"] = str(args.nvme_path.resolve() / f"{size}_{opt}")
            if key(spec) not in done and args.cached_only:
                skipped.append(f"{size} {LABELS[opt]}: not measured yet (rerun the command: it resumes)")
                continue
            if key(spec) not in done:
                n = approx_params(args.family, size)
                need, how = predict_gib(rows, opt, n, args.bytes_per_param, args.offload)
                free = mem_available_gib()
                if free < need + args.margin_gib:
                    skipped.append(
                        f"{size} {LABELS[opt]}: memory safety — {n / 1e6:,.0f}M parameters, {need:.1f} GiB total "
                        f"peak RSS predicted ({how}); MemAvailable was {free:.1f} GiB (needs the prediction + "
                        f"{args.margin_gib:g} GiB for the rest of the machine) at {time.strftime('%H:%M UTC')}"
                    )
                    print("skip:", skipped[-1], flush=True)
                    continue
                print(f"{size} {opt}: predicted {need:.1f} GiB, {free:.1f} GiB available; launching", flush=True)
                if "nvme_path" in spec:
                    shutil.rmtree(spec["nvme_path"], ignore_errors=True)
                result = launch(spec, args.timeout, script=__file__) | {"load1": os.getloadavg()[0]}
                if "nvme_path" in spec:
                    shutil.rmtree(spec["nvme_path"], ignore_errors=True)
                with args.results.open("a") as out:
                    out.write(json.dumps(result) + "\n")
                done[key(spec)] = result
            rows.append(done[key(spec)])
    text = report(args, rows, skipped)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
