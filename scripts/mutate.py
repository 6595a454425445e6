"""Mutation testing: deliberate bugs, one at a time, each against the tests that must catch it.

    python scripts/mutate.py                 # every mutant; writes docs/testing_mutation.md
    python scripts/mutate.py --list          # the mutants, one line each
    python scripts/mutate.py --only NAME,..  # some of them; prints the table, writes nothing

Each mutant replaces one snippet of one file (it must occur exactly once: a stale mutant is an error, not a pass)
in a fresh copy of the tree (git's tracked and untracked, not ignored, files), then runs its tests there with
``pytest -x``; the copy's packages are the ones imported (checked first). A mutant is *caught* when its tests fail
(pytest exit 1); an import error, a timeout or a pass is not a catch. The unmutated copy must pass every test named
first, so a catch is the mutant's doing. Exit status: 0 when every mutant is caught.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(ROOT, "docs", "testing_mutation.md")
TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids
    bug: str  # what a user would suffer


def M(name, path, old, new, tests, bug):  # noqa: N802 - a table row
    return Mutant(name, path, old, new, tuple(tests.split()), bug)


FN, OPT, DSCFG = "pisa_zero/functional.py", "pisa_zero/optimizer.py", "pisa_zero/integrations/deepspeed/config.py"
T_OPT = "tests/test_optimizer.py"
MUTANTS = [
    # --- the math (fast paths against pisa_zero/reference.py and the formula)
    M("ns_coefficient", FN, "NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)", "NS_COEFFICIENTS = (3.4445, -4.7750, 2.0)",
      f"{T_OPT}::test_matches_reference_fp32", "a wrong Newton–Schulz coefficient"),
    M("ns_step_skipped", FN, "    for _ in range(steps):\n        gram = x @ x.mT",
      "    for _ in range(steps - 1):\n        gram = x @ x.mT",
      f"{T_OPT}::test_matches_reference_fp32", "one Newton–Schulz iteration skipped"),
    M("fused_l2_dropped", FN, "w.copy_(w_f + (c - w_f * scalars[_LAMBDA]) * scalars[_INV_SIGMA_PLUS_LAMBDA])",
      "w.copy_(w_f + c * scalars[_INV_SIGMA_PLUS_LAMBDA])",
      "tests/test_properties.py", "the compiled kernel ignores l2_lambda in the w update"),
    M("fused_bias_correction_dropped", FN, "q = torch.sqrt(v * inv_bias_correction2[0]) + scalars[_EPS]",
      "q = torch.sqrt(v) + scalars[_EPS]",
      f"{T_OPT}::test_first_step_bias_correction_closed_form", "sisa's second moment without bias correction"),
    M("fused_dual_sign", FN, "dual_new = dual_f - d * sigma", "dual_new = dual_f + d * sigma",
      f"{T_OPT}::test_matches_reference_fp32", "the dual ascent step with the wrong sign"),
    # --- the non-finite skip
    M("finite_check_dropped", FN, "return torch.isfinite(torch.stack(reductions)).all()",
      "return torch.ones((), dtype=torch.bool, device=tensors[0].device)",
      f"{T_OPT}::test_nonfinite_gradient_never_reaches_state", "a NaN gradient reaches the state"),
    M("grad_norm_ignored", OPT,
      "veto = torch.as_tensor(veto, device=norm.device).reshape(()) | ~torch.isfinite(norm)",
      "veto = torch.as_tensor(veto, device=norm.device).reshape(())",
      "tests/test_clip_grad.py::test_a_non_finite_grad_norm_skips_exactly_where_the_separate_check_does",
      "step(grad_norm=inf) steps (the clip's norm no longer decides the skip)"),
    M("megatron_norm_skip_dropped", "pisa_zero/integrations/megatron/distributed_optimizer.py",
      "        if math.isfinite(norm):\n            self._step_norm = norm",
      "        if True:\n            self._step_norm = norm",
      "tests/test_megatron.py::test_megatron_nonfinite_shard_on_one_rank_skips_on_all_ranks",
      "Megatron: a NaN shard on one rank is stepped into the weights"),
    M("consensus_nan_not_skipped", "pisa_zero/consensus.py",
      "        if not math.isfinite(total):\n            return False",
      "        if False:\n            return False",
      "tests/test_consensus.py::test_mode_b_two_agents_matches_reference",
      "mode B: a NaN gradient on one agent is stepped by every agent"),
    # --- the consensus weights
    M("consensus_equal_alpha", "pisa_zero/consensus.py", "self.alpha = count * self.shard_size / total",
      "self.alpha = 1.0 / self.agents",
      "tests/test_consensus.py::test_mode_b_two_agents_matches_reference",
      "mode B: agents weighted equally, not by their batch sizes"),
    M("local_round_equal_alpha", "pisa_zero/local_steps.py", "alpha = n * topo.shard_size / total",
      "alpha = 1.0 / topo.agents",
      "tests/test_local_steps.py::test_group_h5_matches_reference",
      "local steps: the round's consensus ignores the agents' token counts"),
    # --- the DeepSpeed JSON
    M("json_ns_steps_ignored", DSCFG, "kwargs = {k: params[k] for k in PISA_KEYS if k in params}",
      'kwargs = {k: params[k] for k in PISA_KEYS if k in params and k != "ns_steps"}',
      "tests/test_deepspeed.py::test_every_optimizer_params_key_sets_exactly_its_value",
      "optimizer.params.ns_steps silently ignored"),
    M("json_aux_lr_overridden", DSCFG, 'other_options.setdefault("lr", 3e-3)', 'other_options["lr"] = 3e-3',
      "tests/test_deepspeed.py::test_every_optimizer_params_key_sets_exactly_its_value",
      "other_options.lr overridden by the default"),
    M("json_check_grad_overflow_off", DSCFG, 'bf16.setdefault("check_grad_overflow", True)',
      'bf16.setdefault("check_grad_overflow", False)',
      "tests/test_deepspeed.py::test_bf16_check_grad_overflow_is_set_at_zero_1_2",
      "bf16 ZeRO-1/2 without DeepSpeed's global overflow check: ranks diverge on a NaN step"),
    M("json_partial_offload_accepted", DSCFG, 'if zero.get("offload_optimizer", {}).get("ratio", 1.0) != 1.0:',
      "if False:", "tests/test_deepspeed.py::test_bad_zero_configs_fail_fast",
      "offload_optimizer.ratio < 1 accepted (only DeepSpeedCPUAdam reads it)"),
    M("nvme_state_not_read_back", "pisa_zero/integrations/deepspeed/engine.py",
      "        wrap_load_checkpoint(result[0])", "        pass",
      "tests/test_deepspeed.py::test_nvme_offload_equals_cpu_offload_and_resumes_bit_for_bit",
      "NVMe offload: a resume restarts PISA's duals and moments from zero"),
    # --- Megatron
    M("megatron_adam_beta2_ignored", "pisa_zero/integrations/megatron/groups.py",
      "new.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)",
      "new.update(betas=(config.adam_beta1, 0.999), eps=config.adam_eps)",
      "tests/test_megatron.py::test_megatron_aux_adamw_takes_adam_beta1_beta2_eps",
      "OptimizerConfig.adam_beta2 ignored by the auxiliary AdamW"),
    M("embedding_routed_to_nsisa", "pisa_zero/param_groups.py",
      'is_matrix = _is_linear(module) and name == "weight" and len(_shape(p)) == 2 and id(p) not in excluded',
      'is_matrix = _is_linear(module) and name == "weight" and len(_shape(p)) == 2',
      "tests/test_param_groups.py", "the tied lm_head (an embedding) orthogonalised as a block matrix"),
    # --- the engine's flags
    M("clip_grad_ignored", "engine/backends.py", "torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)",
      "torch.nn.utils.clip_grads_with_norm_(params, 1e9, norm)",
      "tests/test_clip_grad.py::test_clip_grad_clips_to_the_norm_and_skips_on_a_non_finite_one",
      "--clip-grad computes the norm but does not clip"),
    M("max_minutes_ignored", "engine/train.py",
      "if self.rank == 0 and args.max_minutes is not None and time.time()",
      "if False and args.max_minutes is not None and time.time()",
      "tests/test_engine.py::test_max_minutes_stops_after_the_step_with_a_final_checkpoint",
      "--max-minutes never stops the run"),
    M("keep_checkpoints_ignored", "engine/checkpoints.py", "prune(folder, args.keep_checkpoints)",
      "prune(folder, 2)", "tests/test_engine.py::test_keep_checkpoints_keeps_the_newest_n",
      "--keep-checkpoints ignored (always 2)"),
    M("resume_preconditioner_honoured", "engine/resume.py",
      '"matrix_preconditioner": ("--matrix-preconditioner", REFUSED),',
      '"matrix_preconditioner": ("--matrix-preconditioner", HONOURED),',
      "tests/test_engine_guards.py::test_resume_refuses_another_preconditioner_naming_both_values",
      "resume with another preconditioner silently reuses the state"),
    M("ds_tensorboard_off", "engine/dsconfig.py",
      'config["tensorboard"] = {"enabled": bool(logdir),', 'config["tensorboard"] = {"enabled": False,',
      "tests/test_engine_guards.py::test_the_deepspeed_json_tensorboard_and_scheduler_follow_the_flags",
      "DeepSpeed's own TensorBoard scalars never written"),
    # --- checkpoints and monitoring
    M("checksum_unchecked", "pisa_zero/checkpoint.py", "elif _sha256(file) != sums[name]:", "elif False:",
      "tests/test_checkpoint.py::test_corrupted_or_missing_file_is_refused_by_name",
      "a corrupted checkpoint file is loaded"),
    M("disagreement_not_a_norm", "pisa_zero/monitor.py",
      'out[f"{prefix}/consensus_disagreement"] = math.sqrt(value[(label, "spread")])',
      'out[f"{prefix}/consensus_disagreement"] = value[(label, "spread")]',
      "tests/test_monitor.py", "consensus_disagreement logged as a squared norm"),
]  # fmt: skip


def tree_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def copy_tree(files: list[str]) -> str:
    dst = tempfile.mkdtemp(prefix="pisa_mutant_")
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(dst, f)), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    return dst


def mutated_text(m: Mutant, root: str = ROOT) -> str:
    """The file's text with the mutation applied; ValueError when the snippet is not there exactly once."""
    with open(os.path.join(root, m.path)) as f:
        text = f.read()
    if text.count(m.old) != 1:
        raise ValueError(f"mutant {m.name}: {m.old!r} occurs {text.count(m.old)} times in {m.path} (expected 1)")
    return text.replace(m.old, m.new)


