"""Golden-string tests for the sbatch scripts of ``packlora slurm`` and for its CLI; nothing is submitted."""
from __future__ import annotations

import pytest
import torch

from launcher import cli, slurm_cli
from launcher.slurm import SlurmSpec, sbatch_script, srun_line


def _spec(**fields) -> SlurmSpec:
    base = dict(nodes=2, gpus_per_node=8, config="configs/sft.yaml", output="/shared/runs/sft/slurm", workdir="/home/me/packlora")
    return SlurmSpec(**{**base, **fields})


def test_torchrun_script_runs_one_torchrun_per_node_with_a_port_outside_the_ephemeral_range():
    spec = _spec(partition="gpu", time="04:00:00", account="proj42", bin_dir="/home/me/packlora/.venv/bin",
                 output_dir="/shared/runs/sft", overrides=("training.max_steps=100",))  # fmt: skip

    assert sbatch_script(spec) == """\
#!/bin/bash
# Written by `packlora slurm`: 2 node(s) x 8 process(es) = 16 training processes, one torchrun task per node.
#SBATCH --job-name=packlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --partition=gpu
#SBATCH --time=04:00:00
#SBATCH --account=proj42
#SBATCH --output=/shared/runs/sft/slurm/slurm-%j.out
set -euo pipefail
cd /home/me/packlora
export PATH=/home/me/packlora/.venv/bin:"$PATH"
export PACKLORA_WORLD_SIZE=16
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$(python -m launcher.ports --seed "$SLURM_JOB_ID")"
echo "packlora: job $SLURM_JOB_ID, 2 node(s) x 8 process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "packlora: job $SLURM_JOB_ID started;" "checkpoints in" /shared/runs/sft "TensorBoard logs in" /shared/runs/sft/runs "Slurm log" /shared/runs/sft/slurm/slurm-"$SLURM_JOB_ID".out
srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c 'exec torchrun --nnodes 2 --nproc-per-node 8 --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m training.train configs/sft.yaml training.max_steps=100' && status=0 || status=$?
echo "packlora: job $SLURM_JOB_ID finished with exit code $status;" "checkpoints in" /shared/runs/sft "TensorBoard logs in" /shared/runs/sft/runs "Slurm log" /shared/runs/sft/slurm/slurm-"$SLURM_JOB_ID".out
exit "$status"
"""


def test_deepspeed_script_writes_the_allocations_hostfile_and_refuses_remapped_gpus():
    text = sbatch_script(_spec(launcher="deepspeed", gpus_per_node=4, master_port=29500))

    lines = text.splitlines()
    assert "export MASTER_PORT=29500" in lines  # an explicit port is honoured
    assert (
        'python -m launcher.hostfile --slots 4 $(scontrol show hostnames "$SLURM_JOB_NODELIST") '
        '> /shared/runs/sft/slurm/hostfile-"$SLURM_JOB_ID"'
    ) in lines
    assert srun_line(_spec(launcher="deepspeed", gpus_per_node=4)) == (
        "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "
        """'case "${CUDA_VISIBLE_DEVICES:-0,1,2,3}" in 0,1,2,3) ;; *) echo "packlora: deepspeed would remap the """
        """GPUs Slurm assigned (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); use --launcher torchrun" >&2; exit 2;; """
        """esac; exec deepspeed --num_nodes 2 --num_accelerators 4 --master_addr "$MASTER_ADDR" --master_port """
        """"$MASTER_PORT" --hostfile /shared/runs/sft/slurm/hostfile-"$SLURM_JOB_ID" --no_ssh --node_rank """
        """"$SLURM_NODEID" --no_local_rank --module training.train configs/sft.yaml'"""
    )


