#!/usr/bin/env python
"""Convert a DeepSpeed ZeRO-1/2/3 checkpoint of PISA (saved on N ranks) into a world-size-free folder that
``pisa_zero.deepspeed.load_universal(engine, folder)`` loads on M ranks, keeping every optimizer state.

    python scripts/pisa_ds_to_universal.py --input_folder ckpt --tag global_step100 --output_folder ckpt_universal
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_folder", required=True, help="the folder passed to engine.save_checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    parser.add_argument("--output_folder", required=True, help="where to write the converted checkpoint")
    args = parser.parse_args(argv)
    from pisa_zero.integrations.deepspeed import convert_checkpoint

    out = convert_checkpoint(args.input_folder, args.output_folder, tag=args.tag)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
