"""Golden-string tests for the sbatch scripts of ``packlora slurm`` and for its CLI; nothing is submitted."""
from __future__ import annotations

import os
import subprocess

import pytest
import torch

from packlora.launcher import cli, sinfo, slurm_cli
from packlora.launcher.slurm import SlurmSpec, sbatch_script, srun_line


def _spec(**fields) -> SlurmSpec:
    base = dict(nodes=2, gpus_per_node=8, config="configs/sft.yaml", output="/shared/runs/sft/slurm", workdir="/home/me/packlora")
    return SlurmSpec(**{**base, **fields})


def test_torchrun_script_runs_one_torchrun_per_node_with_its_cpus_a_port_outside_the_ephemeral_range_and_requeue():
    spec = _spec(partition="gpu", time="04:00:00", account="proj42", bin_dir="/home/me/packlora/.venv/bin",
                 output_dir="/shared/runs/sft", overrides=("training.max_steps=100",))  # fmt: skip

    assert sbatch_script(spec) == """\
#!/bin/bash
# Written by `packlora slurm`: 2 node(s) x 8 process(es) = 16 training processes, one torchrun task per node.
#SBATCH --job-name=packlora
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --partition=gpu
#SBATCH --time=04:00:00
#SBATCH --account=proj42
#SBATCH --output=/shared/runs/sft/slurm/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
set -euo pipefail
cd /home/me/packlora
export PATH=/home/me/packlora/.venv/bin:"$PATH"
# Once this file exists the training saves a complete checkpoint at the next step boundary and exits 75.
export PACKLORA_STOP_FILE=/shared/runs/sft/slurm/stop-"$SLURM_JOB_ID"
rm -f "$PACKLORA_STOP_FILE" "$PACKLORA_STOP_FILE".checkpoint  # left by the run before a requeue
warned=0
trap 'warned=1; echo "packlora: job $SLURM_JOB_ID got USR1 (time limit or pre-emption in 300 s): checkpoint at the next step boundary, then requeue"; touch "$PACKLORA_STOP_FILE"' USR1
export PACKLORA_WORLD_SIZE=16
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="$(python -m packlora.launcher.ports --seed "$SLURM_JOB_ID")"
echo "packlora: job $SLURM_JOB_ID, 2 node(s) x 8 process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"
# A requeued job (SLURM_RESTART_COUNT > 0) resumes from the newest complete checkpoint in output_dir.
export PACKLORA_RESUME=
if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then PACKLORA_RESUME=training.resume_from_checkpoint=auto; fi
echo "packlora: job $SLURM_JOB_ID started;" "checkpoints in" /shared/runs/sft "TensorBoard logs in" /shared/runs/sft/runs "Slurm log" /shared/runs/sft/slurm/slurm-"$SLURM_JOB_ID".out
log_start="$(stat -c %s /shared/runs/sft/slurm/slurm-"$SLURM_JOB_ID".out 2>/dev/null || echo 0)"  # this run's part of the log starts here
srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=64 --kill-on-bad-exit=1 bash -c 'exec torchrun --nnodes 2 --nproc-per-node 8 --node-rank "$SLURM_NODEID" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m packlora.train configs/sft.yaml training.max_steps=100 $PACKLORA_RESUME' &
srun_pid=$!
while :; do  # a trapped signal interrupts wait while srun still runs: wait again
  wait "$srun_pid" && status=0 || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
if [ -e "$PACKLORA_STOP_FILE".checkpoint ]; then  # the training stopped on request, checkpoint complete
  status=75
  echo "packlora: job $SLURM_JOB_ID stopped cleanly: $(cat "$PACKLORA_STOP_FILE".checkpoint)"
  if [ "$warned" = 1 ]; then
    echo "packlora: requeueing job $SLURM_JOB_ID; the next run resumes from that checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  fi
fi
if [ "$status" != 0 ] && grep -qE 'exits with return code = -9|exitcode *: *-9|Signal 9 \\(SIGKILL\\)|task [0-9]+: Killed|oom[-_ ]kill|OOM Killed' <(tail -c +"$((log_start + 1))" /shared/runs/sft/slurm/slurm-"$SLURM_JOB_ID".out 2>/dev/null); then
  echo "packlora: job $SLURM_JOB_ID: a training process was killed by signal 9 (likely out of memory): lower training.per_device_train_batch_size or data.max_seq_length"
fi
echo "packlora: job $SLURM_JOB_ID finished with exit code $status;" "checkpoints in" /shared/runs/sft "TensorBoard logs in" /shared/runs/sft/runs "Slurm log" /shared/runs/sft/slurm/slurm-"$SLURM_JOB_ID".out
exit "$status"
"""


