#!/usr/bin/env python
"""Bytes on the wire per step and peak memory per rank: PISA mode A, PISA mode B and HSDP + AdamW on one model.

Runs a tiny transformers GPT-2 (built from a config, random tokens) on CPU gloo ranks, FSDP2 in every case:

- ``A-sisa`` / ``A-nsisa``: PISA mode A, ``fully_shard`` over all ranks (sisa everywhere / nsisa on block matrices +
  auxiliary AdamW, the LM default);
- ``B-sisa`` / ``B-nsisa``: PISA mode B, ``agents`` × ``world/agents`` mesh, FSDP on the shard sub-mesh + consensus;
- ``BH-sisa`` / ``BH-nsisa``: mode B with ``--local-steps H`` local steps per consensus round (ALGORITHM.md §6):
  bytes are averaged over whole rounds (one round of warm-up, then ⌈steps/H⌉ rounds);
- ``hsdp-adamw``: ``fully_shard`` on the same 2-D mesh as (replicate, shard) with ``torch.optim.AdamW`` (foreach);
  the loop calls ``pisa_zero.grads_are_finite`` before each step, as ``engine/train.py`` does for every optimizer
  (PISA's modes agree on that skip inside ``step()`` with the same 4-byte all-reduce).

Bytes are counted at the collective calls: every ``torch.distributed`` collective the run makes (FSDP2's all-gather
and reduce-scatter, HSDP's all-reduce, PISA's consensus and Newton–Schulz all-to-all, control all-reduces) is wrapped
and its payload converted to bytes *sent by this rank* with the ring-algorithm count NCCL's bus bandwidth uses:
all-reduce 2(n−1)/n·S, reduce-scatter (n−1)/n·S_in, all-gather (n−1)/n·S_out, all-to-all = the bytes addressed to
other ranks (exact), broadcast S (root) — n the group size. Only the outermost call is counted (no double counting
of collectives implemented through others).

Peak memory: the peak of live tensor bytes per rank, rebuilt from torch's CPU allocator events (the profiler's
``profile_memory=True`` records every allocation and free with its address) over the whole run: model construction,
sharding, warm-up and measured steps. That is every tensor byte — parameters, gradients, optimizer state,
activations, FSDP and consensus buffers, optimizer temporaries — and nothing else (the Python heap and gloo's own
buffers, the same in every mode, are excluded). With gloo, a buffer whose last reference a gloo worker thread drops
is freed on a thread the profiler does not see, at a moment set by thread timing: a rank's peak moves by a buffer or
two from run to run, in every mode. ``--fake-collectives`` runs each rank's program with torch's fake process group
instead (collectives are no-ops on the calling thread; every call, and so every byte count, is the same): each
buffer is then freed where the program drops it, and the peaks are the same in every run (what the test asserts).

    python scripts/comm_account.py --world 4 --agents 2          # self-spawns 4 gloo ranks
    torchrun --nproc-per-node 4 scripts/comm_account.py --agents 2
    python scripts/comm_account.py --world 4 --agents 2 --fake-collectives   # deterministic peaks, no data moved
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading

MODES = ("A-sisa", "A-nsisa", "B-sisa", "B-nsisa", "BH-sisa", "BH-nsisa", "hsdp-adamw")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=int, default=4, help="ranks to self-spawn when not launched by torchrun (4)")
    p.add_argument("--agents", type=int, default=2, help="agents m of mode B = replicas of HSDP (2); k = world/m")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step (3)")
    p.add_argument("--local-steps", type=int, default=4, help="H of the BH-* modes: local steps per round (4)")
    p.add_argument("--layers", type=int, default=2, help="GPT-2 layers (2)")
    p.add_argument("--d-model", type=int, default=128, help="GPT-2 width n_embd (128)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (4)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size (256, byte level)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (64)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank per step (4)")
    p.add_argument(
        "--bucket-elements",
        type=int,
        default=1 << 15,
        help="PISA consensus bucket (elements) in modes A/B (32768: ~15%% of a rank's shard here, the share the\n"
        "library default 2^22 is of a 1B-parameter model's shard on 8 ranks; bounds the step's temporaries)",
    )
    p.add_argument(
        "--fake-collectives",
        action="store_true",
        help="run every rank on torch's fake process group (collectives are no-ops; same calls and byte counts):\n"
        "peak memory without gloo's thread timing, the same in every run (self-spawn only)",
    )
    p.add_argument("--json", default=None, help="also write the per-mode, per-rank numbers to this JSON file")
    args = p.parse_args(argv)
    bad = [m for m in args.modes.split(",") if m not in MODES]
    if bad:
        p.error(f"--modes: unknown {bad}; choose from {MODES}")
    if args.local_steps < 1:
        p.error(f"--local-steps={args.local_steps} must be >= 1")
    if args.world < 1 or args.agents < 1 or args.world % args.agents:
        p.error(f"--agents={args.agents} must divide --world={args.world}")
    return args


# ------------------------------------------------------------------------------------------------ byte counting
class Counter:
    WRAPPED = (
        "all_reduce",
        "reduce_scatter_tensor",
        "reduce_scatter_single",
        "all_gather_into_tensor",
        "all_gather_single",
        "all_to_all_single",
        "all_gather",
        "broadcast",
    )

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.bytes: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.local = threading.local()
        self.originals = {}
        self.shard_ranks: set[int] = set()  # this rank's FSDP shard group in the mode being measured

    def scope(self, group, nbytes: float) -> str:
        """control (≤ 64 B payload), shard (inside this rank's FSDP shard group) or cross (agents / replicas)."""
        if nbytes <= 64:
            return "control"
        ranks = set(self.dist.get_process_group_ranks(group or self.dist.group.WORLD))
        return "shard" if ranks <= self.shard_ranks else "cross"

    def _size(self, group) -> int:
        return self.dist.get_world_size(group)

    @staticmethod
    def _nbytes(t) -> int:
        return t.numel() * t.element_size()

    def sent(self, name, args, kwargs) -> tuple[float, str]:
        def arg(i, key):
            return kwargs[key] if key in kwargs else (args[i] if len(args) > i else None)

        group_index = {"all_reduce": 2, "all_gather": 2, "broadcast": 2, "all_to_all_single": 4}.get(name)
        group_index = group_index if group_index is not None else (2 if name.startswith("all_gather") else 3)
        group = arg(group_index, "group")
        payload = self._payload(name, args, kwargs, arg)
        first = arg(0, "tensor") if name in ("all_reduce", "broadcast") else None
        size = self._nbytes(first) if first is not None else payload
        return payload, self.scope(group, size)

    def _payload(self, name, args, kwargs, arg) -> float:
        if name == "all_to_all_single":
            out, inp = arg(0, "output"), arg(1, "input")
            in_splits = arg(3, "input_split_sizes")
            n = self._size(arg(4, "group"))
            me = self.dist.get_rank(arg(4, "group"))
            row = inp.numel() // max(inp.shape[0], 1) if inp.ndim > 0 else 1
            splits = in_splits or [inp.shape[0] // n] * n
            return (sum(splits) - splits[me]) * row * inp.element_size()
        if name == "all_gather":
            t = arg(1, "tensor")
            n = self._size(arg(2, "group"))
            return (n - 1) * self._nbytes(t)
        if name == "broadcast":
            t, src = arg(0, "tensor"), arg(1, "src")
            return self._nbytes(t) if self.dist.get_rank() == src else 0.0
        if name == "all_reduce":
            t, group = arg(0, "tensor"), arg(2, "group")
            n = self._size(group)
            return 2 * (n - 1) / n * self._nbytes(t)
        if name in ("all_gather_single", "all_gather_into_tensor"):
            out, group = arg(0, "output_tensor"), arg(2, "group")
            n = self._size(group)
            return (n - 1) / n * self._nbytes(out)
        inp, group = arg(1, "input"), arg(3, "group")  # reduce_scatter_single / reduce_scatter_tensor
        n = self._size(group)
        return (n - 1) / n * self._nbytes(inp)

    def install(self):
        dist = self.dist
        for name in self.WRAPPED:
            original = getattr(dist, name)
            self.originals[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                depth = getattr(self.local, "depth", 0)
                if depth == 0:
                    nbytes, scope = self.sent(_name, args, kwargs)
                    key = f"{scope}:{_name.replace('_single', '').replace('_tensor', '').replace('_into', '')}"
                    self.bytes[key] = self.bytes.get(key, 0.0) + nbytes
                    self.calls[key] = self.calls.get(key, 0) + 1
                self.local.depth = depth + 1
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.local.depth = depth

            setattr(dist, name, wrapper)

    def reset(self):
        self.bytes.clear()
        self.calls.clear()


# ------------------------------------------------------------------------------------------------ one mode
def build_model(args):
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq,
        n_embd=args.d_model,
        n_layer=args.layers,
        n_head=args.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def run_mode(mode, args, counter):
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    import pisa_zero
    from pisa_zero.consensus import AgentTopology
    from pisa_zero.integrations.fsdp import prepare, transformer_blocks

    rank, world = dist.get_rank(), dist.get_world_size()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model = build_model(args)
        n_params = sum(p.numel() for p in model.parameters())
        hp = dict(sigma=10.0, rho=100.0, implementation="foreach")
        agent = 0
        local_steps = args.local_steps if mode.startswith("BH") else 1
        if mode.startswith("A") or mode.startswith("B"):
            topo = AgentTopology.build(agents=args.agents) if mode.startswith("B") else None
            agent = topo.agent_index if topo is not None else 0
            groups = pisa_zero.param_groups(model) if mode.endswith("nsisa") else None
            model, opt = prepare(model, topo, groups=groups, local_steps=local_steps, **hp)
            opt.consensus.bucket_elements = args.bucket_elements
            finite_check = None  # agreed inside PISA.step (one 4-byte all-reduce)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (args.agents, world // args.agents), mesh_dim_names=("replicate", "shard"))
            for block in transformer_blocks(model):
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
            agent = mesh.get_local_rank("replicate")
            finite_check = pisa_zero.grads_are_finite
        k = world if mode.startswith("A") else world // args.agents
        counter.shard_ranks = set(range(rank // k * k, rank // k * k + k))
        gen = torch.Generator().manual_seed(1000 + rank)
        warmup = local_steps  # whole rounds: one of warm-up, then the measured ones
        measured = -(-args.steps // local_steps) * local_steps
        for step in range(warmup + measured):
            if step == warmup:
                counter.reset()
            with torch.profiler.record_function("measured_step" if step >= warmup else "warmup_step"):
                x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
                with torch.profiler.record_function("forward_backward"):
                    loss = model(input_ids=x, labels=x).loss
                    loss.backward()
                with torch.profiler.record_function("optimizer_step"):
                    if finite_check is None or finite_check([p for p in model.parameters() if p.grad is not None]):
                        opt.step()
                    opt.zero_grad(set_to_none=True)
    with tempfile.TemporaryDirectory() as tmp:
        trace = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(trace)
        with open(trace) as f:
            events = json.load(f)["traceEvents"]
    peak, step_peak, opt_peak = live_bytes_peaks(events)
    per_step = {k: v / measured for k, v in counter.bytes.items()}
    calls = {k: v / measured for k, v in counter.calls.items()}
    del model, opt
    return {
        "mode": mode,
        "rank": rank,
        "agent": agent,
        "params": n_params,
        "bytes_per_step": per_step,
        "calls_per_step": calls,
        "peak_bytes": peak,
        "step_peak_bytes": step_peak,
        "optimizer_peak_bytes": opt_peak,
    }


def cpu_memory_events(events) -> list[dict]:
    """The profiler's CPU [memory] events (one allocation or free each), in time order."""
    return sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Id") == -1), key=lambda e: e["ts"]
    )


def live_bytes(memory):
    """Yield (event, live tensor bytes after it) over [memory] events.

    Each event is one allocation (+bytes) or free (−bytes) at an address; the live set is kept per address, so a
    free of a block allocated before the events start is ignored instead of skewing the sum (the profiler's own
    running "Total Allocated" counter is process-global and drifts across sessions)."""
    live: dict[int, int] = {}
    current = 0
    for e in memory:
        addr, nbytes = e["args"]["Addr"], e["args"]["Bytes"]
        if nbytes > 0:
            current += nbytes - live.get(addr, 0)
            live[addr] = nbytes
        else:
            current -= live.pop(addr, 0)
        yield e, current


def live_bytes_peaks(events) -> tuple[int, int, int]:
    """Peak live tensor bytes (whole run, measured steps, optimizer steps) rebuilt from the profiler's events."""
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "measured_step" and "dur" in e]
    opt_windows = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "optimizer_step" and "dur" in e]
    peak = step_peak = opt_peak = 0
    for e, current in live_bytes(cpu_memory_events(events)):
        peak = max(peak, current)
        if any(lo <= e["ts"] <= hi for lo, hi in windows):
            step_peak = max(step_peak, current)
        if any(lo <= e["ts"] <= hi for lo, hi in opt_windows):
            opt_peak = max(opt_peak, current)
    return peak, step_peak, opt_peak


def worker(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    counter = Counter()
    counter.install()
    results = []
    for mode in args.modes.split(","):
        dist.barrier()
        results.append(run_mode(mode, args, counter))
    if args.fake_collectives:  # nothing crosses ranks: each rank reports its own rows
        return results
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    return [r for per_rank in gathered for r in per_rank]


COLUMNS = {
    "shard:all_gather": "shard AG",
    "shard:reduce_scatter": "shard RS",
    "shard:all_to_all": "shard NS a2a",
    "cross:all_reduce": "cross AR",
    "cross:reduce_scatter": "cross RS",
    "cross:all_gather": "cross AG",
    "cross:all_to_all": "cross a2a",
    "control:all_reduce": "control AR",
}


def report(rows, args):
    modes = args.modes.split(",")
    k = args.world // args.agents
    n_params = rows[0]["params"]
    keys = sorted({key for r in rows for key in r["bytes_per_step"]})
    unknown = [key for key in keys if key not in COLUMNS]
    columns = [c for c in COLUMNS if c in keys] + unknown
    print(
        f"\nGPT-2 {args.layers}x{args.d_model}, {n_params:,} params, world={args.world}, mesh {args.agents} x {k} "
        f"(agents or replicas x shards), {args.batch}x{args.seq} tokens/rank/step. Bytes sent per rank per step "
        "(max over ranks); peak live tensor bytes per rank (max over ranks).\n"
    )
    head = ["mode"] + [COLUMNS.get(c, c) for c in columns]
    head += ["total B/step", "peak MiB", "step peak MiB", "bytes vs hsdp", "peak vs hsdp", "step peak vs hsdp"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for mode in modes:
        rs = [r for r in rows if r["mode"] == mode]
        per_col = {c: max(r["bytes_per_step"].get(c, 0.0) for r in rs) for c in columns}
        total = max(sum(r["bytes_per_step"].values()) for r in rs)
        step_peak = max(r["step_peak_bytes"] for r in rs)
        summary[mode] = (total, max(r["peak_bytes"] for r in rs), per_col, step_peak)
    base = summary.get("hsdp-adamw")
    for mode in modes:
        total, peak, per_col, step_peak = summary[mode]
        ratios = [f"{total / base[0]:.4f}", f"{peak / base[1]:.4f}", f"{step_peak / base[3]:.4f}"] if base else [""] * 3
        cells = [mode] + [f"{per_col[c]:,.0f}" for c in columns]
        cells += [f"{total:,.0f}", f"{peak / 2**20:.2f}", f"{step_peak / 2**20:.2f}", *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    return summary


def use_fake_collectives(rank: int, world: int) -> None:
    """Replace this process's process group (if any) by torch's fake one: collectives return at once."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        # a rank that tears its group down while a slower one is still connecting breaks that rank's init
        # ("Connection closed by peer"): the barrier completes only once every rank has connected
        dist.barrier()
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)


def main(argv=None):
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        if args.fake_collectives:
            sys.exit("comm_account: --fake-collectives self-spawns its ranks; run it without torchrun")
        import torch.distributed as dist

        dist.init_process_group("gloo")
        args.world = dist.get_world_size()
        rows = worker(args)
        if dist.get_rank() == 0:
            _finish(rows, args)
        dist.destroy_process_group()
        os._exit(0)
    _spawn(args)


def _finish(rows, args):
    report(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


def _rank_main(rank, args, store_path, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch.distributed as dist

    code = 0
    try:
        if args.fake_collectives:
            use_fake_collectives(rank, args.world)
        else:
            dist.init_process_group(
                "gloo", store=dist.FileStore(store_path, args.world), rank=rank, world_size=args.world
            )
        rows = worker(args)
        if rank == 0 or args.fake_collectives:
            queue.put(rows)
    except BaseException as e:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        queue.put(e if rank == 0 or args.fake_collectives else None)
        code = 1
    finally:
        queue.close()
        queue.join_thread()  # flush the result before os._exit
        if dist.is_initialized():
            dist.destroy_process_group()
        os._exit(code)


def _spawn(args):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, args, store, queue)) for r in range(args.world)]
        for p in procs:
            p.start()
        parts = [queue.get() for _ in range(args.world if args.fake_collectives else 1)]
        rows = next((p for p in parts if not isinstance(p, list)), [r for p in parts for r in p])
        for p in procs:
            p.join()
    if not isinstance(rows, list):
        sys.exit(f"comm_account: a rank failed: {rows!r}")
    _finish(rows, args)


if __name__ == "__main__":
    main()
