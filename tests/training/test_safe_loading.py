"""No file packlora loads can run code: YAML through ``yaml.safe_load`` only, ``torch.load`` only
with ``weights_only=True``, no pickle, ``trust_remote_code`` off unless the config turns it on.

The first tests are an honest static check: they parse every Python file of the packlora packages
with ``ast`` and look for the unsafe calls, so a new ``torch.load(path)`` or ``yaml.load`` fails
here. What the libraries do on packlora's behalf is documented in README.md ("Robustness").
"""
import ast
from pathlib import Path

import pytest
import yaml

from packlora.training.config import ConfigError, ModelConfig, load_config, parse_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("data_utils", "training", "launcher", "decoding", "packlora", "presets", "scripts")
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_YAML = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all", "Loader",
               "UnsafeLoader", "FullLoader"}  # fmt: skip


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES if (REPO_ROOT / pkg).is_dir() for p in sorted((REPO_ROOT / pkg).rglob("*.py"))]
    assert len(files) > 20, files  # the scan really covers the code base
    return files


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _findings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    rel, out = path.relative_to(REPO_ROOT), []
    for node in ast.walk(tree):
        where = f"{rel}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            out += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            out.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.ImportFrom) and node.module == "yaml":
            out += [f"{where}: from yaml import {a.name}" for a in node.names if a.name in UNSAFE_YAML]
        elif isinstance(node, ast.Attribute) and _dotted(node.value) == "yaml" and node.attr in UNSAFE_YAML:
            out.append(f"{where}: yaml.{node.attr}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name.endswith("torch.load") or name == "load" and isinstance(node.func, ast.Name):
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    out.append(f"{where}: {name}(...) without weights_only=True")
            if name.split(".")[-1] == "load" and "allow_pickle" in kw:
                ap = kw["allow_pickle"]
                if not (isinstance(ap, ast.Constant) and ap.value is False):
                    out.append(f"{where}: {name}(..., allow_pickle=...)")
            if name in ("eval", "exec"):
                out.append(f"{where}: {name}(...)")
            tr = kw.get("trust_remote_code")
            if isinstance(tr, ast.Constant) and tr.value is True:
                out.append(f"{where}: trust_remote_code=True hard-coded (it must come from model.trust_remote_code)")
    return out


def test_no_unsafe_deserialisation_in_packlora_source():
    findings = [f for p in _sources() for f in _findings(p)]
    assert findings == [], "unsafe loading in packlora:\n" + "\n".join(findings)


@pytest.mark.parametrize(
    "snippet, finding",
    [
        ("import torch\nx = torch.load('a.pt')\n", "torch.load(...) without weights_only=True"),
        ("import torch\nx = torch.load('a.pt', weights_only=False)\n", "torch.load(...) without weights_only=True"),
        ("import pickle\n", "import pickle"),
        ("from yaml import load\n", "from yaml import load"),
        ("import yaml\nyaml.load(s, Loader=yaml.Loader)\n", "yaml.load"),
        ("import numpy as np\nnp.load('a.npy', allow_pickle=True)\n", "np.load(..., allow_pickle=...)"),
        ("f(trust_remote_code=True)\n", "trust_remote_code=True hard-coded"),
    ],
)
def test_static_check_catches_each_unsafe_pattern(tmp_path, snippet, finding, monkeypatch):
    bad = REPO_ROOT / "training" / "_unsafe_probe.py"  # never written: the check reads via a patched path
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: snippet)
    found = _findings(bad)
    assert any(finding in f for f in found), found


def test_static_check_accepts_the_safe_forms(monkeypatch):
    snippet = "import torch, yaml\nx = torch.load('a.pt', weights_only=True)\ny = yaml.safe_load('a: 1')\n"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: snippet)
    assert _findings(REPO_ROOT / "training" / "_safe_probe.py") == []


def test_config_with_a_python_yaml_tag_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"output_dir: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\n  - not valid YAML: could not determine a constructor for the "
                                          r"tag 'tag:yaml.org,2002:python/object/apply:os.system'"):
        load_config(cfg)
    assert not marker.exists()


def test_override_with_a_python_yaml_tag_is_refused():
    with pytest.raises(ConfigError, match=r"in the command line:\n  - override 'seed=.*': the value is not valid YAML"):
        parse_overrides(["seed=!!python/object/apply:os.getpid []"])


def test_checkpoint_config_is_read_with_safe_load(tmp_path):
    from packlora.core.checkpoint import MODEL_CONFIG, RUN_CONFIG, CheckpointInfo

    (tmp_path / MODEL_CONFIG).write_text("{}")
    (tmp_path / RUN_CONFIG).write_text("seed: !!python/name:os.system\n")
    with pytest.raises(yaml.constructor.ConstructorError):
        CheckpointInfo.read(tmp_path)


def test_trust_remote_code_is_off_by_default():
    assert ModelConfig(name_or_path="m").trust_remote_code is False


def test_config_paths_are_checked_before_any_work(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "model": {"name_or_path": str(tmp_path / "no-model")},
        "data": {"train": [str(tmp_path / "no.jsonl")], "on_error": "ignore"},
        "training": {"resume_from_checkpoint": str(tmp_path / "out" / "checkpoint-7")},
    }))  # fmt: skip
    from packlora.training.preflight import load_and_check

    with pytest.raises(ConfigError) as err:
        load_config(cfg)  # the config's own shape first
    assert err.value.problems == ["data.on_error: 'ignore' is not one of ['error', 'skip']"]
    cfg.write_text(cfg.read_text().replace("ignore", "skip"))
    with pytest.raises(ConfigError) as err:
        load_and_check(cfg)  # then what the machine must have, before any work
    keys = [p.split(":")[0] for p in err.value.problems]
    assert keys == ["model.name_or_path", "data.train[0]", "training.resume_from_checkpoint"], keys
    assert not (tmp_path / "out").exists(), "load_config created the output directory"


def test_resume_auto_and_null_pass_validation(run_config):
    from packlora.training.config import config_from_dict

    for value in ("auto", None):
        cfg = config_from_dict(run_config.dict(**{"training.resume_from_checkpoint": value}))
        assert cfg.training["resume_from_checkpoint"] == value
