"""The front ends people use, from their pages' own code: Hugging Face's Trainer with and without DeepSpeed, and
accelerate with a DeepSpeed plugin; and the DeepSpeed JSONs that ship inside the package.

Each launch runs the page's code block as written (cut out by its ``<!-- snippet: NAME -->`` marker) with a report
appended that reads what the run built: which parameters each PISA group holds, its hyper-parameters, the losses.
The expected groups are written here by name, not computed with `pisa_zero.param_groups`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from distributed import HeldPort, require  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: GPT-2's block matrices in the pages' 2-layer model: NSISA's group, by name.
BLOCK_MATRIX = re.compile(r"transformer\.h\.[01]\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
#: What HF's DeepSpeed page sets to "auto" (batch sizes, clipping, precision, the scheduler's length) and the optimizer
#: fill-ins PISA gives a meaning to (docs/hf_trainer.md).
HF_AUTO = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
HF_AUTO_OPTIMIZER = ("lr", "eps", "weight_decay")


def snippet(page: str, name: str) -> str:
    text = (ROOT / "docs" / page).read_text()
    match = re.search(rf"<!-- snippet: {name} -->\n```\w+\n(.*?)```", text, re.S)
    assert match, f"docs/{page} has no snippet {name!r}"
    return match.group(1)


def child_env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run(cmd: list[str], cwd: Path, timeout: int = 540) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{out[-6000:]}"
    return out


# The report appended to a DeepSpeed run's script: every rank writes what its engine holds.
DEEPSPEED_REPORT = """
import json as _json, os as _os
_engine = {engine}
_zero = _engine.optimizer
_names = {{id(p): n for n, p in _engine.module.named_parameters()}}
_held = {{}}
for _sub, _params in enumerate(_zero.fp16_groups):
    _held.setdefault(_zero.sub_group_to_group_id[_sub], []).extend(_names[id(p)] for p in _params)
_pisa = _engine.basic_optimizer
_keys = ("preconditioner", "sigma", "rho", "momentum", "ns_steps", "betas", "eps", "weight_decay", "lr_ref")
_report = {{
    "optimizer": type(_pisa).__name__,
    "orthogonalizer": type(_pisa._orthogonalizer).__name__,
    "dp_world_size": _engine.dp_world_size,
    "groups": [dict({{k: g.get(k) for k in _keys}}, names=sorted(_held[i])) for i, g in enumerate(_pisa.param_groups)],
    "losses": {losses},
}}
with open(f"report_{{_os.environ['RANK']}}.json", "w") as _f:
    _json.dump(_report, _f)
"""


def printed_losses(out: str) -> list[float]:
    """The ``step N loss X`` lines the pages' scripts print (rank 0, or every rank where accelerate cannot tell)."""
    return [float(x) for x in re.findall(r"step \d+ loss (\d+\.\d+)", out)]


def check_nsisa_and_adamw(report: dict, lr_ref: float) -> None:
    """The groups configs/pisa_zero3.json asks for, on 2 ZeRO-3 ranks with NSISA's whole-matrix routing."""
    assert report["optimizer"] == "PISA" and report["dp_world_size"] == 2
    assert report["orthogonalizer"] == "PartitionOrthogonalizer"
    nsisa, aux = report["groups"]
    assert nsisa["names"] and all(BLOCK_MATRIX.fullmatch(n) for n in nsisa["names"]) and len(nsisa["names"]) == 8
    assert not any(BLOCK_MATRIX.fullmatch(n) for n in aux["names"]) and "transformer.wte.weight" in aux["names"]
    assert (nsisa["preconditioner"], nsisa["sigma"], nsisa["rho"]) == ("nsisa", 30.0, 100.0)
    assert (nsisa["momentum"], nsisa["ns_steps"], nsisa["lr_ref"]) == (0.95, 5, lr_ref)
    assert (aux["preconditioner"], aux["lr_ref"], aux["betas"], aux["weight_decay"]) == (
        "adamw",
        3e-3,
        [0.9, 0.95],
        0.0,
    )
    losses = report["losses"]
    assert len(losses) >= 6 and losses[-1] < losses[0] - 1.0, losses


