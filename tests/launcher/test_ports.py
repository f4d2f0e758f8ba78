"""Rendezvous ports: parse the kernel's ephemeral range, pick outside it, bind-test, honour an explicit port."""
from __future__ import annotations

import socket

import pytest

from packlora.launcher import ports
from packlora.launcher.ports import choose_port, parse_port_range, pick_port, port_is_free, port_pool


@pytest.mark.parametrize(
    ("text", "expected"),
    [("32768\t60999\n", (32768, 60999)), ("1024 65535", (1024, 65535)), ("  49152   65535  ", (49152, 65535))],
)
def test_parse_port_range_reads_the_two_numbers(text, expected):
    assert parse_port_range(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [("32768", "expected two port numbers"), ("a b", "expected two port numbers"), ("1 2 3", "expected two port numbers"),
     ("60999 32768", "LOW <= HIGH"), ("0 100", "LOW <= HIGH"), ("1 70000", "LOW <= HIGH")],
)  # fmt: skip
def test_parse_port_range_rejects_bad_text_naming_the_file_and_value(text, why):
    with pytest.raises(ValueError) as excinfo:
        parse_port_range(text, source="/proc/x")
    assert str(excinfo.value).startswith("/proc/x: ") and why in str(excinfo.value) and repr(text) in str(excinfo.value)


@pytest.mark.parametrize(
    ("ephemeral", "expected"),
    [
        ((32768, 60999), [range(20000, 32768), range(61000, 65536)]),  # Linux default
        ((49152, 65535), [range(20000, 49152)]),  # IANA / macOS / Windows
        ((10000, 20000), [range(20001, 65536)]),
        ((1024, 65535), []),
    ],
)
def test_port_pool_is_everything_from_20000_outside_the_ephemeral_range(ephemeral, expected):
    assert port_pool(ephemeral) == expected


@pytest.mark.parametrize(
    ("seed", "expected"),
    [(0, 20000), (1, 20001), (12767, 32767), (12768, 61000), (17303, 65535), (17304, 20000), (1234567, 25983)],
)  # fmt: skip
def test_pick_port_starts_at_seed_modulo_the_pool_skipping_the_ephemeral_range(seed, expected):
    # the pool: 20000..32767 (12768 ports), then 61000..65535 (4536); 1234567 % 17304 = 5983 -> 25983
    assert pick_port((32768, 60999), seed, lambda p: True) == expected


def test_pick_port_skips_ports_that_do_not_bind_and_wraps_around():
    taken = {32767, 61000, 61001}
    assert pick_port((32768, 60999), 12767, lambda p: p not in taken) == 61002
    assert pick_port((32768, 60999), 17303, lambda p: p < 65535) == 20000


def test_pick_port_with_no_port_outside_the_ephemeral_range_says_to_pass_one():
    with pytest.raises(ValueError, match="ephemeral port range 1024-65535 covers every port from 20000 to 65535; pass --master-port"):
        pick_port((1024, 65535), 0, lambda p: True)


def test_pick_port_gives_up_after_the_attempts_naming_the_first_candidate():
    with pytest.raises(ValueError, match="none of 3 ports from 20010 on .* could be bound; pass --master-port"):
        pick_port((32768, 60999), 10, lambda p: False, attempts=3)


def test_port_is_free_is_false_for_a_port_in_use():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not port_is_free(sock.getsockname()[1], "127.0.0.1")


def test_choose_port_honours_an_explicit_port_even_inside_the_ephemeral_range():
    assert choose_port(40000) == 40000


def test_read_ephemeral_range_reads_the_file_or_assumes_linuxs_default(tmp_path):
    (tmp_path / "range").write_text("20000\t65000\n")
    assert ports.read_ephemeral_range(str(tmp_path / "range")) == (20000, 65000)
    assert ports.read_ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)


def test_choose_port_bind_tests_outside_the_given_range():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 65001))  # the first candidate is taken
        assert choose_port(seed=0, addr="127.0.0.1", ephemeral=(20000, 65000)) == 65002


def test_ports_command_prints_a_port_outside_the_ephemeral_range(capsys):
    assert ports.main(["--seed", "0"]) == 0
    port = int(capsys.readouterr().out)
    low, high = ports.read_ephemeral_range()
    assert not low <= port <= high and port >= 20000
