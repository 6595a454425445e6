"""``python -m pisa_zero.configs [NAME] [--hf]``: list the shipped DeepSpeed JSONs, or print one."""

from __future__ import annotations

import argparse
import json
import sys

from . import load, names, with_hf_auto


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pisa_zero.configs",
        description="List the DeepSpeed JSONs shipped with pisa_zero, or print one (redirect it to a file).",
    )
    parser.add_argument(
        "name", nargs="?", help="a config's name, e.g. zero3, zero3_offload, adamw_zero3 (omit to list them)"
    )
    parser.add_argument(
        "--hf",
        action="store_true",
        help='set batch sizes, clipping, bf16/fp16 and the scheduler length to "auto" for Hugging Face Trainer / '
        "accelerate, which fill them from TrainingArguments",
    )
    args = parser.parse_args(argv)
    if args.name is None:
        if args.hf:
            parser.error("--hf needs a config name")
        print("\n".join(names()))
        return 0
    try:
        config = load(args.name)
    except ValueError as e:
        parser.error(str(e))
    print(json.dumps(with_hf_auto(config) if args.hf else config, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
