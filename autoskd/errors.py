"""User-facing errors.

Anything a user can fix (bad input, a missing column, an unknown method) raises
:class:`AutoSKDError` with one line that names the problem and the fix. The CLI prints
that line and exits non-zero; no traceback, and nothing finished is deleted.
"""


class AutoSKDError(Exception):
    """An error caused by the user's input, with a one-line message saying how to fix it."""