def test_srun_per_process_script_on_cpu_asks_one_task_and_core_per_process():
    text = sbatch_script(_spec(nodes=1, gpus_per_node=0, launcher="srun"))

    assert text.splitlines()[1:5] == [
        "# Written by `packlora slurm`: 1 node(s) x 2 process(es) = 2 training processes, one srun task per process.",
        "#SBATCH --job-name=packlora",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=2",
    ]
    assert "#SBATCH --cpus-per-task=1" in text and "--gpus-per-node" not in text
    assert "export OMP_NUM_THREADS=1\nexport PACKLORA_WORLD_SIZE=2\n" in text
    assert (
        "srun --nodes=1 --ntasks-per-node=2 --kill-on-bad-exit=1 python -m training.train configs/sft.yaml "
        "&& status=0 || status=$?"
    ) in text


def test_cpu_torchrun_asks_one_core_per_process_for_the_node_task():
    text = sbatch_script(_spec(nodes=1, gpus_per_node=0, nproc_per_node=3))
    assert "#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=3\n" in text
    assert "--nproc-per-node 3 " in text


def test_srun_line_passes_words_with_spaces_and_quotes_through_bash_intact(tmp_path):
    """Run the line with stand-ins: ``srun`` drops its flags and runs the rest, ``torchrun`` prints its argv."""
    import os
    import subprocess

    (tmp_path / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (tmp_path / "torchrun").write_text('#!/bin/bash\nprintf "%s\\n" "$@"\n')
    for name in ("srun", "torchrun"):
        (tmp_path / name).chmod(0o755)
    line = srun_line(_spec(config="my configs/a.yaml", overrides=("data.note=it's $HOME",)))
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_NODEID": "1",
           "MASTER_ADDR": "node01", "MASTER_PORT": "20417"}  # fmt: skip

    printed = subprocess.run(["bash", "-c", line], env=env, capture_output=True, text=True, check=True).stdout
    assert printed.splitlines() == [
        "--nnodes", "2", "--nproc-per-node", "8", "--node-rank", "1", "--master-addr", "node01",
        "--master-port", "20417", "-m", "training.train", "my configs/a.yaml", "data.note=it's $HOME",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"nodes": 0}, "--nodes must be >= 1, got 0"),
        ({"gpus_per_node": -1}, "--gpus-per-node must be >= 0 (0: CPU processes), got -1"),
        ({"nproc_per_node": 4}, "--nproc-per-node 4 with --gpus-per-node 8: start one process per GPU"),
        ({"launcher": "mpirun"}, "--launcher must be one of torchrun, deepspeed, srun, got 'mpirun'"),
        ({"master_port": 70000}, "--master-port must be in 1..65535, got 70000"),
        ({"time": "4h"}, "--time must be Slurm time like 30, 04:00:00 or 1-00:00, got '4h'"),
        ({"partition": "gpu a100"}, "--partition must be one word, got 'gpu a100'"),
        ({"output": "runs/slurm"}, "output must be an absolute path (the job may start elsewhere), got 'runs/slurm'"),
        ({"overrides": ("max_steps",)}, "override 'max_steps' must have the form key.sub=value"),
    ],
)
def test_invalid_slurm_settings_name_the_flag_and_value(fields, expected):
    with pytest.raises(ValueError) as excinfo:
        _spec(**fields)
    assert expected in str(excinfo.value)


# --- CLI ---------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """A minimal valid config at ``configs/x.yaml`` in a temp working directory; no GPU visible."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "x.yaml").write_text(
        "output_dir: runs/x\nmodel: {name_or_path: .}\ndata: {train: [data.jsonl]}\n"
    )
    return tmp_path


def test_slurm_dry_run_prints_the_script_and_the_sbatch_command_and_writes_nothing(config_file, capsys):
    code = slurm_cli.main(["configs/x.yaml", "--nodes", "1", "--gpus-per-node", "0", "--launcher", "srun",
                           "--master-port", "29511", "--dry-run", "training.max_steps=5"])  # fmt: skip

    out = capsys.readouterr().out
    root = config_file
    assert code == 0
    assert out.startswith("#!/bin/bash\n# Written by `packlora slurm`: 1 node(s) x 2 process(es)")
    assert f"#SBATCH --output={root}/runs/x/slurm/slurm-%j.out\n" in out
    assert f"cd {root}\n" in out and "export MASTER_PORT=29511\n" in out
    assert "python -m training.train configs/x.yaml training.max_steps=5 && status=0" in out
    assert out.endswith(f"# then: sbatch --parsable {root}/runs/x/slurm/packlora.sbatch\n")
    assert not (root / "runs").exists()


