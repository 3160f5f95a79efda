"""Errors a user can fix: the CLI prints their message on one line and exits with code 2."""


class UsageError(ValueError):
    """Bad input from the user: flags, specs, files or data. The message is one clear line."""
