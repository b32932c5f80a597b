"""User-facing errors: one line, no traceback (the CLI catches ToolkitError and exits non-zero)."""
from __future__ import annotations


class ToolkitError(Exception):
    """A problem with the user's input or files. The message is one line and names the file."""

    def __init__(self, message: str, path: str | None = None):
        text = f"{path}: {message}" if path else message
        # one line even when a corrupt file puts line breaks (or other control characters) into a quoted name
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in text))
        self.path = path
