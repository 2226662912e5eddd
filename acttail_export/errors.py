"""User-facing errors: the CLI prints the message as one line on stderr and exits non-zero."""

__all__ = ["ExportError", "BadOption"]


class ExportError(Exception):
    """Bad input or an export that cannot go on; the message names the bad value and, where useful, the allowed ones.
    The CLI exits 1, click's code for a failure while running."""


class BadOption(ExportError):
    """An option value or argument that is wrong whatever the files hold (e.g. --min-sparsity above --sparsity).
    The CLI exits 2, click's code for a usage error, as it does for the values click itself rejects."""
