"""User-facing errors: the CLI prints the message as one line on stderr and exits non-zero."""

__all__ = ["ExportError"]


class ExportError(Exception):
    """Bad input or an export that cannot go on; the message names the bad value and, where useful, the allowed ones."""
