"""Golden-string tests for ``packlora launch``: spec validation, argv per launcher, dry-run output.

Every expected argv is written out by hand; nothing here launches a process.
"""
from __future__ import annotations

import os

import pytest
import torch

from packlora.launcher import cli
from tiny_assets import QWEN2_TOKENIZER
from packlora.launcher.commands import build_argv, deepspeed_argv, format_command, torchrun_argv
from packlora.launcher.spec import LaunchSpec
from packlora.launcher.supervise import Outcome


def _spec(**fields) -> LaunchSpec:
    base = dict(launcher="deepspeed", nproc_per_node=2, master_port=29500, config="configs/sft.yaml")
    return LaunchSpec(**{**base, **fields})


# --- argv --------------------------------------------------------------------------------


def test_deepspeed_single_node_cpu_argv_starts_two_processes():
    spec = _spec(overrides=("training.max_steps=5", "lora.r=8"))

    assert build_argv(spec) == [
        "deepspeed",
        "--num_nodes", "1",
        "--num_accelerators", "2",
        "--master_addr", "127.0.0.1",
        "--master_port", "29500",
        "--no_local_rank",
        "--module", "packlora.train",
        "configs/sft.yaml", "training.max_steps=5", "lora.r=8",
    ]  # fmt: skip
    assert spec.world_size == 2


def test_deepspeed_multi_node_argv_passes_hostfile():
    spec = _spec(nnodes=2, nproc_per_node=8, master_addr="10.0.0.1", hostfile="/etc/packlora/hosts")

    assert build_argv(spec) == [
        "deepspeed",
        "--num_nodes", "2",
        "--num_accelerators", "8",
        "--master_addr", "10.0.0.1",
        "--master_port", "29500",
        "--hostfile", "/etc/packlora/hosts",
        "--no_local_rank",
        "--module", "packlora.train",
        "configs/sft.yaml",
    ]  # fmt: skip
    assert spec.world_size == 16


def test_torchrun_single_node_argv_forwards_overrides_in_order():
    spec = _spec(launcher="torchrun", overrides=("b.x=1", "a.y=2"))

    assert build_argv(spec) == [
        "torchrun",
        "--nnodes", "1",
        "--nproc-per-node", "2",
        "--node-rank", "0",
        "--master-addr", "127.0.0.1",
        "--master-port", "29500",
        "-m", "packlora.train",
        "configs/sft.yaml", "b.x=1", "a.y=2",
    ]  # fmt: skip


def test_torchrun_multi_node_argv_carries_this_nodes_rank():
    spec = _spec(launcher="torchrun", nnodes=4, nproc_per_node=8, node_rank=3, master_addr="node0.cluster")

    assert build_argv(spec) == [
        "torchrun",
        "--nnodes", "4",
        "--nproc-per-node", "8",
        "--node-rank", "3",
        "--master-addr", "node0.cluster",
        "--master-port", "29500",
        "-m", "packlora.train",
        "configs/sft.yaml",
    ]  # fmt: skip
    assert spec.world_size == 32


def test_argv_builder_refuses_a_spec_for_the_other_launcher():
    with pytest.raises(ValueError, match="not 'torchrun'"):
        torchrun_argv(_spec(launcher="deepspeed"))
    with pytest.raises(ValueError, match="not 'deepspeed'"):
        deepspeed_argv(_spec(launcher="torchrun"))


# --- format_command ----------------------------------------------------------------------


def test_format_command_quotes_values_with_spaces_and_prefixes_env():
    line = format_command(
        ["torchrun", "-m", "packlora.train", "my configs/a.yaml", "data.name=it's here"],
        [("OMP_NUM_THREADS", "1"), ("TENSORBOARD_LOGGING_DIR", "runs/a b")],
    )

    assert line == (
        "OMP_NUM_THREADS=1 TENSORBOARD_LOGGING_DIR='runs/a b' "
        "torchrun -m packlora.train 'my configs/a.yaml' 'data.name=it'\"'\"'s here'"
    )


