"""The pinned install set, constraints.txt: written from, and checked against, this environment.

Every install of raycurv (the README's two commands, .ci/run, deploy/Dockerfile) passes
``-c constraints.txt``, so a fresh machine on any later day resolves the same releases. The set
is the dependency closure of ``raycurv[test]`` as installed here (markers evaluated for this
platform), each distribution pinned to its exact version.

    python .ci/pins.py --check   # exit 1 and one line per difference if the environment drifted
    python .ci/pins.py --write   # after a deliberate upgrade: pin what is installed now
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
PROJECT = "raycurv"
EXTRAS = ("test",)
HEADER = """\
# The pinned install set of raycurv: the dependency closure of raycurv[test] on Linux x86-64,
# Python 3.11. Used by every install: pip install -c constraints.txt -e ".[test]".
# Written by `python .ci/pins.py --write`; tests/test_install.py checks it against the environment.
"""


def closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{canonical name: installed version} of ``project[extras]`` and everything it requires."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name(project), frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted or {""}):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    found.pop(canonicalize_name(project))
    return dict(sorted(found.items()))


def read_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: version} of the ``name==version`` lines of ``path``."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
            if not match:
                raise ValueError(f"{path.name}: not a name==version pin: {line!r}")
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def build_backend_pin() -> str:
    """The build backend requirement of pyproject.toml (pip builds raycurv in isolation, where
    constraints do not reach, so pyproject pins it itself)."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    return requires[0]


def differences(pins: dict[str, str], installed: dict[str, str]) -> list[str]:
    """One line per drift between the pins and the installed closure; empty when they agree."""
    out = [f"{name}: installed {version}, pinned {pins[name]}"
           for name, version in installed.items() if name in pins and pins[name] != version]
    out += [f"{name}: installed {version}, not pinned" for name, version in installed.items()
            if name not in pins]
    out += [f"{name}: pinned {version}, not required" for name, version in pins.items()
            if name not in installed]
    backend = Requirement(build_backend_pin())
    if str(backend.specifier) != f"=={pins.get(canonicalize_name(backend.name))}":
        out.append(f"pyproject's build backend {backend} differs from the pin of {backend.name}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare the environment with the pins")
    mode.add_argument("--write", action="store_true", help="pin the installed closure")
    args = parser.parse_args(argv)
    installed = closure()
    if args.write:
        CONSTRAINTS.write_text(HEADER + "".join(f"{n}=={v}\n" for n, v in installed.items()))
        print(f"wrote {CONSTRAINTS.name}: {len(installed)} pins")
        return 0
    drift = differences(read_pins(), installed)
    for line in drift:
        print(f"{CONSTRAINTS.name}: {line}", file=sys.stderr)
    if not drift:
        print(f"{CONSTRAINTS.name}: the {len(installed)} installed distributions match their pins")
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
