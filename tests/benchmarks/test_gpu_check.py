"""``benchmarks/gpu_check.sh``: the wheel list, the commands, the MFU formula and a CPU dry run, so
that the GPU check is ready to run in one go on a GPU machine and cannot rot in between."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_wheel_list_matches_constraints_requirements_and_the_gpu_image():
    problems, notes = gpu_check.check_wheels(wheel_dir=None)  # requirements from the installed metadata
    assert problems == []
    assert "datasets needs pyarrow>=24.0.0; the GPU image has pyarrow at an unread version" in notes
    pins = {w.name: w.version for w in gpu_check.read_wheels() if w.role == "install"}
    assert pins == {"deepspeed": "0.19.8", "datasets": "5.2.0", "transformers": "5.24.0", "peft": "0.21.2"}


def test_wheel_list_check_names_a_wrong_pin_and_a_missing_dependency(tmp_path, monkeypatch):
    text = gpu_check.WHEELS_FILE.read_text()
    broken = text.replace("transformers==5.24.0", "transformers==5.17.0").replace("hjson==3.1.0", "# hjson dropped")
    (tmp_path / "gpu_wheels.txt").write_text(broken)
    monkeypatch.setattr(gpu_check, "WHEELS_FILE", tmp_path / "gpu_wheels.txt")
    problems, _ = gpu_check.check_wheels(wheel_dir=None)
    assert problems == [
        "constraints.txt pins transformers==5.24.0; gpu_wheels.txt has transformers==5.17.0 (install); carry the "
        "pinned version with role install",
        "deepspeed needs hjson, which is neither carried nor in the GPU image",
        "transformers: gpu_wheels.txt has 5.17.0 but this environment has 5.24.0; carry the version packlora is tested with",
    ]


def test_wheel_files_are_checked_one_per_listed_version(tmp_path, monkeypatch):
    original = gpu_check._requirements
    monkeypatch.setattr(gpu_check, "_requirements", lambda w, wheel_dir: original(w, None))  # empty stand-in files
    wheels = gpu_check.read_wheels()
    for w in wheels:
        (tmp_path / f"{w.name.replace('-', '_')}-{w.version}-py3-none-any.whl").write_bytes(b"")
    assert gpu_check.check_wheels(tmp_path)[0] == []
    (tmp_path / "regex-2024.1.1-py3-none-any.whl").write_bytes(b"")
    problems, _ = gpu_check.check_wheels(tmp_path)
    assert problems[0].startswith(f"{tmp_path}: expected one wheel of regex==2026.11.19, found ")


def test_commands_fetch_cp312_manylinux_wheels_build_deepspeed_and_install_offline():
    wheels = gpu_check.read_wheels()
    fetch = gpu_check.fetch_commands(wheels, Path(".gpu/wheels"), python="py")
    assert fetch[0] == ["py", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", ".gpu/wheels",
                        "deepspeed==0.19.8"]
    assert fetch[1][:10] == ["py", "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                             "3.12", "--implementation", "cp"]
    assert fetch[1][-3:] == ["-d", ".gpu/wheels", "datasets==5.2.0"] and "manylinux_2_17_x86_64" in fetch[1]
    assert len(fetch) == len(wheels)
    assert gpu_check.install_command(wheels, ".gpu/wheels") == [
        "python3", "-m", "pip", "install", "--no-index", "--find-links", ".gpu/wheels", "--no-cache-dir", "--no-compile",
        "--disable-pip-version-check", "-q", "deepspeed==0.19.8", "datasets==5.2.0", "transformers==5.24.0", "peft==0.21.2"]


def test_model_flops_of_the_qwen25_05b_shape_by_hand():
    # matmul weights per layer: q 896*896 + k, v 2*896*128 + o 896*896 + MLP 3*896*4864 = 14,909,440;
    # x 24 layers + tied LM head 151,936*896 = 493,961,216. LoRA r 16 per layer: 16*(1792 + 1024 + 1024 +
    # 1792 + 3*5760) = 366,592; x 24 = 8,798,208. Attention: 6 * 24 layers * 14 heads * 64 * n^2.
    n_base, n_lora = 493_961_216, 8_798_208
    expected = (4 * n_base + 6 * n_lora) * (4000 + 96) + 6 * 24 * 14 * 64 * (4000**2 + 96**2)
    assert gpu_check.model_flops(gpu_check.QWEN25_05B, 16, [4000, 96]) == expected


@pytest.mark.distributed
def test_dry_run_checks_prints_and_runs_every_worker_on_cpu(tmp_path):
    """The whole script on CPU: tiny model, the varlen kernel replaced by its reference, one timed
    step per variant, under ZeRO-2 and ZeRO-3 (single-process DeepSpeed): ~1-3 min on 2 cores."""
    before = (REPO / "benchmarks" / "RESULTS.md").read_text()
    env = {**os.environ, "GPU_CHECK_DRY_DIR": str(tmp_path), "PYTHON": sys.executable}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "wheel list OK" in out
    assert ("install: python3 -m pip install --no-index --find-links .gpu/wheels --no-cache-dir --no-compile "
            "--disable-pip-version-check -q deepspeed==0.19.8 datasets==5.2.0 transformers==5.24.0 peft==0.21.2") in out
    assert "-m packlora.cli launch configs/shishuo_tiny.yaml --overwrite model.attn_implementation=varlen" in out
    report = (tmp_path / "RESULTS.md").read_text()
    assert "**CPU dry run**" in report and '"throughput_zero3": 0' in report
    for backend in ("varlen", "sdpa", "packed_sdpa"):
        line = next(line for line in report.splitlines() if line.startswith(f"| {backend} | "))
        assert line.endswith("| 28 | yes |"), line
    assert "(above the tolerance" in report
    for stage in ("ZeRO-2", "ZeRO-3"):
        table = report.split(f"### Throughput, DeepSpeed {stage}")[1].split("###")[0]
        rows = [line for line in table.splitlines() if line.startswith(("| shishuo |", "| zhanghenshui |"))]
        assert len(rows) == 10 and not any("not measured" in r for r in rows), table
        assert "LM head at the supervised positions (`varlen`) vs full logits (`varlen_full_logits`)" in table
    assert (REPO / "benchmarks" / "RESULTS.md").read_text() == before  # a dry run never writes the real figures