def test_format_command_without_env_is_just_the_quoted_argv():
    assert format_command(["deepspeed", "--module", "packlora.train", "c.yaml"]) == (
        "deepspeed --module packlora.train c.yaml"
    )


# --- spec validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"nproc_per_node": 0}, "--nproc-per-node must be >= 1, got 0"),
        ({"nnodes": 0}, "--nnodes must be >= 1, got 0"),
        ({"master_port": 0}, "--master-port must be in 1..65535, got 0"),
        ({"master_port": 70000}, "--master-port must be in 1..65535, got 70000"),
        ({"launcher": "mpirun"}, "--launcher must be one of deepspeed, torchrun, got 'mpirun'"),
        ({"launcher": "torchrun", "hostfile": "hosts"}, "--hostfile is only read by --launcher deepspeed, got 'hosts'"),
        ({"nnodes": 2, "master_addr": "10.0.0.1"}, "--nnodes 2 with --launcher deepspeed needs --hostfile"),
        ({"launcher": "torchrun", "nnodes": 2, "node_rank": 2, "master_addr": "10.0.0.1"},
         "--node-rank must be in [0, --nnodes=2), got 2"),
        ({"node_rank": 1, "nnodes": 2, "master_addr": "h0", "hostfile": "hosts"},
         "--node-rank is only used by --launcher torchrun, got 1 with deepspeed"),
        ({"launcher": "torchrun", "nnodes": 2}, "--master-addr must be node 0's address"),
        ({"overrides": ("training.max_steps",)}, "override 'training.max_steps' must have the form key.sub=value"),
        ({"overrides": ("=5",)}, "override '=5' must have the form key.sub=value"),
        ({"env": (("BAD NAME", "1"),)}, "environment variable name 'BAD NAME'"),
    ],
)  # fmt: skip
def test_invalid_spec_error_names_the_flag_and_the_bad_value(fields, expected):
    with pytest.raises(ValueError) as excinfo:
        _spec(**fields)

    assert expected in str(excinfo.value)


def test_invalid_spec_reports_every_problem_at_once():
    with pytest.raises(ValueError) as excinfo:
        _spec(launcher="torchrun", nproc_per_node=0, master_port=-1, hostfile="hosts", overrides=("oops",))

    message = str(excinfo.value)
    for fragment in [
        "--nproc-per-node must be >= 1, got 0",
        "--master-port must be in 1..65535, got -1",
        "--hostfile is only read by --launcher deepspeed",
        "override 'oops'",
    ]:
        assert fragment in message
    assert message.count("\n  - ") == 4


def test_override_value_may_contain_equals_signs_and_spaces():
    spec = _spec(overrides=("data.filter=len>=3", "model.name=a b", "training.output_dir="))

    assert spec.overrides == ("data.filter=len>=3", "model.name=a b", "training.output_dir=")


def test_spec_is_frozen():
    spec = _spec()

    with pytest.raises(AttributeError):
        spec.nnodes = 2


# --- CLI ---------------------------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """A config at ``configs/x.yaml`` relative to the working directory; no GPU visible, 4 usable
    CPU cores, no MASTER_PORT in the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    (tmp_path / "configs").mkdir()
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "configs" / "x.yaml").write_text(
        f"output_dir: out\nmodel: {{config: {{model_type: qwen2}}, tokenizer: {QWEN2_TOKENIZER}}}\n"
        "data: {train: [d.jsonl]}\ntraining:\n  max_steps: 10\n"
    )
    return "configs/x.yaml"


