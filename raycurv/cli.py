"""`raycurv` command line: a verb -> module registry; each module turns flags into library calls."""

from __future__ import annotations

import argparse
import importlib
import sys

from pydantic import ValidationError

from raycurv.errors import UsageError, validation_line

# verb -> (module under raycurv.commands, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "score": ("score", "train a network on Ray and score every sample's curvature"),
    "evaluate": ("evaluate", "detection and agreement metrics of a stored run"),
    "sweep": ("sweep", "Ray Tune sweep over noise rates x h (x probes, variants, seeds, settings)"),
    "serve": ("serve", "the lookup service: per-sample memorization queries over HTTP"),
    "query": ("query", "one sample or the top k of a run, from the service or a table"),
    "reference": ("reference", "Feldman-Zhang memorization estimate from many subset-trained models"),
    "report": ("report", "figures and an HTML gallery of a run's most memorized samples"),
    "export": ("export", "a run's scores as CSV, JSON Lines, cleanlab's label issues or a FiftyOne dataset"),
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="raycurv", description=__doc__)
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    for verb, (module_name, help_text) in VERBS.items():
        module = importlib.import_module(f"raycurv.commands.{module_name}")
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except ValidationError as exc:
        print(f"raycurv {args.verb}: error: {validation_line(exc)}", file=sys.stderr)
    except UsageError as exc:
        print(f"raycurv {args.verb}: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
