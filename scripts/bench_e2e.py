#!/usr/bin/env python
"""End-to-end throughput and memory: PISA vs AdamW and Muon under DeepSpeed ZeRO-3 and FSDP2, 2 CPU ranks.

    python scripts/bench_e2e.py          # the page: docs/benchmarks/e2e.md

Same model (GPT-2 from a config), same data (the engine's corpus and per-rank batches), same loop as
engine/train.py (forward, cross-entropy in fp32, backward, the finite check, step) in every case:

- ``deepspeed``: ZeRO-3 (the configs' zero section, fp32, no clipping), optimizer from the JSON — ``PISA`` sisa
  everywhere / ``PISA`` nsisa + auxiliary AdamW (configs/pisa_zero3.json) / DeepSpeed's ``AdamW``
  (configs/adamw_zero3.json) / DeepSpeed's ``Muon`` with its auxiliary Adam (configs/muon_zero3.json), pointed at
  exactly the matrices ``pisa_zero.param_groups`` gives NSISA;
- ``fsdp2-A``: FSDP2 over both ranks (``pisa_zero.integrations.fsdp.prepare`` for PISA; ``fully_shard`` of every
  block and the root + ``torch.optim.AdamW(fused=True)`` / ``torch.optim.Muon`` + fused AdamW for the baselines);
- ``fsdp2-B``: PISA mode B with 2 agents × 1 shard; the baselines on the same (2 replicate × 1 shard) HSDP mesh.

One launch (2 fresh rank processes) per back end holds all four optimizers (each on its own copy of the model):
it builds each in turn and warms it up — its RSS is the rise of the peak RSS (VmHWM) over the RSS just before,
after freed memory was handed back to the OS and the counter restarted — then runs ``--rounds`` rounds of
``--steps`` timed steps (barrier, step, barrier) of each, interleaved in a different order each round, so load from
other work on the machine falls on all of them alike (tokens/s from the median step); last, it rebuilds each alone
and runs one step under the torch profiler: the allocator peak of that optimizer's tensors (live bytes allocated in
the window, rebuilt from the profiler's memory events as in scripts/comm_account.py).
Results are cached in ``--results`` (JSON lines): a rerun resumes, and re-renders the page for free.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))  # comm_account's allocator-peak reader

BACKENDS = ("fsdp2-A", "fsdp2-B", "deepspeed")
OPTIMIZERS = ("sisa", "nsisa", "adamw", "muon")
LABELS = {"sisa": "PISA sisa", "nsisa": "PISA nsisa + AdamW", "adamw": "AdamW", "muon": "Muon + AdamW"}
BACKEND_LABELS = {
    "deepspeed": "DeepSpeed ZeRO-3",
    "fsdp2-A": "FSDP2 mode A (2 shards)",
    "fsdp2-B": "FSDP2 mode B (2×1)",
}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def lm_loss(logits, y):
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))


def model_for(spec: dict):
    import torch
    from transformers import GPT2LMHeadModel

    from engine.models import gpt2_config

    torch.manual_seed(0)
    return GPT2LMHeadModel(
        gpt2_config(256, spec["block_size"], width=spec["width"], layers=spec["layers"], heads=spec["heads"])
    )


PISA_HP = dict(sigma=30.0, rho=100.0)
ADAMW_HP = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
MUON_HP = dict(lr=8e-3, momentum=0.95, weight_decay=0.0)


def deepspeed_config(spec: dict) -> dict:
    with open(ROOT / "configs" / "pisa_zero3.json") as f:
        shipped = json.load(f)
    config = {
        "train_micro_batch_size_per_gpu": spec["batch_size"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": False},
        "zero_optimization": shipped["zero_optimization"],
        "zero_allow_untested_optimizer": True,
    }
    opt = spec["optimizer"]
    if opt in ("adamw", "muon"):  # the application's baseline configs: their optimizer (and Muon's zero setting)
        with open(ROOT / "configs" / f"{opt}_zero3.json") as f:
            baseline = json.load(f)
        config["optimizer"] = baseline["optimizer"]
        # DeepSpeed's ZeRO-3 refuses Muon with reduce_scatter (configs/muon_zero3.json turns it off)
        config["zero_optimization"] = {**config["zero_optimization"], **baseline["zero_optimization"]}
        return config
    if opt == "nsisa":
        config["optimizer"] = shipped["optimizer"]
    else:
        config["optimizer"] = {"type": "PISA", "params": {"preconditioner": "sisa", **PISA_HP}}
    if spec["implementation"] != "auto":
        config["optimizer"]["params"]["implementation"] = spec["implementation"]
    return config


def build_deepspeed(spec: dict):
    """(step function, module) for a ZeRO-3 engine; DeepSpeed's Muon is pointed at param_groups' matrices."""
    import deepspeed

    import pisa_zero
    import pisa_zero.deepspeed

    model = model_for(spec)
    if spec["optimizer"] == "muon":
        # DeepSpeed tags every >= 2-D parameter whose name lacks "embed"/"lm_head" for Muon, which on GPT-2 includes
        # wte/wpe; retag after it so Muon gets exactly NSISA's matrices (the comparison this benchmark makes).
        matrices = {id(p) for p in pisa_zero.param_groups(model)[0]["params"]}
        original = deepspeed.set_optimizer_flags

        def retag(config_class, module):
            original(config_class, module)
            for p in module.parameters():
                p.use_muon = id(p) in matrices

        deepspeed.set_optimizer_flags = retag
    engine, *_ = pisa_zero.deepspeed.initialize(model=model, config=deepspeed_config(spec))

    def step(x, y):
        loss = lm_loss(engine(input_ids=x).logits, y)
        engine.backward(loss)
        engine.step()
        return loss

    return step, engine


def build_fsdp(spec: dict):
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import pisa_zero
    from pisa_zero.consensus import AgentTopology
    from pisa_zero.integrations.fsdp import prepare, transformer_blocks

    model = model_for(spec)
    world = dist.get_world_size()
    agents = 2 if spec["backend"] == "fsdp2-B" else 1
    opt = spec["optimizer"]
    if opt in ("sisa", "nsisa"):
        topology = AgentTopology.build(agents=agents) if agents > 1 else None
        groups = pisa_zero.param_groups(model, other_options=dict(lr=ADAMW_HP["lr"])) if opt == "nsisa" else None
        impl = None if spec["implementation"] == "auto" else spec["implementation"]
        model, optimizers = prepare(model, topology, groups=groups, implementation=impl, **PISA_HP)
        optimizers = [optimizers]
    else:
        matrices = {id(p) for p in pisa_zero.param_groups(model)[0]["params"]}
        names = {n for n, p in model.named_parameters() if id(p) in matrices}
        if agents > 1:
            mesh = init_device_mesh("cpu", (agents, world // agents), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world,))
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        params = dict(model.named_parameters())
        if opt == "adamw":
            optimizers = [torch.optim.AdamW(list(params.values()), fused=True, **ADAMW_HP)]
        else:
            muon = [p for n, p in params.items() if n in names]
            rest = [p for n, p in params.items() if n not in names]
            optimizers = [
                torch.optim.Muon(muon, adjust_lr_fn="match_rms_adamw", **MUON_HP),
                torch.optim.AdamW(rest, fused=True, **ADAMW_HP),
            ]
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step(x, y):
        loss = lm_loss(model(input_ids=x).logits, y)
        loss.backward()
        if pisa_zero.grads_are_finite(trainable):  # engine/train.py checks before every optimizer's step
            for o in optimizers:
                o.step()
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        return loss

    return step, model


def window_peaks(events, names: list[str]) -> dict[str, int]:
    """Peak live tensor bytes allocated inside each named profiler window (tensors from before it not counted),
    rebuilt address by address from the profiler's CPU [memory] events as scripts/comm_account.py does."""
    from comm_account import cpu_memory_events, live_bytes

    windows = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") in names and "dur" in e}
    memory = cpu_memory_events(events)
    return {
        name: max([0, *(current for _, current in live_bytes(e for e in memory if lo <= e["ts"] <= hi))])
        for name, (lo, hi) in windows.items()
    }


