"""Run a function on N real gloo CPU ranks (forked processes) and collect what each rank returns.

    sys.path.insert(0, os.path.dirname(__file__)); from distributed import run_distributed   # from a test file

    def body(rank, world_size, x):          # module-level function; runs after init_process_group
        ...
        return something_picklable

    results = run_distributed(body, 4, x, timeout=120)   # one result per rank, in rank order
    runs = run_scenarios({"a": body_a, "b": body_b}, 4, x)   # one launch; runs["a"] = scenario a's per-rank results

Each rank gets ``OMP_NUM_THREADS=1`` and a FileStore rendezvous in a fresh temporary directory (no port races), and
ends with ``dist.destroy_process_group()`` then ``os._exit`` so gloo cannot abort at interpreter exit. A rank that
raises makes the call fail with that rank's traceback (the other ranks are killed 5 s later: they may be blocked in a
collective); a run that passes ``timeout`` is killed (only the processes started here) and reported. Processes are
forked (fast; the test process must not have started CUDA); each rank compiles torch.compile kernels in its own
thread.

Also the tests' other plumbing: `require` (an optional extra's module: skipped only where it is not installed at all,
never where it is installed but broken, nor where ``CI`` is set), `skip_or_fail` and `HeldPort` (a ``--master_port``
nobody else can take before the launcher binds it).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import multiprocessing as mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.distributed as dist


def _worker(fn, rank: int, world_size: int, store_path: str, result_path: str, args, kwargs) -> None:
    code = 0
    try:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)
        # Compile in the rank's own thread: inductor's compile thread pool does not survive fork (torch resets its
        # process pool in a forked child, not its thread pool), so a rank compiling a kernel the test process had not
        # compiled yet would wait on the parent's dead pool threads forever.
        inductor_config.compile_threads = 1
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
        result = ("ok", fn(rank, world_size, *args, **kwargs))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", traceback.format_exc())
        code = 1
    try:
        with open(result_path, "wb") as f:
            pickle.dump(result, f)
    except Exception:  # noqa: BLE001
        with open(result_path, "wb") as f:
            pickle.dump(("error", traceback.format_exc()), f)
        code = 1
    try:
        if dist.is_initialized():
            if code == 0:  # no rank tears its group down while another is still connecting to it
                dist.barrier()
            dist.destroy_process_group()
        # os._exit skips atexit, which is what stops a rank's own multiprocessing children (e.g. the Manager that
        # Megatron's dist_checkpointing starts): stop them here so no process outlives the test.
        for child in mp.active_children():
            child.terminate()
            child.join(5)
    finally:
        os._exit(code)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 180.0, **kwargs) -> list:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results."""
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="pisa_dist_") as tmp:
        store_path = os.path.join(tmp, "store")
        result_paths = [os.path.join(tmp, f"result{r}.pkl") for r in range(world_size)]
        procs = [
            ctx.Process(target=_worker, args=(fn, r, world_size, store_path, result_paths[r], args, kwargs))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
            if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
                failed_at = time.monotonic()  # a rank failed: the others may wait in a collective forever
            if failed_at is not None and time.monotonic() - failed_at > 5.0:
                break
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        results, errors = [], []
        for r, path in enumerate(result_paths):
            if not os.path.exists(path):
                why = ", timed out" if r in hung else ""
                errors.append(f"rank {r}: no result (exit code {procs[r].exitcode}{why})")
                results.append(None)
                continue
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                errors.append(f"rank {r}:\n{value}")
                results.append(None)
            else:
                results.append(value)
        if errors:
            head = f"distributed run of {fn.__name__} on {world_size} ranks failed:\n"
            raise AssertionError(head + "\n".join(errors))
        return results


def _every_scenario(rank: int, world_size: int, scenarios: dict, args, kwargs) -> dict:
    out = {}
    for name, fn in scenarios.items():
        try:
            out[name] = ("ok", fn(rank, world_size, *args, **kwargs))
        except Exception:  # noqa: BLE001 - reported as that scenario's failure; the others still run
            out[name] = ("error", traceback.format_exc())
        dist.barrier()  # the next scenario starts together on every rank
    return out


class ScenarioResults:
    """What `run_scenarios` returns: ``results[name]`` is that scenario's per-rank list, or an AssertionError with
    the traceback of every rank where it raised."""

    def __init__(self, per_rank: list[dict], world_size: int):
        self._per_rank, self._world_size = per_rank, world_size

    def __getitem__(self, name: str) -> list:
        errors = [f"rank {r}:\n{v}" for r, out in enumerate(self._per_rank) for s, v in [out[name]] if s == "error"]
        if errors:
            raise AssertionError(f"scenario {name!r} on {self._world_size} ranks failed:\n" + "\n".join(errors))
        return [out[name][1] for out in self._per_rank]


def run_scenarios(scenarios: dict[str, Callable], world_size: int, *args, timeout: float = 180.0, **kwargs):
    """Run every ``scenarios[name](rank, world_size, *args, **kwargs)`` in ONE launch of ``world_size`` ranks, in
    order, each rank catching each scenario's exception so that one failing scenario does not hide the others (a
    scenario that leaves the other ranks blocked in a collective still ends the launch at ``timeout``). Tests read
    ``results[name]`` — one test id per scenario, one process group per world size (see a module-scoped fixture)."""
    return ScenarioResults(
        run_distributed(_every_scenario, world_size, scenarios, args, kwargs, timeout=timeout), world_size
    )


def in_ci() -> bool:
    """True where the environment variable ``CI`` is set (``.ci/run`` and CI services set it): there a missing
    optional dependency or a refused precondition fails instead of skipping."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``, or fail it where ``CI`` is set (a skip there would hide what it checks)."""
    __tracebackhide__ = True  # the report names the caller's line
    if in_ci():
        pytest.fail(f"{reason} (CI is set: this would be a skip elsewhere)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require(module: str, distribution: str | None = None, extra: str | None = None):
    """``module`` imported, for tests of an optional extra (call it at module level, or inside a test).

    Skips only where the distribution is not installed at all (no ``importlib.metadata`` entry and no importable
    top-level package) and ``CI`` is not set. Where it is installed, or ``CI`` is set, the module is imported for
    real: an ImportError (a broken or missing dependency, a version bump that moved a name) fails collection
    instead of skipping every test of the module with CI green. ``distribution`` defaults to the top-level name;
    ``extra`` names the pyproject extra in the skip message."""
    __tracebackhide__ = True
    top = module.split(".")[0]
    distribution = distribution or top
    try:
        importlib.metadata.distribution(distribution)
        installed = True
    except importlib.metadata.PackageNotFoundError:
        installed = importlib.util.find_spec(top) is not None  # e.g. a source checkout on PYTHONPATH
    hint = f"pip install -e '.[{extra}]'" if extra else f"pip install {distribution}"
    if not installed and not in_ci():
        pytest.skip(f"{distribution} is not installed ({hint})", allow_module_level=True)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if installed:
            raise  # installed but broken: the real error, as a collection error
        raise ImportError(f"{distribution} is not installed and CI is set, so its tests fail: {hint}") from e


@contextlib.contextmanager
def one_thread():
    """``torch.set_num_threads(1)`` inside, the previous count put back on exit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HeldPort:
    """A TCP port for a launcher's ``--master_port``, kept from everyone else until :meth:`close`.

    The port is bound (SO_REUSEADDR, not listening) for as long as this object is open: the kernel then gives it to
    no other ``bind(("", 0))`` and to no outgoing connection, while the launched rank 0's TCPStore (which binds with
    SO_REUSEADDR and listens) still gets it. Picking a port, closing it and handing the number to a launcher left a
    window of seconds (the launcher's start-up) in which anything on the machine could take it (EADDRINUSE). Close
    it once the launch has ended (``with HeldPort() as held: ... held.port``)."""

    def __init__(self):
        self._socket = socket.socket()
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("", 0))
        self.port: int = self._socket.getsockname()[1]

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> HeldPort:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CrossAgentCalls:
    """Counts torch.distributed collectives whose group reaches beyond ``agent_ranks`` while the context is open
    (what local steps promise never to make inside a round)."""

    NAMES = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter_single", "all_gather_into_tensor")
    NAMES += ("all_gather_single", "all_to_all_single", "all_gather", "broadcast")

    def __init__(self, agent_ranks):
        self.agent_ranks = set(agent_ranks)
        self.calls = 0
        self.originals = {}

    def __enter__(self):
        for name in self.NAMES:
            if not hasattr(dist, name):
                continue
            original = self.originals[name] = getattr(dist, name)

            def wrapper(*args, _original=original, **kwargs):
                group = kwargs.get("group")
                if not set(dist.get_process_group_ranks(group or dist.group.WORLD)) <= self.agent_ranks:
                    self.calls += 1
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def load_script(name: str):
    """A module of scripts/ (e.g. "comm_account"), imported from its file."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
