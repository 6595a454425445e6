"""The DeepSpeed JSONs that ship with pisa_zero (the repository's ``configs/`` links to these files).

    python -m pisa_zero.configs                      # list them
    python -m pisa_zero.configs zero3 > ds.json      # write one out
    python -m pisa_zero.configs zero3 --hf > ds.json # with Hugging Face's "auto" placeholders

In Python: ``pisa_zero.configs.path("zero3")`` (a file to hand to ``--deepspeed_config``), ``load("zero3")`` (a dict).
A name is a file's stem (``pisa_zero3``, ``adamw_zero3``) or the stem without ``pisa_`` (``zero3``, ``zero3_offload``).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path

#: Hugging Face's Trainer and accelerate fill these from ``TrainingArguments`` when the JSON says ``"auto"``
#: (its DeepSpeed documentation's usual set: batch sizes, clipping, precision, the scheduler's length).
HF_AUTO_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
    "scheduler.params.total_num_steps",
    "scheduler.params.warmup_num_steps",
)


def _folder() -> Path:
    return Path(str(resources.files(__name__)))


def names() -> list[str]:
    """The shipped configs' stems, sorted."""
    return sorted(p.stem for p in _folder().glob("*.json"))


def path(name: str) -> Path:
    """The shipped JSON called ``name``; ValueError listing the names for an unknown one."""
    stem = name[:-5] if name.endswith(".json") else name
    for candidate in (stem, f"pisa_{stem}"):
        if candidate in names():
            return _folder() / f"{candidate}.json"
    raise ValueError(f"pisa_zero.configs: no config named {name!r}; the shipped ones are {names()}")


def load(name: str) -> dict:
    """The shipped JSON called ``name``, as a new dict."""
    with open(path(name)) as f:
        return json.load(f)


def with_hf_auto(config: dict) -> dict:
    """A copy of ``config`` with every :data:`HF_AUTO_KEYS` entry it has set to ``"auto"``, for Hugging Face's Trainer
    or accelerate (the optimizer block is left as written: see docs/hf_trainer.md)."""
    config = copy.deepcopy(config)
    for dotted in HF_AUTO_KEYS:
        *parents, key = dotted.split(".")
        node = config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node:
            node[key] = "auto"
    return config
