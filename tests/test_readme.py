"""The README's Python example runs as written and its loss falls (the README must stay true)."""

import contextlib
import io
import re
from pathlib import Path


def test_readme_python_example_trains():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    losses = [float(line.split()[1]) for line in out.getvalue().splitlines()]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.2