def _settle_rss() -> float:
    """Free what can be freed and hand it back to the OS, restart the peak-RSS counter; the current RSS (MiB)."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    return _status_kib("VmRSS") / 1024


def worker(spec: dict, out_path: str) -> None:
    """One rank of one launch: every optimizer of the back end, in one pair of processes.

    1. For each optimizer in turn: build it and run the warm-up steps; its peak RSS is the rise of the process's
       VmHWM over the RSS just before (freed memory handed back first, the counter restarted).
    2. ``rounds`` × (every optimizer, a rotated order, ``steps`` timed steps): interleaved throughput.
    3. For each optimizer: drop it, rebuild it and run one step inside a profiler session: its allocator peak (live
       tensor bytes allocated in that window). A short session per optimizer: one over everything holds GBs of
       events under ZeRO-3."""
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from engine.data import Batches, load_corpus

    if spec["backend"] == "deepspeed":
        import deepspeed

        deepspeed.utils.logger.setLevel("WARNING")
        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    corpus = load_corpus(spec["data"])
    batches = Batches(corpus.train, spec["block_size"], spec["batch_size"], seed=0, stream=rank)
    build = build_deepspeed if spec["backend"] == "deepspeed" else build_fsdp
    result = {"rank": rank, "world": world, "params": sum(p.numel() for p in model_for(spec).parameters())}
    steps, errors, rss, rss_first = {}, {}, {}, {}
    # Pass 1 builds each optimizer once and drops it: the process's one-time costs (the compiler for PISA's and
    # fused AdamW's kernels, DeepSpeed's ops, allocator arenas) land there, recorded as the first-build rise.
    # Pass 2's rise, over a settled RSS, is what the optimizer itself holds; pass 2's copies are the timed ones.
    for first in (True, False):
        for opt in spec["optimizers"]:
            if opt in errors:
                continue
            dist.barrier()
            before = _settle_rss()
            try:  # a configuration the framework refuses is reported, not fatal to the others
                steps[opt], _ = build({**spec, "optimizer": opt})
            except Exception as e:  # noqa: BLE001
                errors[opt] = f"{type(e).__name__}: {e}"
                continue
            for s in range(spec["warmup"]):
                steps[opt](*batches.get(s))
            (rss_first if first else rss)[opt] = _status_kib("VmHWM") / 1024 - before
            if first:
                del steps[opt]
    step_s = {o: [] for o in steps}
    order, s = list(steps), spec["warmup"]
    for rnd in range(spec["rounds"]):
        for opt in order[rnd % len(order) :] + order[: rnd % len(order)]:
            times = []
            for _ in range(spec["steps"]):
                x, y = batches.get(s)
                s += 1
                dist.barrier()
                start = time.perf_counter()
                steps[opt](x, y)
                dist.barrier()
                times.append(time.perf_counter() - start)
            step_s[opt].append(times)
    allocator = {}
    for opt in order:
        del steps[opt]
        _settle_rss()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("window"):
                step, _ = build({**spec, "optimizer": opt})
                step(*batches.get(0))
        del step
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            del prof
            with open(trace) as f:
                allocator[opt] = window_peaks(json.load(f)["traceEvents"], ["window"])["window"] / 2**20
    result.update(errors=errors, rss_rise_mib=rss, rss_first_build_mib=rss_first, step_s=step_s)
    result["allocator_peak_mib"] = allocator
    result["rss_peak_mib"] = _status_kib("VmHWM") / 1024
    with open(out_path, "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, timeout: float, script: str = __file__) -> dict:
    """Two fresh rank processes for one spec; their results, one per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(_free_port())
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    world = spec["world"]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [os.path.join(tmp, f"rank{r}.json") for r in range(world)]
        logs = [open(os.path.join(tmp, f"rank{r}.log"), "w+") for r in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, script, "--worker", json.dumps(spec), "--worker-out", outs[r]],
                env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)},
                stdout=logs[r],
                stderr=subprocess.STDOUT,
            )
            for r in range(world)
        ]
        started = time.time()
        codes = None
        try:
            codes = [p.wait(timeout=max(1.0, timeout - (time.time() - started))) for p in procs]
        except subprocess.TimeoutExpired:
            logs[0].write(f"\n[killed after --timeout {timeout:g} s]\n")
        finally:  # also on Ctrl-C or a test's timeout: no rank outlives the launch
            for p in procs:
                if p.poll() is None:
                    p.kill()
            codes = codes or [p.wait() for p in procs]
        if any(codes) or not all(os.path.exists(o) for o in outs):
            logs[0].seek(0)
            tail = logs[0].read()[-3000:]
            for log in logs:
                log.close()
            raise RuntimeError(f"{json.dumps(spec)}: a rank failed (exit codes {codes}); rank 0's log ends:\n{tail}")
        for log in logs:
            log.close()
        ranks = [json.load(open(o)) for o in outs]
    return {**spec, "ranks": ranks, "launch_s": time.time() - started}


