"""Files that are not JSONL files: a directory, a FIFO, an unreadable file, a gzip file named
``.jsonl``, a file that is cut (or grows) while it is read. Each is one line naming the path and the
problem, from the reader, from ``packlora launch`` before any process starts, and from ``packlora
decode`` / ``eval-runaway`` / ``subset`` before any model is loaded; never a hang on a FIFO, never a
traceback, never line-by-line skips of a file that is not text.
"""
from __future__ import annotations

import gzip
import json
import os
import threading
from pathlib import Path

import pytest

from packlora.data_utils.records import DataFileError, MissingDataFileError, iter_records, read_records

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
ROOT = os.geteuid() == 0


def _make(kind: str, d: Path) -> Path:
    """A path named ``*.jsonl`` that is not a readable JSONL file, of ``kind``."""
    path = d / f"{kind}.jsonl"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "gzip":
        path.write_bytes(gzip.compress((json.dumps(CHAT) + "\n").encode()))
    elif kind == "unreadable":
        if ROOT:  # root reads any file it may open; /proc/self/mem opens but cannot be read at offset 0
            path.symlink_to("/proc/self/mem")
        else:
            path.write_text(json.dumps(CHAT) + "\n")
            path.chmod(0)
    elif kind != "missing":
        raise ValueError(kind)
    return path


KINDS = {  # kind -> (reason, the problem as the one line says it)
    "missing": ("not_found", "data file does not exist"),
    "directory": ("is_directory", "is a directory, not a JSONL data file"),
    "fifo": ("not_a_regular_file", "is a FIFO (named pipe), not a regular file"),
    "gzip": ("compressed", "is gzip-compressed, not JSONL text; decompress it first (gunzip -k"),
    "unreadable": ("unreadable", "cannot be read ("),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_reader_names_the_path_and_the_problem_in_one_line_whatever_on_error_says(kind, on_error, tmp_path):
    path = _make(kind, tmp_path)
    reason, problem = KINDS[kind]
    with pytest.raises(DataFileError) as err:
        read_records(path, on_error=on_error, skipped=[])
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and problem in msg and "\n" not in msg, msg
    assert err.value.reason == reason and err.value.path == str(path)
    assert isinstance(err.value, FileNotFoundError) == (kind == "missing")
    assert isinstance(err.value, MissingDataFileError) == (kind == "missing")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_launch_refuses_the_file_before_any_process_starts(kind, tmp_path, run_config, capsys):
    from packlora.launcher.cli import main

    path = _make(kind, tmp_path)
    config = run_config(**{"data.train": [str(path)]})
    for extra in (["--dry-run"], []):  # with and without reading the records
        with pytest.raises(SystemExit) as exit_:
            main([str(config), *extra])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        [line] = [ln for ln in err.splitlines() if str(path) in ln]
        assert KINDS[kind][1] in line and "data.train[0]" in line, err


@pytest.mark.parametrize("command", ["decode", "eval-runaway", "subset"])
@pytest.mark.parametrize("kind", ["directory", "fifo", "gzip", "unreadable"])
def test_input_of_decode_eval_and_subset_is_refused_in_one_line_before_a_model_loads(command, kind, tmp_path, capsys):
    from packlora.cli import main

    path = _make(kind, tmp_path)
    out = tmp_path / "out.jsonl"
    no_checkpoint = tmp_path / "no-such-checkpoint"  # read first: a missing checkpoint would be the error
    argv = {"decode": ["decode", str(no_checkpoint), "--input", str(path), "--output", str(out)],
            "eval-runaway": ["eval-runaway", str(no_checkpoint), "--input", str(path), "--output", str(out)],
            "subset": ["subset", "--input", str(path), "--output", str(out), "--ratio", "0.5", "--seed", "0"]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    first = err.splitlines()[0]
    assert first.startswith(f"packlora {command}: error: {path}: ") and KINDS[kind][1] in first, err
    assert "no-such-checkpoint" not in err


def _big_file(path: Path, n: int = 20_000) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i} " + "x" * 80}) + "\n")
    return path


@pytest.mark.parametrize("on_error", ["error", "skip"])
def test_file_cut_while_it_is_read_is_an_error_not_a_shorter_dataset(tmp_path, on_error):
    path = _big_file(tmp_path / "d.jsonl")
    records = iter_records(path, on_error=on_error, skipped=[])
    next(records)
    os.truncate(path, 5_000)  # a writer (or a sync) cuts the file while it is read
    with pytest.raises(DataFileError) as err:
        for _ in records:
            pass
    assert err.value.reason == "changed_while_read" and str(err.value).startswith(f"{path}: changed while it was read")
    assert "\n" not in str(err.value)


def test_file_appended_to_while_it_is_read_is_an_error(tmp_path):
    path = _big_file(tmp_path / "d.jsonl", n=100)
    records = iter_records(path)
    next(records)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "late"}) + "\n")
    with pytest.raises(DataFileError, match="changed while it was read"):
        list(records)


def test_a_line_cut_short_by_truncation_is_reported_as_the_truncation(tmp_path):
    """Under on_error: error the cut last line would be 'invalid JSON'; the real problem is named."""
    path = _big_file(tmp_path / "d.jsonl")
    records = iter_records(path)
    next(records)
    os.truncate(path, 300_000 + 37)  # mid-line
    with pytest.raises(DataFileError, match="changed while it was read"):
        list(records)


def test_reading_a_fifo_never_blocks(tmp_path):
    """A FIFO without a writer would block open() forever: it is refused from its stat alone."""
    path = _make("fifo", tmp_path)
    done = threading.Event()

    def read():
        try:
            read_records(path)
        except DataFileError:
            done.set()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(60)  # generous: a hang guard, not a timing
    assert done.is_set()
