"""DeepSpeed hostfiles: written and read back; blank and comment lines skipped; bad lines quoted."""
from __future__ import annotations

import pytest

from packlora.launcher import hostfile
from packlora.launcher.hostfile import Host, HostfileError, format_hostfile, parse_hostfile, read_hostfile


def test_format_hostfile_writes_one_slots_line_per_host():
    assert format_hostfile([Host("node01", 8), Host("gpu-7.cluster", 4)]) == "node01 slots=8\ngpu-7.cluster slots=4\n"


def test_parse_reads_back_what_format_writes():
    hosts = (Host("a", 2), Host("b", 2), Host("c", 1))
    assert parse_hostfile(format_hostfile(hosts)) == hosts


def test_parse_skips_blank_lines_comments_and_trailing_comments():
    text = "\n# cluster A\n   \nnode01 slots=8\n\n  node02   slots=4   # half a node\n\t\n#node03 slots=8\n"
    assert parse_hostfile(text) == (Host("node01", 8), Host("node02", 4))


def test_parse_accepts_windows_line_endings():
    assert parse_hostfile("node01 slots=2\r\n\r\nnode02 slots=2\r\n") == (Host("node01", 2), Host("node02", 2))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node01 slots=8\nnode02 slots=eight\n", "hosts:2: 'node02 slots=eight': slots must be a whole number >= 1, got 'eight'"),
        ("node01 slots=\n", "hosts:1: 'node01 slots=': slots must be a whole number >= 1, got ''"),
        ("node01 slots=0\n", "hosts:1: 'node01 slots=0': slots must be a whole number >= 1, got '0'"),
        ("node01 slots=-2\n", "hosts:1: 'node01 slots=-2': slots must be a whole number >= 1, got '-2'"),
        ("\n\nnode01 slots=8.5\n", "hosts:3: 'node01 slots=8.5': slots must be a whole number >= 1, got '8.5'"),
        ("node01\n", "hosts:1: 'node01' is not 'HOST slots=N'"),
        ("node01 gpus=8\n", "hosts:1: 'node01 gpus=8' is not 'HOST slots=N'"),
        ("node01 slots=8 extra\n", "hosts:1: 'node01 slots=8 extra' is not 'HOST slots=N'"),
        ("node01 slots=8\nnode01 slots=8\n", "hosts:2: 'node01 slots=8': host 'node01' is already listed on line 1"),
        ("\n# nothing\n", "hosts: no 'HOST slots=N' line"),
    ],
)  # fmt: skip
def test_parse_rejects_a_bad_line_quoting_it_with_its_number(text, message):
    with pytest.raises(HostfileError) as excinfo:
        parse_hostfile(text, source="hosts")
    assert str(excinfo.value).startswith(message)


def test_read_hostfile_names_a_missing_path(tmp_path):
    with pytest.raises(HostfileError, match="hostfile not found: '.*/nope'"):
        read_hostfile(str(tmp_path / "nope"))


def test_hostfile_command_writes_the_allocation(capsys):
    assert hostfile.main(["--slots", "8", "node01", "node02"]) == 0
    assert capsys.readouterr().out == "node01 slots=8\nnode02 slots=8\n"


def test_deepspeeds_own_parser_reads_what_we_write():
    from deepspeed.launcher.runner import _parse_hostfile

    text = format_hostfile([Host("node01", 8), Host("node02", 8)])
    assert dict(_parse_hostfile(text.splitlines())) == {"node01": 8, "node02": 8}
