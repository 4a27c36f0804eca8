"""The one base class of user mistakes.

Why: every command-line tool prints a user mistake (an option that means nothing, a missing or
wrong file, corrupt data, ranks that disagree) as one ``error:`` line with exit code 2, never a
traceback. Each module raises its own subclass (``CheckpointError``, ``DataError``, ...), and
``blsam.utils.cli.run_cli`` catches them all through this one class.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user gave: reported as one line, exit code 2."""
