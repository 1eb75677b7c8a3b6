"""``EvidriftError``: the one base of every user-facing error.

A user-facing error is one the user can fix: a wrong key or value in a study file, a missing or unreadable
file, a checkpoint that does not fit the model. Its message names the file, key or value and says how to fix
it. The command line catches exactly this class (exit code 2, one line, no traceback); every other exception
is a bug or an environment failure and keeps its traceback.
"""

from __future__ import annotations


class EvidriftError(Exception):
    """Base of every error whose message tells the user what to fix."""


class UsageError(EvidriftError, ValueError):
    """A name or value the user chose that cannot be used: an unknown method, metric, architecture, layer,
    step or option value. The message lists what is allowed."""


class DataError(EvidriftError, ValueError):
    """Data that cannot be used as given: an empty split, no usable test image, labels outside the classes."""


class MissingInputError(EvidriftError, FileNotFoundError):
    """A file a step needs does not exist; the message names it and the command that makes it."""
