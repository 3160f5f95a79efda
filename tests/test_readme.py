"""The README's commands are the ones CI runs and the CLI accepts."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from raycurv.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    main_job, test_command = _readme_commands()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_main_job_parses():
    main_job, _ = _readme_commands()
    raycurv = main_job.split("&&")[-1].strip()
    args = build_parser().parse_args(shlex.split(raycurv)[1:])
    assert args.verb == "score"