def describe(spec: dict) -> str:
    return f"{spec['backend']} ({', '.join(spec['optimizers'])})"


def key(spec: dict) -> str:
    settings = {k: v for k, v in spec.items() if k not in ("ranks", "launch_s", "load1")}
    return json.dumps(settings, sort_keys=True)


def summarize(results: list[dict]) -> dict:
    """Per (back end, optimizer): median tokens/s over all timed steps (and the range of the per-round medians),
    allocator peak and peak RSS, each the max over ranks."""
    out = {}
    for r in results:
        ranks = r["ranks"]
        for opt, error in ranks[0]["errors"].items():
            out.setdefault((r["backend"], opt), {})["error"] = error
        tokens = ranks[0]["world"] * r["batch_size"] * r["block_size"]
        for opt, rounds in ranks[0]["step_s"].items():  # barrier to barrier: the same on both ranks
            per_round = [tokens / statistics.median(t) for t in rounds]
            entry = out.setdefault((r["backend"], opt), {})
            entry["tokens_per_s"] = tokens / statistics.median([t for ts in rounds for t in ts])
            entry["tokens_per_s_range"] = (min(per_round), max(per_round))
            entry["allocator_mib"] = max(x["allocator_peak_mib"][opt] for x in ranks)
            entry["rss_mib"] = max(x["rss_rise_mib"][opt] for x in ranks)
            entry["rss_first_mib"] = max(x["rss_first_build_mib"][opt] for x in ranks)
            entry["params"] = ranks[0]["params"]
    return out