@pytest.mark.slow
def test_hf_trainer_with_deepspeed_zero3_trains_the_shipped_nsisa_json(tmp_path):
    """docs/hf_trainer.md's script under `deepspeed --num_gpus 2` (CPU), with configs/pisa_zero3.json given HF's usual
    "auto" values and the optimizer fill-ins: NSISA + AdamW as the JSON says, learning_rate as PISA's reference lr."""
    require("transformers")
    require("accelerate")
    config = json.loads((ROOT / "configs" / "pisa_zero3.json").read_text())
    for key in HF_AUTO:
        config[key] = "auto"
    config["bf16"]["enabled"] = "auto"
    config["scheduler"]["params"].update(total_num_steps="auto", warmup_num_steps="auto")
    config["optimizer"]["params"].update({key: "auto" for key in HF_AUTO_OPTIMIZER})
    (tmp_path / "ds.json").write_text(json.dumps(config))
    losses = "[h['loss'] for h in trainer.state.log_history if 'loss' in h]"
    script = snippet("hf_trainer.md", "trainer_deepspeed")
    (tmp_path / "train_hf.py").write_text(
        script + DEEPSPEED_REPORT.format(engine="trainer.model_wrapped", losses=losses)
    )
    with HeldPort() as held:
        run(["deepspeed", "--num_gpus", "2", "--master_port", str(held.port), "train_hf.py"], tmp_path)
    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        check_nsisa_and_adamw(report, lr_ref=5e-5)  # TrainingArguments' default learning_rate, through "lr": "auto"
        assert report["groups"][0]["eps"] == 1e-8 and report["groups"][0]["weight_decay"] == 0.0
    assert reports[0]["losses"] == reports[1]["losses"]


@pytest.mark.slow
def test_accelerate_with_deepspeed_plugin_trains_the_shipped_nsisa_json(tmp_path):
    """docs/accelerate.md's YAML and script under `accelerate launch` (2 CPU ranks) with configs/pisa_zero3.json as
    shipped (bf16 off: this CPU's bf16 is not what is tested here)."""
    require("transformers")
    require("accelerate")
    config = json.loads((ROOT / "configs" / "pisa_zero3.json").read_text())
    config["bf16"]["enabled"] = False
    (tmp_path / "ds.json").write_text(json.dumps(config))
    (tmp_path / "accelerate.yaml").write_text(snippet("accelerate.md", "accelerate_yaml"))
    script = snippet("accelerate.md", "accelerate_script").replace(
        "for step, batch in", "losses = []\nfor step, batch in"
    )
    script = script.replace(
        "    loss = model(**batch).loss\n", "    loss = model(**batch).loss\n    losses.append(loss.item())\n"
    )
    end = "accelerator.end_training()"  # the report goes in before the page's last line
    report = DEEPSPEED_REPORT.format(engine="model", losses="losses")
    (tmp_path / "train_accelerate.py").write_text(script.replace(end, report + end))
    with HeldPort() as held:
        cmd = ["accelerate", "launch", "--config_file", "accelerate.yaml", "--main_process_port", str(held.port)]
        out = run([*cmd, "train_accelerate.py"], tmp_path)
    assert re.search(r"step 35 loss \d", out), out[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        report["losses"] = report["losses"][::5]
        check_nsisa_and_adamw(report, lr_ref=1 / 130)  # no "lr" in the JSON: PISA's 1/(σ+ρ)


@pytest.mark.slow
def test_deepspeed_script_trains_the_shipped_nsisa_json(tmp_path):
    """docs/deepspeed.md's script under `deepspeed --num_gpus 2` (CPU) with configs/pisa_zero3.json as shipped."""
    require("deepspeed")
    require("transformers")
    script = snippet("deepspeed.md", "deepspeed_script")
    end = "dist.destroy_process_group()"  # the report goes in before the page's last line
    (tmp_path / "train_ds.py").write_text(
        script.replace(end, DEEPSPEED_REPORT.format(engine="engine", losses="[]") + end)
    )
    config = str(ROOT / "configs" / "pisa_zero3.json")
    with HeldPort() as held:
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(held.port), "train_ds.py"]
        out = run([*cmd, "--deepspeed_config", config], tmp_path)
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        report["losses"] = printed_losses(out)
        check_nsisa_and_adamw(report, lr_ref=1 / 130)


@pytest.mark.slow
def test_fsdp2_script_trains_under_torchrun(tmp_path):
    """docs/fsdp2.md's script under `torchrun --nproc_per_node 2` (gloo): NSISA + AdamW on the FSDP2 shards."""
    require("transformers")
    script = snippet("fsdp2.md", "fsdp2_script")
    report = """
import json as _json
_names = {id(p): n for n, p in model.named_parameters()}
_groups = [dict(preconditioner=g["preconditioner"], names=sorted(_names[id(p)] for p in g["params"]))
           for g in optimizer.param_groups]
with open(f"report_{rank}.json", "w") as _f:
    _json.dump({"groups": _groups, "world": world}, _f)
"""
    (tmp_path / "train_fsdp2.py").write_text(
        script.replace("dist.destroy_process_group()", report + "dist.destroy_process_group()")
    )
    with HeldPort() as held:
        out = run(["torchrun", "--nproc_per_node", "2", "--master_port", str(held.port), "train_fsdp2.py"], tmp_path)
    losses = printed_losses(out)
    assert len(losses) == 8 and losses[-1] < losses[0] - 1.0, losses
    for rank in (0, 1):
        report = json.loads((tmp_path / f"report_{rank}.json").read_text())
        nsisa, aux = report["groups"]
        assert report["world"] == 2 and (nsisa["preconditioner"], aux["preconditioner"]) == ("nsisa", "adamw")
        assert len(nsisa["names"]) == 8 and all(BLOCK_MATRIX.fullmatch(n) for n in nsisa["names"])


