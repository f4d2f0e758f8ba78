"""The ``packlora`` command's help: every subcommand lists ``--debug`` (which every error message
suggests), no description shows reST markup, and ``packlora --version`` prints the installed version."""
from __future__ import annotations

import configparser
import importlib

import pytest

from packlora.cli import SUBCOMMANDS, main
from tiny_assets import REPO_ROOT


@pytest.mark.parametrize("name", list(SUBCOMMANDS), ids=lambda n: f"packlora-{n}")  # an id "slurm" would read as the tier
def test_every_subcommands_help_lists_debug_and_shows_no_rest_markup(name, capsys):
    module = importlib.import_module(SUBCOMMANDS[name][0])
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    text = capsys.readouterr().out

    assert exit_info.value.code == 0
    assert "--debug" in text and "show the traceback of an error" in " ".join(text.split())
    assert "`" not in text and ":func:" not in text, text


def test_version_prints_the_installed_version(capsys):
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"packlora {cfg['metadata']['version']}\n"
