"""The pinned install set (constraints.txt) is what is installed, and every install uses it."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINS_SCRIPT = ROOT / ".ci" / "pins.py"


def _pins_module():
    spec = importlib.util.spec_from_file_location("pins", PINS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_closure_matches_the_pins():
    done = subprocess.run([sys.executable, str(PINS_SCRIPT), "--check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_the_check_reports_drift():
    pins = _pins_module()
    pinned = pins.read_pins()
    installed = dict(pinned)
    installed["torch"] = "9.9.9"
    installed["left-pad"] = "1.0"
    del installed["numpy"]
    drift = pins.differences(pinned, installed)
    assert f"torch: installed 9.9.9, pinned {pinned['torch']}" in drift
    assert "left-pad: installed 1.0, not pinned" in drift
    assert f"numpy: pinned {pinned['numpy']}, not required" in drift
    assert len(drift) == 3


def test_the_runtime_and_test_dependencies_are_pinned_exactly():
    pins = _pins_module().read_pins()
    for name in ("ray", "torch", "torchvision", "pyarrow", "pytest", "schemathesis", "hypothesis",
                 "fastapi", "starlette", "pydantic"):
        assert name in pins, name


def test_every_install_line_uses_the_constraints_file():
    """README, .ci/run and the Dockerfile install with -c constraints.txt, and nothing else pins."""
    sources = {"README.md": ROOT / "README.md", ".ci/run": ROOT / ".ci" / "run",
               "deploy/Dockerfile": ROOT / "deploy" / "Dockerfile"}
    for name, path in sources.items():
        installs = re.findall(r"pip install [^\n`&]*", path.read_text())
        assert installs, f"{name} has no pip install"
        for line in installs:
            assert "-c constraints.txt" in line, f"{name}: `{line.strip()}` ignores the pins"
            assert "==" not in line, f"{name}: `{line.strip()}` pins outside constraints.txt"
