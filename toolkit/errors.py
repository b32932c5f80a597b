"""User-facing errors: one line, no traceback (the CLI catches ToolkitError and exits non-zero)."""
from __future__ import annotations


class ToolkitError(Exception):
    """A problem with the user's input or files. The message is one line and names the file."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
