"""The exceptions a user can cause, in one place below everything else.

:class:`UserError` is what the command line prints as ``error: ...`` with exit status 2
(no traceback): bad configuration, missing or malformed files, refused operations.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback, exit 2."""