def test_slurm_without_submit_writes_the_script_and_prints_the_command(config_file, capsys):
    assert slurm_cli.main(["configs/x.yaml", "--nodes", "2", "--gpus-per-node", "4", "--output", "jobs"]) == 0

    script = config_file / "jobs" / "packlora.sbatch"
    assert capsys.readouterr().out == f"wrote {script}\nsbatch --parsable {script}\n"
    assert "#SBATCH --gpus-per-node=4\n" in script.read_text()


def test_slurm_bad_config_is_reported_before_anything_is_queued(config_file, capsys):
    with pytest.raises(SystemExit):
        slurm_cli.main(["configs/x.yaml", "--nodes", "1", "--gpus-per-node", "0", "training_max_steps=5"])
    assert "training_max_steps: unknown key" in capsys.readouterr().err


def test_slurm_wait_without_submit_is_an_error(config_file, capsys):
    with pytest.raises(SystemExit):
        slurm_cli.main(["configs/x.yaml", "--nodes", "1", "--gpus-per-node", "0", "--wait"])
    assert "--wait needs --submit" in capsys.readouterr().err


def test_launch_with_slurm_launcher_dry_run_is_the_slurm_script(config_file, capsys):
    assert cli.main(["configs/x.yaml", "--launcher", "slurm", "--nnodes", "1", "--master-port", "29511", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "one torchrun task per node." in out and "--nproc-per-node 2 " in out
    assert out.endswith("packlora.sbatch\n")


# --- packlora launch with a hostfile -------------------------------------------------------


def test_launch_takes_nodes_slots_and_master_addr_from_the_hostfile(config_file, capsys):
    (config_file / "hosts").write_text("# two boxes\nnode01 slots=2\n\nnode02 slots=2\n")

    assert cli.main(["configs/x.yaml", "--hostfile", "hosts", "--master-port", "29500", "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        "OMP_NUM_THREADS=1 deepspeed --num_nodes 2 --num_accelerators 2 --master_addr node01 --master_port 29500 "
        "--hostfile hosts --no_local_rank --module training.train configs/x.yaml\n"
    )


def test_launch_no_ssh_runs_only_this_nodes_share(config_file, capsys):
    (config_file / "hosts").write_text("node01 slots=2\nnode02 slots=2\n")

    cli.main(["configs/x.yaml", "--hostfile", "hosts", "--no-ssh", "--node-rank", "1", "--master-port", "29500", "--dry-run"])
    assert capsys.readouterr().out.endswith(
        "--hostfile hosts --no_ssh --node_rank 1 --no_local_rank --module training.train configs/x.yaml\n"
    )


@pytest.mark.parametrize(
    ("hostfile", "flags", "message"),
    [
        ("node01 slots=two\n", [], "hosts:1: 'node01 slots=two': slots must be a whole number >= 1, got 'two'"),
        ("node01 slots=2\nnode02 slots=4\n", [], "hosts gives slots=2,4 (must be the same on every host)"),
        ("node01 slots=2\n", ["--nproc-per-node", "4"], "hosts gives slots=2 but --nproc-per-node is 4"),
        ("node01 slots=2\n", ["--nnodes", "2"], "--nnodes 2 but hosts lists 1 host(s); drop --nnodes"),
    ],
)
def test_launch_rejects_a_hostfile_that_disagrees(config_file, capsys, hostfile, flags, message):
    (config_file / "hosts").write_text(hostfile)
    with pytest.raises(SystemExit):
        cli.main(["configs/x.yaml", "--hostfile", "hosts", "--master-port", "29500", "--dry-run", *flags])
    assert message in capsys.readouterr().err
