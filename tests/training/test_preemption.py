"""Stop on request (``training.preemption`` and ``training.trainer.StopOnRequestCallback``) in one
process: what asks for a stop, that the Trainer is told to save and stop at that step, and the
acknowledgement the batch script reads. The two-node run with Slurm is ``tests/slurm/test_two_nodes.py``;
a 2-process run stopped through the file is ``tests/distributed/test_stop_on_request.py``."""
from __future__ import annotations

import json
import os
import signal
from types import SimpleNamespace

from transformers import TrainerControl

from packlora.training.preemption import STOPPED_EXIT_CODE, StopRequest, ack_path, acknowledge
from packlora.training.trainer import StopOnRequestCallback


def test_sigusr1_asks_for_a_stop_until_uninstalled(tmp_path):
    request = StopRequest(None, rank=0)
    before = signal.getsignal(signal.SIGUSR1)
    request.install()
    try:
        assert request.reason() == ""
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.reason() == "SIGUSR1"
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


def test_only_rank_0_reads_the_stop_file(tmp_path):
    stop = tmp_path / "stop-42"
    rank0, rank1 = StopRequest(str(stop), rank=0), StopRequest(str(stop), rank=1)
    assert rank0.reason() == rank1.reason() == ""
    stop.touch()
    assert rank0.reason() == f"stop file {stop}"
    assert rank1.reason() == ""  # it learns of the stop through the all-reduce


def _step(callback, step: int, max_steps: int = 10) -> TrainerControl:
    args = SimpleNamespace(device="cpu")
    state = SimpleNamespace(global_step=step, max_steps=max_steps, is_world_process_zero=True)
    return callback.on_step_end(args, state, TrainerControl())


def test_a_request_makes_the_trainer_save_and_stop_at_that_step(tmp_path):
    stop = tmp_path / "stop"
    callback = StopOnRequestCallback(StopRequest(str(stop), rank=0))

    control = _step(callback, 3)
    assert (control.should_save, control.should_training_stop, callback.stopped_at) == (False, False, None)
    stop.touch()
    control = _step(callback, 4)
    assert (control.should_save, control.should_training_stop) == (True, True)
    assert (callback.stopped_at, callback.reason) == (4, f"stop file {stop}")


def test_a_request_at_the_last_step_lets_the_run_finish(tmp_path):
    stop = tmp_path / "stop"
    stop.touch()
    callback = StopOnRequestCallback(StopRequest(str(stop), rank=0))

    control = _step(callback, 10, max_steps=10)
    assert (control.should_training_stop, callback.stopped_at) == (False, None)


def test_acknowledgement_names_the_step_and_checkpoint(tmp_path):
    stop = tmp_path / "stop-42"
    acknowledge(str(stop), tmp_path / "checkpoint-4", 4)

    assert ack_path(stop) == tmp_path / "stop-42.checkpoint"
    assert json.loads(ack_path(stop).read_text()) == {"global_step": 4, "checkpoint": str(tmp_path / "checkpoint-4")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stop-42.checkpoint"]  # no temporary left
    acknowledge(None, tmp_path / "checkpoint-4", 4)  # no stop file: nothing to acknowledge


def test_stopped_exit_code_is_ex_tempfail():
    assert STOPPED_EXIT_CODE == os.EX_TEMPFAIL == 75