def test_deepspeed_script_writes_the_allocations_hostfile_and_refuses_remapped_gpus():
    text = sbatch_script(_spec(launcher="deepspeed", gpus_per_node=4, master_port=29500))

    lines = text.splitlines()
    assert "export MASTER_PORT=29500" in lines  # an explicit port is honoured
    assert (
        'python -m packlora.launcher.hostfile --slots 4 $(scontrol show hostnames "$SLURM_JOB_NODELIST") '
        '> /shared/runs/sft/slurm/hostfile-"$SLURM_JOB_ID"'
    ) in lines
    assert srun_line(_spec(launcher="deepspeed", gpus_per_node=4)) == (
        "srun --nodes=2 --ntasks-per-node=1 --cpus-per-task=32 --kill-on-bad-exit=1 bash -c "
        """'case "${CUDA_VISIBLE_DEVICES:-0,1,2,3}" in 0,1,2,3) ;; *) echo "packlora: deepspeed would remap the """
        """GPUs Slurm assigned (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); use --launcher torchrun" >&2; exit 2;; """
        """esac; exec deepspeed --num_nodes 2 --num_accelerators 4 --master_addr "$MASTER_ADDR" --master_port """
        """"$MASTER_PORT" --hostfile /shared/runs/sft/slurm/hostfile-"$SLURM_JOB_ID" --no_ssh --node_rank """
        """"$SLURM_NODEID" --no_local_rank --module packlora.train configs/sft.yaml $PACKLORA_RESUME'"""
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
        "\nsrun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1 python -m packlora.train "
        "configs/sft.yaml $PACKLORA_RESUME &\n"
    ) in text


def test_cpu_torchrun_asks_one_core_per_process_for_the_node_task_and_its_srun_step():
    text = sbatch_script(_spec(nodes=1, gpus_per_node=0, nproc_per_node=3))
    assert "#SBATCH --ntasks-per-node=1\n#SBATCH --cpus-per-task=3\n" in text
    assert "\nsrun --nodes=1 --ntasks-per-node=1 --cpus-per-task=3 --kill-on-bad-exit=1 bash -c " in text
    assert "--nproc-per-node 3 " in text


@pytest.mark.parametrize(
    ("fields", "task_cpus", "tasks"),
    [
        ({}, 64, 1),  # one torchrun per node: 8 GPUs x 8 cores
        ({"cpus_per_process": 12}, 96, 1),
        ({"launcher": "srun"}, 8, 8),  # one task per GPU
        ({"launcher": "srun", "cpus_per_process": 4}, 4, 8),
    ],
)
def test_gpu_jobs_ask_cpus_per_gpu_for_the_job_and_every_srun_step(fields, task_cpus, tasks):
    text = sbatch_script(_spec(**fields))

    assert f"#SBATCH --ntasks-per-node={tasks}\n#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task={task_cpus}\n" in text
    [srun] = [line for line in text.splitlines() if line.startswith("srun ")]
    assert srun.startswith(f"srun --nodes=2 --ntasks-per-node={tasks} --cpus-per-task={task_cpus} --kill-on-bad-exit=1 ")


def test_without_requeue_a_warned_job_stops_with_exit_75_and_stays_down():
    text = sbatch_script(_spec(requeue=False))

    assert "#SBATCH --signal=B:USR1@300\n#SBATCH --no-requeue\n" in text
    assert "checkpoint at the next step boundary, then exit 75" in text
    assert "scontrol requeue" not in text and "PACKLORA_RESUME" not in text
    assert '  status=75\n' in text


