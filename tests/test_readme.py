"""The README's commands and code stay true."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_second():
    bash = blocks("bash")
    assert len(bash[0].strip().splitlines()) == 1 and len(bash[1].strip().splitlines()) == 1
    assert "srcompress prune --sparsity 0.9 --example mnist" in bash[0]
    ci_lines = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith(("#", "set ", "cd "))]
    assert ci_lines == [bash[1].strip()]
    assert "TRITON_INTERPRET=1" in bash[1] and "torch==2.13.0" in bash[1]


def test_python_api_example_runs():
    namespace: dict = {}
    exec(compile(blocks("python")[0], "README.md", "exec"), namespace)
    assert abs(namespace["report"].sparsity["reached"] - 0.9) < 0.01
