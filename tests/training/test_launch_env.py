"""Where a training process sits: launcher variables, srun's SLURM variables, and the checks
that stop a run whose counts disagree (``training.distributed.resolve_process_place``)."""
from __future__ import annotations

import os

import pytest

from packlora.training.distributed import LaunchEnvError, ProcessPlace, resolve_process_place

# What srun sets for task 3 of 4 on the second of two nodes (2 tasks per node), as seen on Slurm 22.05.
SRUN_TASK = {
    "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
    "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4", "MASTER_ADDR": "node01", "MASTER_PORT": "20417",
}  # fmt: skip
# The batch script itself: SLURM_PROCID/SLURM_NTASKS are set, SLURM_STEP_ID is not.
BATCH_SCRIPT = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}


def test_srun_task_maps_procid_localid_and_step_tasks():
    assert resolve_process_place(SRUN_TASK) == ProcessPlace(rank=3, local_rank=1, world_size=4, source="srun")


def test_launcher_variables_win_over_the_srun_task_they_run_in():
    # torchrun started by srun (one task per node): the SLURM variables describe the torchrun task
    env = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
           "RANK": "13", "LOCAL_RANK": "5", "WORLD_SIZE": "16"}  # fmt: skip
    assert resolve_process_place(env) == ProcessPlace(rank=13, local_rank=5, world_size=16, source="launcher")


def test_the_batch_script_itself_is_a_single_process():
    assert resolve_process_place(BATCH_SCRIPT) == ProcessPlace(0, 0, 1, "single")
    assert resolve_process_place({}) == ProcessPlace(0, 0, 1, "single")


def test_srun_starting_fewer_tasks_than_the_job_asked_for_is_an_error():
    with pytest.raises(LaunchEnvError) as excinfo:
        resolve_process_place({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"})
    assert str(excinfo.value).startswith(
        "srun started SLURM_STEP_NUM_TASKS=2 tasks but the job asked for SLURM_NTASKS=4; the world size would be wrong"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({**SRUN_TASK, "PACKLORA_WORLD_SIZE": "16"},
         "the launch asked for PACKLORA_WORLD_SIZE=16 processes (nodes x processes per node) but this one was "
         "started as rank 3 of 4 (SLURM_PROCID=3, SLURM_STEP_NUM_TASKS=4)"),
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "PACKLORA_WORLD_SIZE": "4"},
         "the launch asked for PACKLORA_WORLD_SIZE=4 processes (nodes x processes per node) but this one was "
         "started as rank 0 of 2 (RANK=0, WORLD_SIZE=2)"),
        ({"PACKLORA_WORLD_SIZE": "2"}, "the launch asked for PACKLORA_WORLD_SIZE=2 processes"),
    ],
)  # fmt: skip
def test_a_world_size_other_than_the_launch_asked_for_is_an_error(env, message):
    with pytest.raises(LaunchEnvError) as excinfo:
        resolve_process_place(env)
    assert str(excinfo.value).startswith(message)


def test_the_world_size_the_launch_asked_for_passes():
    assert resolve_process_place({**SRUN_TASK, "PACKLORA_WORLD_SIZE": "4"}).world_size == 4


def test_srun_task_without_master_addr_says_to_export_it():
    env = {k: v for k, v in SRUN_TASK.items() if k != "MASTER_PORT"}
    with pytest.raises(LaunchEnvError, match="started by srun as task 3 of 4, but MASTER_PORT not set; export"):
        resolve_process_place(env)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, "rank 2 / local rank 0 out of range for world size 2"),
        ({**SRUN_TASK, "SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
    ],
)
def test_out_of_range_or_garbled_ranks_are_errors(env, message):
    with pytest.raises(LaunchEnvError, match=message.replace("(", r"\(")):
        resolve_process_place(env)


def test_more_processes_per_node_than_visible_gpus_is_an_error_naming_cuda_visible_devices():
    env = {**SRUN_TASK, "CUDA_VISIBLE_DEVICES": "3"}
    with pytest.raises(LaunchEnvError) as excinfo:
        resolve_process_place(env, cuda_devices=1)
    assert str(excinfo.value).startswith(
        "local rank 1 but this process sees only 1 CUDA device(s) (CUDA_VISIBLE_DEVICES=3): more processes per node than GPUs"
    )
    assert resolve_process_place(env, cuda_devices=2).local_rank == 1


def test_configure_exports_the_srun_mapping(monkeypatch):
    from packlora.training import distributed

    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "PACKLORA_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SRUN_TASK, "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(name, value)  # restored afterwards, as are RANK & co. below
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    distributed.configure()

    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("3", "1", "4")
