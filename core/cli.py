"""The entry of every ``packlora`` subcommand: a user's mistake is one line, a bug is a traceback."""
from __future__ import annotations

import functools
import os
import re
import sys

from packlora.core.errors import PackloraError

DEBUG_FLAG = "--debug"
DEBUG_HELP = "show the traceback of an error instead of its one-line message (also PACKLORA_DEBUG=1)"


def add_debug_flag(parser) -> None:
    """List ``--debug`` in a subcommand's ``--help`` (``cli_entry`` reads it before the parser does)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=DEBUG_HELP)


def description(doc: str) -> str:
    """The first line of a module docstring as a ``--help`` description, without reST markup.

    >>> description("``packlora export CKPT --merge OUT``: a :func:`merged` model, `plain`.\\n\\nMore.")
    'packlora export CKPT --merge OUT: a merged model, plain.'
    """
    line = doc.strip().splitlines()[0]
    line = re.sub(r":[\w:]+:`([^`]*)`", r"\1", line)
    return re.sub(r"``([^`]*)``|`([^`]*)`", lambda m: m.group(1) or m.group(2) or "", line)


def cli_entry(prog: str):
    """Decorate a subcommand's ``main(argv) -> int``: a ``PackloraError`` (a bad config, record, path or
    setting) prints ``PROG: error: MESSAGE`` (its fix included) on stderr and returns 1, with no
    traceback; ``--debug`` anywhere in ``argv`` (or ``PACKLORA_DEBUG=1``) lets the traceback through
    instead. Any other exception is a bug in packlora or a library: it propagates with its traceback.

    >>> from packlora.core.errors import InputError
    >>> @cli_entry("packlora demo")
    ... def main(argv):
    ...     raise InputError("data.train: give at least one data source")
    >>> import contextlib, io
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     code = main(["x"])
    >>> code, err.getvalue().splitlines()[0]
    (1, 'packlora demo: error: data.train: give at least one data source')
    >>> @cli_entry("packlora demo")
    ... def buggy(argv):
    ...     raise ValueError("an internal bug")
    >>> buggy([])
    Traceback (most recent call last):
    ...
    ValueError: an internal bug
    """

    def wrap(fn):
        @functools.wraps(fn)
        def main(argv=None, **kwargs):
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = DEBUG_FLAG in argv or os.environ.get("PACKLORA_DEBUG") == "1"
            try:
                return fn([a for a in argv if a != DEBUG_FLAG], **kwargs)
            except PackloraError as e:
                if debug:
                    raise
                print(f"{prog}: error: {e}", file=sys.stderr)
                print(f"{prog}: (add {DEBUG_FLAG} to see where it was raised)", file=sys.stderr)
                return 1
        return main
    return wrap
