"""The error types packlora raises about what it was given, and nothing else.

Every error about a user's input (a config key, a record, a path, a checkpoint, a setting this
machine cannot run) is a ``PackloraError``. The command line (``core/cli.py``) prints exactly
these in one line, naming the fix; any other exception is a bug and keeps its traceback::

    PackloraError
    ├── InputError (also ValueError)          a value is wrong: ConfigError, RecordError, LabelError, ...
    ├── PathError (also OSError)              a path cannot be used: not a file, unreadable, wrong kind
    │   └── MissingPathError (also FileNotFoundError)    it does not exist
    └── StateError (also RuntimeError)        what is on disk or in the environment is not as required

Each also derives from the builtin it refines, so ``except ValueError`` around packlora code keeps
catching what it caught before.

    >>> issubclass(InputError, ValueError), issubclass(MissingPathError, FileNotFoundError)
    (True, True)
    >>> isinstance(ValueError("a bug"), PackloraError)
    False
"""
from __future__ import annotations


class PackloraError(Exception):
    """Base of every error about what packlora was given; its message says what, the value and the fix."""


class InputError(PackloraError, ValueError):
    """A value packlora was given is wrong: a config key, a record, a flag, a checkpoint's content."""


class PathError(PackloraError, OSError):
    """A path packlora was given cannot be used: a directory where a file is expected, unreadable, wrong kind."""


class MissingPathError(PathError, FileNotFoundError):
    """A path packlora was given does not exist."""


class StateError(PackloraError, RuntimeError):
    """What is on disk or in the environment is not as required (an incomplete adapter, launch variables
    that disagree)."""