def test_warn_before_zero_sends_no_signal_but_a_requeued_job_still_resumes():
    text = sbatch_script(_spec(warn_before=0))

    assert "--signal" not in text and "trap " not in text and "scontrol requeue" not in text
    assert "#SBATCH --requeue\n" in text
    assert 'if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then PACKLORA_RESUME=training.resume_from_checkpoint=auto; fi' in text


def _run_script(tmp_path, text: str, srun_body: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run an sbatch script with stand-ins for srun (``srun_body``), scontrol and python, in ``tmp_path``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_ins = {
        "srun": srun_body,
        "scontrol": 'if [ "$1" = show ]; then echo node01; else echo "scontrol $*" >> "$CALLS"; fi',
        "python": "echo 20417",
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node01",
                "CALLS": str(tmp_path / "calls"), **env}  # fmt: skip
    return subprocess.run(["bash", str(script)], env=full_env, capture_output=True, text=True, timeout=60)


def test_script_on_usr1_asks_for_a_stop_then_requeues_once_the_checkpoint_is_acknowledged(tmp_path):
    """The real script, with a stand-in srun that plays the training: it sends the script USR1 (as
    Slurm does before the time limit), waits for the stop file, acknowledges a checkpoint and exits 75,
    as ``training.preemption`` does."""
    spec = _spec(nodes=1, gpus_per_node=0, launcher="srun", output=str(tmp_path), workdir=str(tmp_path), warn_before=120)
    srun = ('echo "args: $*"; kill -USR1 $PPID; '
            'for i in $(seq 300); do [ -e "$PACKLORA_STOP_FILE" ] && break; sleep 0.1; done; '
            'echo \'{"global_step": 7}\' > "$PACKLORA_STOP_FILE".checkpoint; exit 75')  # fmt: skip
    done = _run_script(tmp_path, sbatch_script(spec), srun, {"SLURM_RESTART_COUNT": "0"})

    assert done.returncode == 75, done.stdout + done.stderr
    assert "args: --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1 python -m packlora.train " \
           "configs/sft.yaml\n" in done.stdout  # the first run starts fresh
    assert "got USR1 (time limit or pre-emption in 120 s): checkpoint at the next step boundary" in done.stdout
    assert 'stopped cleanly: {"global_step": 7}' in done.stdout
    assert (tmp_path / "calls").read_text() == "scontrol requeue 42\n"
    assert "finished with exit code 75;" in done.stdout


def test_script_of_a_requeued_job_resumes_and_clears_the_last_runs_stop_files(tmp_path):
    spec = _spec(nodes=1, gpus_per_node=0, launcher="srun", output=str(tmp_path), workdir=str(tmp_path))
    (tmp_path / "stop-42").write_text("")
    (tmp_path / "stop-42.checkpoint").write_text("{}")
    srun = '[ -e "$PACKLORA_STOP_FILE" ] && exit 9; echo "args: $*"; exit 0'
    done = _run_script(tmp_path, sbatch_script(spec), srun, {"SLURM_RESTART_COUNT": "1"})

    assert done.returncode == 0, done.stdout + done.stderr
    assert "args: --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1 python -m packlora.train " \
           "configs/sft.yaml training.resume_from_checkpoint=auto\n" in done.stdout
    assert not (tmp_path / "calls").exists() and not (tmp_path / "stop-42").exists()


def test_script_stopped_by_hand_exits_75_without_requeueing(tmp_path):
    """A user who touches the job's stop file gets a clean stop, not a requeue (no USR1 came)."""
    spec = _spec(nodes=1, gpus_per_node=0, launcher="srun", output=str(tmp_path), workdir=str(tmp_path))
    srun = 'echo \'{"global_step": 3}\' > "$PACKLORA_STOP_FILE".checkpoint; exit 75'
    done = _run_script(tmp_path, sbatch_script(spec), srun, {})

    assert done.returncode == 75 and not (tmp_path / "calls").exists(), done.stdout + done.stderr


def test_script_passes_a_failed_runs_exit_code_on_without_requeueing(tmp_path):
    spec = _spec(nodes=1, gpus_per_node=0, launcher="srun", output=str(tmp_path), workdir=str(tmp_path))
    done = _run_script(tmp_path, sbatch_script(spec), "exit 17", {})

    assert done.returncode == 17
    assert "finished with exit code 17;" in done.stdout and not (tmp_path / "calls").exists()


@pytest.mark.parametrize("report", ["  exitcode  : -9 (pid: 4711)",  # torchrun's failure summary (torch 2.13)
                                    "srun: error: pl2: task 1: Killed"])
def test_script_of_a_run_whose_rank_was_killed_by_signal_9_gives_the_out_of_memory_hint(tmp_path, report):
    """The stand-in srun appends a launcher's report of a SIGKILL to the job's log (as Slurm writes the
    output there) and fails; an earlier run's report in the same log (a requeue appends) is not read."""
    spec = _spec(nodes=1, gpus_per_node=0, launcher="srun", output=str(tmp_path), workdir=str(tmp_path))
    log = tmp_path / "slurm-42.out"
    log.write_text("an earlier run: exitcode  : -9 (pid: 7)\n")
    done = _run_script(tmp_path, sbatch_script(spec), f"echo {report!r} >> {log}; exit 1", {})
    hint = ("packlora: job 42: a training process was killed by signal 9 (likely out of memory): lower "
            "training.per_device_train_batch_size or data.max_seq_length")

    assert done.returncode == 1 and hint in done.stdout, done.stdout + done.stderr
    done = _run_script(tmp_path, sbatch_script(spec), "echo 'Traceback ... ValueError' >> " + str(log) + "; exit 1", {})
    assert done.returncode == 1 and hint not in done.stdout, done.stdout


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
        "--master-port", "20417", "-m", "packlora.train", "my configs/a.yaml", "data.note=it's $HOME",
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
        ({"time": "8"}, "--warn-before 300 s would stop the run before half of --time 8 (480 s) is used, every time"),
        ({"warn_before": -1}, "--warn-before must be >= 0 seconds (0: no warning), got -1"),
        ({"cpus_per_process": 0}, "--cpus-per-gpu (--cpus-per-process) must be >= 1, got 0"),
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
    """A minimal valid config at ``configs/x.yaml`` in a temp working directory; no GPU visible, no
    MASTER_PORT in the environment, and an sinfo that knows no GPUs (no Slurm here)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setattr(sinfo, "query", lambda partition: (None, "sinfo is not on PATH"))
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
    assert "python -m packlora.train configs/x.yaml training.max_steps=5 $PACKLORA_RESUME &\n" in out
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


def test_slurm_refuses_an_output_dir_holding_a_run_and_overwrite_clears_it_before_writing_the_script(config_file, capsys):
    old = config_file / "runs" / "x"
    (old / "checkpoint-5").mkdir(parents=True)
    (old / "packlora_config.yaml").write_text("output_dir: runs/x\n")
    argv = ["configs/x.yaml", "--nodes", "1", "--gpus-per-node", "0"]
    with pytest.raises(SystemExit):
        slurm_cli.main([*argv, "--dry-run"])
    assert "output_dir: runs/x already holds a run (checkpoint-5, packlora_config.yaml)" in capsys.readouterr().err

    assert slurm_cli.main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in old.iterdir()) == ["slurm"]  # the old run gone, the new script written
    assert "--overwrite: deleted the old run in" in capsys.readouterr().err


def test_slurm_wait_without_submit_is_an_error(config_file, capsys):
    with pytest.raises(SystemExit):
        slurm_cli.main(["configs/x.yaml", "--nodes", "1", "--gpus-per-node", "0", "--wait"])
    assert "--wait needs --submit" in capsys.readouterr().err


def test_launch_with_slurm_launcher_dry_run_is_the_slurm_script(config_file, capsys):
    argv = ["configs/x.yaml", "--launcher", "slurm", "--nnodes", "1", "--gpus-per-node", "0", "--master-port", "29511"]
    assert cli.main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "one torchrun task per node." in out and "--nproc-per-node 2 " in out
    assert out.endswith("packlora.sbatch\n")


# --- GPUs per node never come from the submit host ------------------------------------------


def test_launch_slurm_without_gpus_per_node_on_a_machine_without_gpus_is_an_error_naming_the_flag(config_file, capsys):
    with pytest.raises(SystemExit):
        cli.main(["configs/x.yaml", "--launcher", "slurm", "--nnodes", "2", "--dry-run"])
    err = capsys.readouterr().err
    assert "--gpus-per-node is required: the GPUs of this machine say nothing about the compute nodes" in err
    assert "Pass --gpus-per-node G (GPUs per node; 0 for CPU processes with gloo), or set gpus_per_node: G" in err


def test_launch_slurm_on_a_gpu_machine_still_does_not_take_its_gpus(config_file, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(SystemExit):
        cli.main(["configs/x.yaml", "--launcher", "slurm", "--nnodes", "2", "--dry-run"])
    assert "--gpus-per-node is required" in capsys.readouterr().err


def test_launch_slurm_with_eight_gpus_per_node_asks_for_them_and_gives_every_srun_step_its_cpus(config_file, capsys):
    cli.main(["configs/x.yaml", "--launcher", "slurm", "--nnodes", "2", "--gpus-per-node", "8", "--dry-run"])
    out = capsys.readouterr().out
    assert "#SBATCH --gpus-per-node=8\n#SBATCH --cpus-per-task=64\n" in out
    srun_lines = [line for line in out.splitlines() if line.lstrip().startswith("srun ")]
    assert len(srun_lines) == 1 and " --cpus-per-task=64 " in srun_lines[0]
    assert "--nproc-per-node 8 " in srun_lines[0]


def test_gpus_per_node_from_the_config_key(config_file, capsys):
    (config_file / "configs" / "x.yaml").write_text(
        "output_dir: runs/x\ngpus_per_node: 4\nmodel: {name_or_path: .}\ndata: {train: [data.jsonl]}\n"
    )
    slurm_cli.main(["configs/x.yaml", "--nodes", "1", "--dry-run"])
    captured = capsys.readouterr()
    assert "#SBATCH --gpus-per-node=4\n" in captured.out
    assert "4 GPU(s) per node from gpus_per_node in configs/x.yaml" in captured.err


def test_gpus_per_node_flag_wins_over_the_config_key(config_file, capsys):
    (config_file / "configs" / "x.yaml").write_text(
        "output_dir: runs/x\ngpus_per_node: 4\nmodel: {name_or_path: .}\ndata: {train: [data.jsonl]}\n"
    )
    slurm_cli.main(["configs/x.yaml", "--nodes", "1", "--gpus-per-node", "0", "--dry-run"])
    out = capsys.readouterr().out
    assert "--gpus-per-node" not in out and "#SBATCH --cpus-per-task=2\n" in out


def test_gpus_per_node_from_the_partitions_gres_when_unambiguous(config_file, capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(sinfo, "query", lambda partition: (asked.append(partition), (8, ""))[1])
    slurm_cli.main(["configs/x.yaml", "--nodes", "2", "--partition", "gpu", "--dry-run"])
    captured = capsys.readouterr()
    assert asked == ["gpu"]
    assert "#SBATCH --gpus-per-node=8\n" in captured.out
    assert "8 GPU(s) per node, the GRES of every node in partition 'gpu' (sinfo)" in captured.err


def test_an_ambiguous_partition_is_an_error_that_says_why(config_file, capsys, monkeypatch):
    monkeypatch.setattr(sinfo, "query", lambda partition: sinfo.gpus_per_node("gpu*|gpu:4\ngpu*|gpu:8\n", partition))
    with pytest.raises(SystemExit):
        slurm_cli.main(["configs/x.yaml", "--nodes", "2", "--dry-run"])
    assert "partition 'gpu' (the default) mixes nodes with 4, 8 GPUs. Pass --gpus-per-node G" in capsys.readouterr().err


def test_gpus_per_node_is_only_read_with_the_slurm_launcher(config_file, capsys):
    with pytest.raises(SystemExit):
        cli.main(["configs/x.yaml", "--gpus-per-node", "8", "--master-port", "29511", "--dry-run"])
    assert "--gpus-per-node is only read by --launcher slurm, got it with deepspeed" in capsys.readouterr().err


# --- CPUs, pre-emption flags, MASTER_PORT ---------------------------------------------------------


def test_cpus_per_gpu_warn_before_and_no_requeue_flags_reach_the_script(config_file, capsys):
    slurm_cli.main(["configs/x.yaml", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-gpu", "6",
                    "--warn-before", "600", "--no-requeue", "--dry-run"])  # fmt: skip
    out = capsys.readouterr().out
    assert "#SBATCH --cpus-per-task=24\n" in out and " --cpus-per-task=24 " in out
    assert "#SBATCH --signal=B:USR1@600\n#SBATCH --no-requeue\n" in out


def test_slurm_honours_master_port_from_the_environment(config_file, capsys, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29533")
    slurm_cli.main(["configs/x.yaml", "--nodes", "2", "--gpus-per-node", "0", "--dry-run"])
    captured = capsys.readouterr()
    assert "export MASTER_PORT=29533\n" in captured.out
    assert "using MASTER_PORT=29533 from the environment as the rendezvous port" in captured.err


# --- packlora launch with a hostfile -------------------------------------------------------


def test_launch_takes_nodes_slots_and_master_addr_from_the_hostfile(config_file, capsys):
    (config_file / "hosts").write_text("# two boxes\nnode01 slots=2\n\nnode02 slots=2\n")

    assert cli.main(["configs/x.yaml", "--hostfile", "hosts", "--master-port", "29500", "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        "OMP_NUM_THREADS=1 deepspeed --num_nodes 2 --num_accelerators 2 --master_addr node01 --master_port 29500 "
        "--hostfile hosts --no_local_rank --module packlora.train configs/x.yaml\n"
    )


def test_launch_no_ssh_runs_only_this_nodes_share(config_file, capsys):
    (config_file / "hosts").write_text("node01 slots=2\nnode02 slots=2\n")

    cli.main(["configs/x.yaml", "--hostfile", "hosts", "--no-ssh", "--node-rank", "1", "--master-port", "29500", "--dry-run"])
    assert capsys.readouterr().out.endswith(
        "--hostfile hosts --no_ssh --node_rank 1 --no_local_rank --module packlora.train configs/x.yaml\n"
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


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (None, None), (0, None), (8, None),
        (-1, "gpus_per_node: must be an integer >= 0 or null, got -1"),
        ("8", "gpus_per_node: must be an integer or null, got '8'"),
        (True, "gpus_per_node: must be an integer or null, got True"),
    ],
)  # fmt: skip
def test_gpus_per_node_config_key_is_validated(value, error, tmp_path, monkeypatch):
    from packlora.training.config import ConfigError, config_from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    raw = {"output_dir": "out", "gpus_per_node": value, "model": {"name_or_path": "."}, "data": {"train": ["d.jsonl"]}}
    if error is None:
        assert config_from_dict(raw).gpus_per_node == value
    else:
        with pytest.raises(ConfigError) as excinfo:
            config_from_dict(raw)
        assert excinfo.value.problems == [error]


def test_launch_with_the_slurm_launcher_reads_the_config_once(config_file, capsys, monkeypatch):
    from packlora.launcher import cli
    from packlora.training import config as run_config

    reads = []
    real = run_config.load_yaml_config
    monkeypatch.setattr(run_config, "load_yaml_config", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    code = cli.main(["configs/x.yaml", "--launcher", "slurm", "--gpus-per-node", "0", "--master-port", "29511",
                     "--dry-run", "training.max_steps=5"])
    assert code == 0 and "-m packlora.train configs/x.yaml training.max_steps=5" in capsys.readouterr().out
    assert reads == ["configs/x.yaml"]