def test_a_bad_config_fails_before_anything_is_launched(config_file, capsys, monkeypatch):
    monkeypatch.setattr(cli, "run_supervised", lambda *a, **k: pytest.fail("launched despite a bad config"))
    with pytest.raises(SystemExit) as excinfo:
        cli.main([config_file, "--dry-run", "training.warmup_ratio=0.1", "lora.r=0"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    assert "lora.r: must be an integer >= 1, got 0 (set on the command line)" in err
    with pytest.raises(SystemExit) as excinfo:  # the config is well formed: the preflight checks the rest
        cli.main([config_file, "training.warmup_ratio=0.1"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    assert "training.warmup_ratio: not a transformers.TrainingArguments field" in err
    assert "deepspeed" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_step=8", "training.max_step: not a transformers.TrainingArguments field (did you mean "
                                "'max_steps'?) (set on the command line)"),
        ("training.learning_rate=abc", "training.learning_rate: must be a number, got 'abc' (set on the command line)"),
        ("training.lr_scheduler_type=cosin", "training: transformers.TrainingArguments refuses these settings: cosin "
                                             "is not a valid SchedulerType"),
    ],
)
def test_dry_run_refuses_what_the_launch_refuses_and_says_the_key_came_from_the_command_line(
        config_file, capsys, monkeypatch, override, message):
    monkeypatch.setattr(cli, "run_supervised", lambda *a, **k: pytest.fail("launched despite a bad key"))
    with pytest.raises(SystemExit) as excinfo:
        cli.main([config_file, override, "--dry-run"])
    captured = capsys.readouterr()

    assert excinfo.value.code == 2 and message in captured.err, captured.err
    assert "deepspeed" not in captured.out


def _old_run(root, steps=(15, 30)):
    """``root/out`` holding a finished run: complete checkpoints and the final config."""
    import json

    out = root / "out"
    for step in steps:
        (out / f"checkpoint-{step}").mkdir(parents=True)
        (out / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (out / f"checkpoint-{step}" / "packlora_complete.json").write_text(json.dumps({"global_step": step}))
    (out / "packlora_config.yaml").write_text("output_dir: out\n")
    (out / "runs").mkdir()
    return out


def test_a_launch_into_a_run_is_refused_with_the_two_ways_out_and_overwrite_clears_it_first(
        config_file, capsys, monkeypatch, tmp_path):
    out = _old_run(tmp_path)
    calls = []
    monkeypatch.setattr(cli, "run_supervised", lambda argv, env: calls.append((sorted(os.listdir(out)), env)) or Outcome(0))
    monkeypatch.setattr(cli.shutil, "which", lambda name: f"/venv/bin/{name}")
    for argv in ([config_file], [config_file, "--dry-run"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        err = capsys.readouterr().err
        assert "output_dir: out already holds a run (checkpoint-15, checkpoint-30, packlora_config.yaml)" in err
        assert "Give a new output_dir (e.g. output_dir=out-2 on the command line), or add --overwrite" in err

    assert cli.main([config_file, "--overwrite", "--dry-run"]) == 0 and out.is_dir() and len(os.listdir(out)) == 4
    assert cli.main([config_file, "--overwrite"]) == 0
    assert calls[0][0] == [] and calls[0][1]["PACKLORA_RUN_DIR_CHECKED"] == "1"  # cleared before the start
    assert "--overwrite: deleted the old run in out (checkpoint-15, checkpoint-30, packlora_config.yaml, runs)" \
           in capsys.readouterr().err


def test_overwrite_leaves_a_directory_with_foreign_files_alone_and_says_which(config_file, capsys, tmp_path):
    out = _old_run(tmp_path)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        cli.main([config_file, "--overwrite"])

    assert "--overwrite would delete the run in out, but it also holds entries no packlora run writes (notes.txt)" \
           in capsys.readouterr().err
    assert (out / "checkpoint-30").is_dir() and (out / "notes.txt").is_file()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.resume_from_checkpoint=auto"], "training.resume_from_checkpoint: out/checkpoint-30 is at step 30 "
                                                    "and training.max_steps is 10: nothing is left to train"),
        (["training.resume_from_checkpoint=out/checkpoint-15", "training.max_steps=15"],
         "out/checkpoint-15 is at step 15 and training.max_steps is 15"),
        (["training.resume_from_checkpoint=auto", "--overwrite"], "with --overwrite, which deletes the run it would "
                                                                  "resume; drop one of them"),
    ],
)
def test_a_resume_with_no_steps_left_is_refused_with_both_numbers(config_file, capsys, tmp_path, overrides, message):
    _old_run(tmp_path)
    with pytest.raises(SystemExit):
        cli.main([config_file, "--dry-run", *overrides])
    assert message in capsys.readouterr().err


def test_a_resume_with_steps_left_passes(config_file, capsys, tmp_path):
    _old_run(tmp_path)
    assert cli.main([config_file, "--dry-run", "training.resume_from_checkpoint=auto", "training.max_steps=40"]) == 0


def test_dry_run_on_cpu_prints_deepspeed_command_with_overrides_and_one_thread(config_file, capsys):
    code = cli.main([config_file, "--master-port", "29511", "--dry-run", "training.max_steps=5", "lora.r=4"])

    assert code == 0
    assert capsys.readouterr().out == (
        "OMP_NUM_THREADS=1 deepspeed --num_nodes 1 --num_accelerators 2 --master_addr 127.0.0.1 "
        "--master_port 29511 --no_local_rank --module packlora.train configs/x.yaml training.max_steps=5 lora.r=4\n"
    )


def test_dry_run_keeps_the_users_omp_num_threads(config_file, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")

    cli.main([config_file, "--launcher", "torchrun", "--master-port", "29511", "--dry-run"])

    assert capsys.readouterr().out == (
        "torchrun --nnodes 1 --nproc-per-node 2 --node-rank 0 --master-addr 127.0.0.1 --master-port 29511 "
        "-m packlora.train configs/x.yaml\n"
    )


def test_dry_run_without_master_port_picks_a_free_port(config_file, capsys):
    cli.main([config_file, "--dry-run"])

    words = capsys.readouterr().out.split()
    port = int(words[words.index("--master_port") + 1])
    assert 1 <= port <= 65535


def test_missing_config_file_is_an_error_naming_the_path(config_file, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli.main(["configs/missing.yaml", "--dry-run"])

    assert excinfo.value.code == 2
    assert "config file not found: 'configs/missing.yaml'" in capsys.readouterr().err


def test_unknown_flag_is_an_error_not_ignored(config_file, capsys):
    with pytest.raises(SystemExit):
        cli.main([config_file, "--master-port", "29511", "--dry-run", "--num-gpus", "2"])

    assert "unrecognized arguments: --num-gpus" in capsys.readouterr().err


def test_invalid_flag_values_exit_with_the_spec_message(config_file, capsys):
    with pytest.raises(SystemExit):
        cli.main([config_file, "--nproc-per-node", "0", "--master-port", "99999", "--dry-run"])

    err = capsys.readouterr().err
    assert "--nproc-per-node must be >= 1, got 0" in err
    assert "--master-port must be in 1..65535, got 99999" in err


def test_multi_node_without_master_port_is_an_error(config_file, capsys):
    with pytest.raises(SystemExit):
        cli.main([config_file, "--launcher", "torchrun", "--nnodes", "2", "--master-addr", "10.0.0.1", "--dry-run"])

    assert "--master-port is required with --nnodes > 1 (or MASTER_PORT in the environment)" in capsys.readouterr().err


def test_master_port_from_the_environment_is_honoured_like_the_flag(config_file, capsys, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29533")

    cli.main([config_file, "--launcher", "torchrun", "--nnodes", "2", "--master-addr", "10.0.0.1", "--dry-run"])

    captured = capsys.readouterr()
    assert " --master-port 29533 " in captured.out
    assert "packlora launch: using MASTER_PORT=29533 from the environment as the rendezvous port" in captured.err


def test_master_port_flag_overrides_the_environment_and_says_so(config_file, capsys, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29533")

    cli.main([config_file, "--master-port", "29511", "--dry-run"])

    captured = capsys.readouterr()
    assert " --master_port 29511 " in captured.out
    assert "--master-port 29511 overrides MASTER_PORT=29533 from the environment" in captured.err


def test_a_master_port_in_the_environment_that_is_no_port_is_an_error(config_file, capsys, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "auto")
    with pytest.raises(SystemExit):
        cli.main([config_file, "--dry-run"])
    assert "MASTER_PORT='auto' in the environment is not a port number (1..65535); unset it, or pass --master-port" in (
        capsys.readouterr().err
    )


def test_more_cpu_processes_than_cpu_cores_warns_on_a_machine_without_gpu(config_file, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 2)

    cli.main([config_file, "--nproc-per-node", "3", "--master-port", "29511", "--dry-run"])
    warned = capsys.readouterr().err
    cli.main([config_file, "--nproc-per-node", "2", "--master-port", "29511", "--dry-run"])

    assert warned == (
        "packlora launch: warning: 3 CPU processes (--nproc-per-node) on the 2 CPU core(s) this machine lets us "
        "use and no GPU: the processes will share cores and every step slows down; use --nproc-per-node 2 or fewer\n"
    )
    assert capsys.readouterr().err == ""


def test_no_cpu_warning_with_gpus(config_file, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_usable_cpus", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_check_training_arguments", lambda cfg: None)  # bf16 on a faked GPU cannot be built
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    cli.main([config_file, "--master-port", "29511", "--dry-run"])
    assert capsys.readouterr().err == ""


def test_launch_runs_the_printed_command_and_returns_its_exit_code(config_file, capsys, monkeypatch):
    calls = []

    def fake_run(argv, env):
        calls.append((argv, env))
        return Outcome(returncode=3)

    monkeypatch.setattr(cli, "run_supervised", fake_run)
    monkeypatch.setattr(cli.shutil, "which", lambda name: f"/venv/bin/{name}")
    monkeypatch.setenv("PACKLORA_TEST_MARKER", "kept")

    code = cli.main([config_file, "--launcher", "torchrun", "--master-port", "29511", "lora.r=4"])

    assert code == 3
    [(argv, env)] = calls
    assert argv[0] == "torchrun" and argv[-2:] == ["configs/x.yaml", "lora.r=4"]
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PACKLORA_TEST_MARKER"] == "kept"
    assert capsys.readouterr().out.startswith("OMP_NUM_THREADS=1 torchrun ")


@pytest.mark.parametrize(("visible", "ok"), [("2,3", False), ("0,1", True), ("0,1,2,3", True)])
def test_deepspeed_refuses_cuda_visible_devices_it_would_ignore(config_file, capsys, monkeypatch, visible, ok):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_check_training_arguments", lambda cfg: None)  # bf16 on a faked GPU cannot be built
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    argv = [config_file, "--nproc-per-node", "2", "--master-port", "29511", "--dry-run"]

    if ok:
        assert cli.main(argv) == 0
        assert capsys.readouterr().out.startswith("deepspeed --num_nodes 1 --num_accelerators 2 ")  # no OMP on GPU
    else:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert f"deepspeed ignores CUDA_VISIBLE_DEVICES={visible}" in capsys.readouterr().err


def test_gpu_default_is_one_process_per_visible_gpu(config_file, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_check_training_arguments", lambda cfg: None)  # bf16 on a faked GPU cannot be built
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    cli.main([config_file, "--master-port", "29511", "--dry-run"])

    assert "--num_accelerators 4 " in capsys.readouterr().out


def test_a_bad_record_fails_the_launch_before_any_process_starts(config_file, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "run_supervised", lambda *a, **k: pytest.fail("launched despite a bad record"))
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "Hi", "completion": "Yes."}\n')
    with pytest.raises(SystemExit) as excinfo:
        cli.main([config_file, f"data.train=[{bad}]"])
    err = capsys.readouterr().err
    assert excinfo.value.code == 2
    assert f"{bad}:2: cannot tell the format from keys ['completion', 'prompt']" in err
    assert "Traceback" not in err
