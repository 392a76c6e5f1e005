"""The README's `load_model` example runs as written (on a trained tiny run instead of its path)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_load_model_example_runs_and_predicts_a_token(tiny_run, capsys):
    section = README.read_text().split("### From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = re.sub(r'load_model\("[^"]+"', f'load_model("{tiny_run}"', code)
    exec(compile(code, "README.md", "exec"), {})
    step, token = capsys.readouterr().out.split(" ", 1)
    assert int(step) == 10 and token.strip().startswith("'")  # TRAIN_STEPS, a decoded token
