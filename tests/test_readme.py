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


def test_every_recipe_and_script_the_readme_names_exists():
    named = set(re.findall(r"\b((?:examples|benchmarks)/[\w./-]+\.(?:toml|py))", (ROOT / "README.md").read_text()))
    assert "examples/mnist_recipe.toml" in named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, missing


def test_bundled_recipe_parses():
    from srcompress.recipe import load_recipe

    recipe = load_recipe(ROOT / "examples" / "mnist_recipe.toml")
    assert [kind for kind, _ in recipe.stages] == ["structured", "train"]