def report(args, summary: dict, load: list[float], missing: list[str], failures: list[str]) -> str:
    nan = float("nan")
    params = next((s["params"] for s in summary.values() if "params" in s), 0)
    lines = [
        "# End-to-end: tokens/s and memory per rank, PISA vs AdamW and Muon (DeepSpeed ZeRO-3, FSDP2)",
        "",
        f"Command: `{args.command}`  ",
        f"Model: GPT-2 from a config, {args.layers} layers × {args.width}, vocabulary 256, {params / 1e6:.2f}M "
        f"parameters, fp32; data: the engine's corpus (stdlib source, bytes), {args.batch_size} × {args.block_size} "
        "tokens per rank per step, 2 gloo CPU ranks, one thread each. One launch per back end holds all four "
        "optimizers (each on its own model copy). Each is built, warmed up and dropped once (its *first-build* RSS "
        "rise holds the process's one-time costs: the compiler, DeepSpeed's ops, allocator arenas), then built "
        "again: its peak RSS = the rise of VmHWM while it is built and warmed up "
        f"({args.warmup} steps), freed memory handed back and the counter restarted before each; then {args.rounds} "
        f"rounds of {args.steps} timed steps of each, interleaved (a different order each round), tokens/s from the "
        "median step; allocator peak = live tensor bytes (model, gradients, state, activations, temporaries) while "
        "each is rebuilt alone and runs one step, from the torch profiler's memory events. "
        f"PISA: σ = 30, ρ = 100, kernels: {args.implementation} (auto: the "
        "library's default, compiled where a compiler works); "
        f"FSDP2: fused AdamW lr {ADAMW_HP['lr']:g}, `torch.optim.Muon` lr {MUON_HP['lr']:g} on NSISA's matrices + "
        "fused AdamW on the rest; ZeRO-3: the optimizer sections of configs/adamw_zero3.json (DeepSpeed's `AdamW`) "
        "and configs/muon_zero3.json (DeepSpeed's `Muon`, retagged to NSISA's matrices; `reduce_scatter` off, "
        "which DeepSpeed requires for Muon).",
        "",
        f"**Machine:** {os.cpu_count()} CPU cores, 1-minute load average {min(load, default=nan):.1f} – "
        f"{max(load, default=nan):.1f} at the launches' ends "
        + (
            "(nothing else running: the two ranks use the two cores). "
            if max(load, default=99) < 3.0
            else "(other work was running: absolute tokens/s are low and noisy). "
        )
        + "The ratios come from optimizers interleaved in the same rounds of one launch; the min–max of the "
        "per-round medians is shown so the noise can be judged.",
        "",
        "| back end | optimizer | tokens/s (median) | per-round min – max | vs AdamW | peak RSS rise MiB (max rank) "
        "| vs AdamW | first-build RSS rise MiB | allocator peak MiB | vs AdamW |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    verdicts = []

    def num(x, fmt):
        return "–" if x is None or x != x else format(x, fmt)

    for backend in args.backends:
        base = summary.get((backend, "adamw"), {})
        vs = {}  # ratios to AdamW, per optimizer and measure
        for opt in args.optimizers:
            s = summary.get((backend, opt))
            if s is None:
                continue
            r = vs[opt] = {m: s.get(m, nan) / base.get(m, nan) for m in ("tokens_per_s", "rss_mib", "allocator_mib")}
            lo, hi = s.get("tokens_per_s_range", (nan, nan))
            lines.append(
                f"| {BACKEND_LABELS[backend]} | {LABELS[opt]} | {num(s.get('tokens_per_s'), ',.0f')} | "
                f"{num(lo, ',.0f')} – {num(hi, ',.0f')} | {num(r['tokens_per_s'], '.3f')}× | "
                f"{num(s.get('rss_mib'), ',.0f')} | {num(r['rss_mib'], '.3f')}× | "
                f"{num(s.get('rss_first_mib'), ',.0f')} | "
                f"{num(s.get('allocator_mib'), ',.1f')} | {num(r['allocator_mib'], '.3f')}× |"
            )
        for opt in args.optimizers:
            error = summary.get((backend, opt), {}).get("error")
            if error:
                verdicts.append(f"- {BACKEND_LABELS[backend]}, {LABELS[opt]}: not built — {error}")
        if "sisa" in vs:
            t, m, a = (vs["sisa"][k] for k in ("tokens_per_s", "rss_mib", "allocator_mib"))
            verdicts.append(
                f"- {BACKEND_LABELS[backend]}: sisa tokens/s {num(t, '.3f')}× AdamW's (target ≥ 0.97: "
                f"{'met' if t >= 0.97 else f'missed by {0.97 - t:.3f}' if t == t else 'not measured'}), peak RSS "
                f"{num(m, '.3f')}× and allocator peak {num(a, '.3f')}× (target ≤ 1.05: "
                f"{'met' if max(m, a) <= 1.05 else 'missed' if m == m and a == a else 'not measured'})."
            )
            ranges = [summary.get((backend, o), {}).get("tokens_per_s_range") for o in ("sisa", "adamw")]
            if all(ranges) and ranges[0][0] <= ranges[1][1] and ranges[1][0] <= ranges[0][1]:
                verdicts[-1] += (
                    " The per-round tokens/s ranges of sisa and AdamW overlap: at this machine load the throughput "
                    "ratio is not resolved (rerun on a quiet machine, or with more --rounds)."
                )
        if "nsisa" in vs and "muon" in vs:
            n, u = vs["nsisa"], vs["muon"]
            verdicts.append(
                f"- {BACKEND_LABELS[backend]}, side by side vs AdamW: nsisa + AdamW tokens/s "
                f"{num(n['tokens_per_s'], '.3f')}×, allocator peak {num(n['allocator_mib'], '.3f')}×, peak RSS "
                f"{num(n['rss_mib'], '.3f')}×; Muon + AdamW tokens/s {num(u['tokens_per_s'], '.3f')}×, allocator "
                f"peak {num(u['allocator_mib'], '.3f')}×, peak RSS {num(u['rss_mib'], '.3f')}×."
            )
    lines += [
        "",
        "Reading the memory columns: the allocator peak is the forward/backward's (activations), reached before the "
        "optimizer state exists on this model size, so it can be the same for every optimizer; the peak RSS rise is "
        "what a second build of the optimizer adds (model copy, gradients, state, buffers) once the process's "
        "one-time costs are paid; the first-build column shows those one-time costs as well (it is largest for the "
        f"first optimizer of the launch, {LABELS[args.optimizers[0]]}, which loads the compiler and libraries).",
    ]
    lines += ["", "## Targets", "", *verdicts, ""]
    if failures:
        lines += ["## Failed launches", "", *[f"- {f}" for f in failures], ""]
    if missing:
        lines += [
            f"**Partial results** ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): not yet measured: "
            + "; ".join(missing)
            + ". Rerunning the command measures them (finished launches are cached).",
            "",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="back ends to run")
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS), help="optimizers")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer (compilation, lazy state)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per optimizer per round")
    p.add_argument("--layers", type=int, default=4, help="GPT-2 layers")
    p.add_argument("--width", type=int, default=256, help="GPT-2 width")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--block-size", type=int, default=128, help="tokens per sequence")
    p.add_argument("--data", default=None, help="corpus (engine/data.py); default: the stdlib source")
    p.add_argument(
        "--implementation",
        choices=("auto", "single", "foreach", "compiled"),
        default="auto",
        help="PISA kernels (auto: the library's default, compiled where a compiler works)",
    )
    p.add_argument("--timeout", type=float, default=5400.0, help="seconds one launch may take before it is killed")
    p.add_argument("--results", type=Path, default=Path(".cache/bench_e2e.jsonl"), help="result cache (JSON lines)")
    p.add_argument("--output", type=Path, default=Path("docs/benchmarks/e2e.md"), help="the page")
    p.add_argument("--cached-only", action="store_true", help="run nothing: write the page from --results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker), args.worker_out)
        return 0
    for name in ("rounds", "warmup", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"invalid --{name}={getattr(args, name)}: expected >= 1")
    flags = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--cached-only"]
    args.command = " ".join(["python scripts/bench_e2e.py", *flags])
    from engine.data import load_corpus

    load_corpus(args.data)  # build the corpus cache once, before any rank starts
    done = {}
    if args.results.exists():
        for line in args.results.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[key(r)] = r
    common = dict(
        world=2,
        layers=args.layers,
        width=args.width,
        heads=args.heads,
        batch_size=args.batch_size,
        block_size=args.block_size,
        warmup=args.warmup,
        data=args.data,
        implementation=args.implementation,
        memory="two-pass",  # the RSS method (pass 1 takes the one-time costs); older cached launches used one pass
    )
    specs = [
        dict(common, backend=b, optimizers=args.optimizers, rounds=args.rounds, steps=args.steps) for b in args.backends
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    todo, failures = [s for s in specs if key(s) not in done], []
    print(f"{len(specs)} launches: {len(specs) - len(todo)} cached, {len(todo)} to run", flush=True)
    with args.results.open("a") as out:
        for i, spec in enumerate(todo, 1):
            if args.cached_only:
                break
            try:
                result = launch(spec, args.timeout) | {"load1": os.getloadavg()[0]}
            except RuntimeError as e:  # one failing configuration must not cost the others' results
                failures.append(f"{describe(spec)}: {str(e).splitlines()[-1]}")
                print(f"  [{i}/{len(todo)}] FAILED {e}", flush=True)
                continue
            out.write(json.dumps(result) + "\n")
            out.flush()
            done[key(spec)] = result
            print(f"  [{i}/{len(todo)}] {describe(spec)} ({result['launch_s']:.0f} s)", flush=True)
    results = [done[key(s)] for s in specs if key(s) in done]
    missing = [describe(s) for s in specs if key(s) not in done]
    text = report(args, summarize(results), [r.get("load1", float("nan")) for r in results], missing, failures)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    os._exit(code)
