"""Every command-line flag README.md and docs/ tell a user about is exercised by some test.

A flag is taken from the pages as ``--name``; it must occur, as that literal, in a test file (this one aside) —
the test that sets it and checks what it does. Flags of other programs the pages quote (torchrun's, ruff's,
pip's) are listed below with whose they are; docs/HOST_FRAMEWORKS.md, which describes the host frameworks' own
options, is not a page of this project's flags.
"""

from __future__ import annotations

import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
NOT_OURS = {"HOST_FRAMEWORKS.md"}
OTHER_PROGRAMS = {
    "--check": "ruff format --check",
    "--shutdown-timeout": "torchrun's wait for its ranks",
}
# ``--pisa-*`` names a family, each member documented (and tested) on its own: not a flag
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9](?![\w*-])")


def documented_flags() -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for page in PAGES:
        if os.path.basename(page) in NOT_OURS:
            continue
        with open(os.path.join(ROOT, page)) as f:
            for flag in FLAG.findall(f.read()):
                flags.setdefault(flag, []).append(os.path.relpath(os.path.join(ROOT, page), ROOT))
    return flags


def test_the_pages_document_flags():
    flags = documented_flags()
    assert "--max-minutes" in flags and "--deepspeed_config" in flags and len(flags) > 50


def test_every_documented_flag_is_exercised_by_a_test():
    sources = []
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "*.py"), recursive=True):
        if os.path.basename(path) != os.path.basename(__file__):
            with open(path) as f:
                sources.append(f.read())
    text = "\n".join(sources)
    untested = {
        flag: sorted(set(pages))
        for flag, pages in documented_flags().items()
        if flag not in OTHER_PROGRAMS and not re.search(rf"{re.escape(flag)}(?![\w-])", text)
    }
    assert not untested, (
        f"documented flags no test sets (write the test, or name the program they belong to): {untested}"
    )
