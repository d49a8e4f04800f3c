"""README.md starts with the two commands users (and CI, `.ci/run`) run: the main job, then the
tests. `.ci/run` takes README's second fenced command block as the test command, with this regex,
so a fenced block of any other kind above it would make CI run prose."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
COMMAND_BLOCK = r"```(?:bash|sh|shell|console)?\n(.*?)```"  # as in .ci/run


def test_readme_opens_with_the_main_job_then_the_tests() -> None:
    ci_script = (README.parent / ".ci" / "run").read_text()
    assert COMMAND_BLOCK in ci_script
    blocks = re.findall(COMMAND_BLOCK, README.read_text(), re.S)
    main_job, tests = blocks[0].strip(), blocks[1].strip()
    assert main_job == "pip install -e . && python -m multibyte fit --config image64.yaml --config cpu/image64.yaml"
    assert tests == "pip install -e '.[test]' && python -m pytest -q"