def pytest_in(root: str, tests) -> tuple[int, float, str]:
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PYTEST_ADDOPTS", None)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return -1, time.monotonic() - start, "timeout"
    return r.returncode, time.monotonic() - start, (r.stdout + r.stderr)[-3000:]


def imports_from(root: str) -> str:
    """The folder ``pisa_zero`` and ``engine`` are imported from when run in ``root``, as pytest runs them."""
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import os, engine, pisa_zero; print(os.path.dirname(os.path.dirname(pisa_zero.__file__)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def verdict(rc: int) -> str:
    return {1: "caught", 0: "MISSED", -1: "TIMEOUT"}.get(rc, f"ERROR (pytest exit {rc})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the mutants and exit")
    p.add_argument("--only", default="", help="comma-separated mutant names (default: all; the table is written)")
    args = p.parse_args(argv)
    names = [m.name for m in MUTANTS]
    chosen = [n for n in args.only.split(",") if n] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"--only: unknown mutant(s) {unknown}; see --list")
    mutants = [m for m in MUTANTS if m.name in chosen]
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.path}: {m.bug}")
        return 0
    for m in mutants:  # every snippet present exactly once, before any work
        mutated_text(m)
    files = tree_files()
    base = copy_tree(files)
    try:
        if os.path.realpath(imports_from(base)) != os.path.realpath(base):
            raise SystemExit(f"mutate: the copy in {base} does not import its own pisa_zero/engine")
        tests = list(dict.fromkeys(t for m in mutants for t in m.tests))
        print(f"[mutate] baseline: the {len(tests)} test selections on the unmutated copy", flush=True)
        rc, secs, out = pytest_in(base, tests)
        if rc != 0:
            raise SystemExit(f"mutate: the unmutated tree fails its tests (pytest exit {rc}):\n{out}")
        print(f"[mutate] baseline passed in {secs:.0f} s", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rows = []
    for i, m in enumerate(mutants, 1):
        root = copy_tree(files)
        try:
            text = mutated_text(m, root)
            with open(os.path.join(root, m.path), "w") as f:
                f.write(text)
            rc, secs, out = pytest_in(root, m.tests)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        rows.append((m, verdict(rc), secs))
        print(f"[mutate] {i}/{len(mutants)} {m.name}: {verdict(rc)} ({secs:.0f} s)", flush=True)
        if rc not in (1,):
            print(out, flush=True)
    table = render(rows)
    print(table)
    if len(mutants) == len(MUTANTS):
        with open(TABLE, "w") as f:
            f.write(page(table, rows))
        print(f"[mutate] wrote {os.path.relpath(TABLE, ROOT)}")
    return 0 if all(v == "caught" for _, v, _ in rows) else 1


def render(rows) -> str:
    lines = ["| mutant | file | the bug | tests run | result | s |", "|---|---|---|---|---|---:|"]
    for m, v, secs in rows:
        tests = "<br>".join(f"`{t.removeprefix('tests/')}`" for t in m.tests)
        lines.append(f"| `{m.name}` | `{m.path}` | {m.bug} | {tests} | {v} | {secs:.0f} |")
    return "\n".join(lines)


def page(table: str, rows) -> str:
    caught = sum(v == "caught" for _, v, _ in rows)
    return f"""# Mutation testing

Deliberate bugs, applied one at a time to a copy of the tree; each mutant's tests must fail. Made by

```bash
python scripts/mutate.py
```

(`scripts/mutate.py --list` names them; the snippets and tests are in its `MUTANTS`, and
`tests/test_mutation_script.py` fails when a snippet no longer occurs exactly once in the code it names.) The
unmutated copy passed every test named here first. **{caught} of {len(rows)} mutants caught.** Seconds are each
mutant's pytest run, on the 2-core development machine.

{table}
"""


if __name__ == "__main__":
    sys.exit(main())
