"""README's first two commands are the contract with a new user; CI must run the second one exactly."""

import re
from pathlib import Path

from dspy_promptmii.local.server import PORTABLE_CMAKE_ARGS

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_test_command_readme_gives():
    install_and_demo, install_and_test = bash_blocks((ROOT / "README.md").read_text(encoding="utf-8"))[:2]
    assert install_and_demo.endswith("promptmii demo") and 'pip install --no-cache-dir -e ".[local]"' in install_and_demo
    assert install_and_test.endswith("python -m pytest -q")
    for command in (install_and_demo, install_and_test):  # llama.cpp built portably (see PORTABLE_CMAKE_ARGS)
        # ...and never from a wheel pip built earlier with other flags (a cached native wheel crashed CI)
        assert f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --no-cache-dir -e ' in command
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))
    ]
    assert commands == [install_and_test]


def test_readme_has_no_unfilled_placeholders():
    for path in (ROOT / "README.md", ROOT / "benchmarks" / "results" / "README.md"):
        text = path.read_text(encoding="utf-8")
        assert "@@" not in text and "\u27e6" not in text, path  # no @@ or ⟦...⟧ left to fill
