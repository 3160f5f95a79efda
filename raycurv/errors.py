"""Errors a user can fix: the CLI prints their message on one line and exits with code 2."""

from pydantic import ValidationError


class UsageError(ValueError):
    """Bad input from the user: flags, specs, files or data. The message is one clear line."""


def validation_line(exc: ValidationError) -> str:
    """A spec's validation errors on one line: ``section.field: message; ...``."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