@pytest.mark.slow
def test_megatron_launch_command_trains_under_the_device_shim(tmp_path):
    """docs/megatron.md's torchrun command, on 2 CPU ranks with tests/megatron_shim.py installed before the script
    (device placement only): NSISA trains on the stdlib corpus, the loss falls and the checkpoint is written."""
    require("megatron.core", "megatron-core", extra="megatron")
    command = " ".join(snippet("megatron.md", "megatron_launch").replace("\\\n", " ").split())
    argv = command.split()
    assert argv[:3] == ["torchrun", "--nproc-per-node", "2"] and argv[3] == "scripts/pretrain_gpt_pisa.py"
    script = str(ROOT / "scripts" / "pretrain_gpt_pisa.py")
    runner = tmp_path / "run_shimmed.py"
    runner.write_text(
        f"import runpy, sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "import megatron_shim\nmegatron_shim.install()\n"
        f"sys.argv[0] = {script!r}\nrunpy.run_path({script!r}, run_name='__main__')\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:3], str(runner), *argv[4:]]
    out = run(cmd, tmp_path)
    losses = [float(x) for x in re.findall(r"iteration +\d+/30 \| loss (\d+\.\d+)", out)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, out[-3000:]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"


PLAIN_REPORT = """
import json as _json
def _report(trainer):
    inner = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    keys = ("preconditioner", "sigma", "rho", "lr_ref")
    groups = [dict({k: g.get(k) for k in keys}, names=sorted(names[id(p)] for p in g["params"]))
              for g in inner.param_groups]
    return {"optimizer": type(inner).__name__, "groups": groups,
            "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
"""


def test_hf_trainer_without_deepspeed_takes_a_pisa_object_or_class(tmp_path):
    """docs/hf_trainer.md's two plain-Trainer blocks in one process: `optimizers=(PISA(...), None)` with NSISA + AdamW
    groups, then `optimizer_cls_and_kwargs=(PISA, {...})` over HF's decay / no-decay groups; both train."""
    require("transformers")
    require("accelerate")
    first, second = snippet("hf_trainer.md", "trainer_plain"), snippet("hf_trainer.md", "trainer_cls_and_kwargs")
    script = PLAIN_REPORT + first + "plain = _report(trainer)\n" + second + "by_class = _report(trainer)\n"
    script += "_json.dump({'plain': plain, 'by_class': by_class}, open('report.json', 'w'))\n"
    (tmp_path / "train_plain.py").write_text(script)
    run([sys.executable, "train_plain.py"], tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    plain, by_class = report["plain"], report["by_class"]
    assert plain["optimizer"] == by_class["optimizer"] == "PISA"
    nsisa, aux = plain["groups"]
    assert nsisa["preconditioner"] == "nsisa" and (nsisa["sigma"], nsisa["rho"]) == (30.0, 100.0)
    assert len(nsisa["names"]) == 8 and all(BLOCK_MATRIX.fullmatch(n) for n in nsisa["names"])
    assert aux["preconditioner"] == "adamw" and aux["lr_ref"] == 3e-3
    assert [g["preconditioner"] for g in by_class["groups"]] == ["sisa", "sisa"]
    assert all((g["sigma"], g["rho"]) == (1.0, 1000.0) for g in by_class["groups"])
    everything = sorted(n for g in by_class["groups"] for n in g["names"])
    assert everything == sorted(n for g in plain["groups"] for n in g["names"])
    for run_ in (plain, by_class):
        assert len(run_["losses"]) == 8 and run_["losses"][-1] < run_["losses"][0] - 0.5, run_["losses"]


# ------------------------------------------------------------------------------------------------ shipped configs
def test_repository_configs_are_the_packaged_ones():
    """configs/*.json are links to pisa_zero/configs/ (one source): same names, same bytes."""
    import pisa_zero.configs as configs

    repo = sorted((ROOT / "configs").glob("*.json"))
    assert [p.stem for p in repo] == configs.names() and len(repo) >= 6
    for p in repo:
        assert p.is_symlink() and p.resolve() == configs.path(p.stem).resolve()
        assert p.read_bytes() == configs.path(p.stem).read_bytes()


def test_wheel_ships_the_configs(tmp_path):
    """A wheel built from the tree holds every JSON the README tells users to run, byte for byte."""
    import shutil

    import pisa_zero.configs as configs

    source = tmp_path / "source"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "pisa_zero", source / "pisa_zero", ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path)]
    subprocess.run([*cmd, str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("pisa_zero-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in configs.names():
            assert z.read(f"pisa_zero/configs/{name}.json") == configs.path(name).read_bytes()
        assert "pisa_zero/configs/__main__.py" in z.namelist()


def test_configs_command_lists_prints_and_refuses_by_name():
    import pisa_zero.configs as configs

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "pisa_zero.configs", *argv], capture_output=True, text=True)

    assert cli().stdout.split() == configs.names()
    assert json.loads(cli("zero3").stdout) == json.loads((ROOT / "configs" / "pisa_zero3.json").read_text())
    assert json.loads(cli("adamw_zero3.json").stdout)["optimizer"]["type"] == "AdamW"
    hf = json.loads(cli("zero3_offload", "--hf").stdout)
    shipped = configs.load("zero3_offload")
    autos = {"train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"}
    assert {k for k, v in hf.items() if v == "auto"} == autos
    assert hf["bf16"] == {"enabled": "auto"}
    assert hf["scheduler"]["params"]["total_num_steps"] == hf["scheduler"]["params"]["warmup_num_steps"] == "auto"
    assert hf["optimizer"] == shipped["optimizer"] and hf["zero_optimization"] == shipped["zero_optimization"]
    bad = cli("zero4")
    assert bad.returncode == 2 and "'zero4'" in bad.stderr and "pisa_zero3" in bad.stderr


# ------------------------------------------------------------------------------------------------ the JSON's spelling
def test_by_role_is_the_spelling_and_auto_is_still_read_with_a_warning():
    from pisa_zero.deepspeed import parse_pisa_params

    params = {"preconditioner": "nsisa", "other_options": {"lr": 1e-3}}
    new = parse_pisa_params({**params, "param_groups": "by_role"})
    assert new.auto_groups and (new.matrix_preconditioner, new.other_preconditioner) == ("nsisa", "adamw")
    with pytest.warns(FutureWarning, match='"param_groups": "auto" is read as "by_role"'):
        old = parse_pisa_params({**params, "param_groups": "auto"})
    assert old == new
    with pytest.raises(ValueError, match=r"optimizer\.params\.param_groups='matrices'"):
        parse_pisa_params({**params, "param_groups": "matrices"})


@pytest.mark.parametrize(
    "params, key",
    [
        # HF fills "betas": "auto" with its Adam betas; the shipped JSONs set the auxiliary AdamW's in other_options
        ({"param_groups": "by_role", "betas": [0.9, 0.999], "other_options": {"betas": [0.9, 0.95]}}, "betas"),
        ({"preconditioner": "sisa", "betas": [0.9, 0.999]}, "betas"),
        ({"preconditioner": "sisa", "momentum": 0.9}, "momentum"),
        ({"preconditioner": "nsisa", "beta2": 0.99}, "beta2"),
        (
            {"param_groups": "by_role", "other_preconditioner": "sisa", "ns_steps": 3, "preconditioner": "sisa"},
            "ns_steps",
        ),
    ],
)
def test_a_top_level_key_no_group_reads_is_refused_by_name(params, key):
    from pisa_zero.deepspeed import parse_pisa_params

    with pytest.raises(ValueError, match=rf"optimizer\.params\.{key}=.* is read by no param group"):
        parse_pisa_params(params)


def test_top_level_betas_reach_the_auxiliary_adamw_when_it_sets_none():
    from torch import nn

    from pisa_zero.deepspeed import build_optimizer

    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    config = {"optimizer": {"type": "PISA", "params": {"param_groups": "by_role", "betas": [0.8, 0.9], "beta2": 0.99,
                                                        "other_preconditioner": "sisa"}}}  # fmt: skip
    with pytest.raises(ValueError, match="optimizer.params.betas"):  # sisa + nsisa: nobody reads betas
        build_optimizer(model, config)
    del config["optimizer"]["params"]["beta2"]  # nsisa + adamw: nobody would read it
    config["optimizer"]["params"]["other_preconditioner"] = "adamw"
    optimizer, _ = build_optimizer(model, config)
    nsisa, aux = optimizer.param_groups
    assert nsisa["preconditioner"] == "nsisa" and aux["preconditioner"] == "adamw" and aux["betas"] == (0.8, 0.9)
