"""``cli_entry``: packlora's own errors are one line with the fix; anything else is a bug with its traceback."""
from __future__ import annotations

import pytest

from packlora.core.cli import cli_entry
from packlora.core.errors import InputError, MissingPathError, StateError


@pytest.mark.parametrize("error", [InputError("data.train: give a source"), MissingPathError("config file not found: x"),
                                   StateError("adapter incomplete")])
def test_packlora_errors_print_one_line_and_return_1(error, capsys):
    @cli_entry("packlora demo")
    def main(argv):
        raise error

    assert main([]) == 1
    assert capsys.readouterr().err == f"packlora demo: error: {error}\npacklora demo: (add --debug to see where it was raised)\n"


@pytest.mark.parametrize("bug", [ValueError("an internal invariant"), KeyError("x"), FileNotFoundError("/tmp/cache")])
def test_other_exceptions_are_bugs_and_keep_their_traceback(bug):
    @cli_entry("packlora demo")
    def main(argv):
        raise bug

    with pytest.raises(type(bug)):
        main([])


def test_debug_lets_a_packlora_error_through_and_is_not_passed_on(monkeypatch):
    seen = []

    @cli_entry("packlora demo")
    def main(argv):
        seen.append(argv)
        raise InputError("bad")

    monkeypatch.delenv("PACKLORA_DEBUG", raising=False)
    with pytest.raises(InputError):
        main(["a", "--debug"])
    assert seen == [["a"]]
