"""packlora installs one import name, ``packlora``; the repository's folders are its subpackages.

A user's project very often has a ``training/`` package or a ``data_utils.py`` of its own. With the
seven generic top-level packages packlora used to install, ``from packlora import train`` failed
in such a directory (``'data_utils' is not a package``), every rank of a launch failed the same way
(``python -m`` puts the working directory first on ``sys.path``), and the user's own ``import
training`` got packlora's. These tests build the wheel as a user installs it, and run packlora from
a directory that holds both names.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("core", "data_utils", "decoding", "ds_configs", "launcher", "presets", "training")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the files a clean clone holds (tracked, and new ones not ignored), built without network."""
    src = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode()
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = out.glob("packlora-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_site(wheel, tmp_path_factory) -> Path:
    """site-packages of a fresh virtual environment with only the wheel installed (``--no-deps``)."""
    env = tmp_path_factory.mktemp("venv")
    venv.create(env, with_pip=False)
    (site,) = env.glob("lib/python*/site-packages")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    return site


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A directory with a ``training/`` package and a ``data_utils.py`` of the user's own."""
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("OWNER = 'user'\n")
    (tmp_path / "data_utils.py").write_text("OWNER = 'user'\n")
    return tmp_path


def test_the_wheel_installs_only_the_name_packlora(fresh_site, wheel):
    (dist_info,) = fresh_site.glob("packlora-*.dist-info")
    assert (dist_info / "top_level.txt").read_text().split() == ["packlora"]
    importable = sorted(p.name for p in fresh_site.iterdir()
                        if (p / "__init__.py").is_file() or p.suffix in (".py", ".pth"))
    assert importable == ["packlora"]
    assert sorted(p.name for p in (fresh_site / "packlora").iterdir() if p.is_dir() and p.name != "__pycache__") \
        == sorted(SUBPACKAGES)
    names = zipfile.ZipFile(wheel).namelist()
    assert "packlora/ds_configs/zero3.json" in names and "packlora/presets/shishuo.yaml" in names
    assert "packlora/training/config.py" in names and "packlora/data_utils/chat_format.py" in names


def test_the_wheel_imports_beside_a_users_training_package(fresh_site, user_project):
    """The installed package comes from the wheel, and the user's ``training`` is still the user's."""
    code = ("import packlora.training.config, training, data_utils; "
            "from packlora.data_utils.chat_format import ChatFormat; from packlora import presets; "
            "print(packlora.training.config.__file__); print(training.OWNER, data_utils.OWNER); "
            "print(presets.load_preset('shishuo').name)")
    env = {**os.environ, "PYTHONPATH": str(fresh_site)}
    out = subprocess.run([sys.executable, "-c", code], cwd=user_project, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    path, owners, preset = out.stdout.split("\n")[:3]
    assert Path(path) == fresh_site / "packlora" / "training" / "config.py"
    assert (owners, preset) == ("user user", "shishuo")


def test_inspect_and_imports_work_in_a_users_project(user_project, chatml_tokenizer_dir):
    """``packlora inspect`` (a console-script process started in that directory) and an import of
    packlora beside the user's own ``training``, in the installed (editable) environment."""
    (user_project / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, '
                                          '{"role": "assistant", "content": "hello"}]}\n')
    (user_project / "run.yaml").write_text(
        f"output_dir: out\ndeepspeed: null\nmodel: {{config: {{model_type: qwen2}}, tokenizer: {chatml_tokenizer_dir}}}\n"
        f"data: {{train: [d.jsonl], max_seq_length: 64, cache_dir: cache}}\n")
    packlora = Path(sys.executable).parent / "packlora"
    out = subprocess.run([str(packlora), "inspect", "run.yaml", "--json"], cwd=user_project, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert '"role_markers_in_labels": 0' in out.stdout
    code = "import training; from packlora.data_utils.chat_format import ChatFormat; print(training.OWNER)"
    out = subprocess.run([sys.executable, "-c", code], cwd=user_project, capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout.strip()) == (0, "user"), out.stderr


@pytest.mark.distributed
def test_a_two_process_launch_from_a_users_project_trains(user_project, multinode_config):
    """Every rank starts with ``python -m packlora.train`` in the user's directory, where ``training``
    and ``data_utils`` are the user's: one optimizer step on two ZeRO-2 processes, and a checkpoint."""
    from launching import launch_env

    out = user_project / "out"
    packlora = Path(sys.executable).parent / "packlora"
    proc = subprocess.run([str(packlora), "launch", str(multinode_config), "--nproc-per-node", "2",
                           f"output_dir={out}", "training.max_steps=1", "training.save_steps=1"],
                          cwd=user_project, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (out / "checkpoint-1" / "adapter_model.safetensors").is_file()
    assert (out / "adapter_model.safetensors").is_file()
