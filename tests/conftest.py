"""Shared fixtures: a small ChatML tokenizer trained on the fly, tiny Qwen2 models and a LoRA
adapter checkpoint over it, the real Qwen2 tokenizer from ``../shared``, a factory of tiny run configs, and the ``gpu`` marker (skipped cleanly without CUDA).
Plain builders and constants live in ``tiny_assets.py``."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_assets

from tiny_assets import QWEN2_TOKENIZER, SHARED, build_chatml_tokenizer  # noqa: E402


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the tiers must be marked first
def pytest_collection_modifyitems(config, items):
    """Mark the quick tier (every test neither ``distributed`` nor ``slurm``), and skip ``gpu`` tests
    without CUDA."""
    import torch

    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs CUDA (gpu marker); this machine has none")
    for item in items:
        if "distributed" not in item.keywords and "slurm" not in item.keywords:
            item.add_marker(pytest.mark.quick)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chatml_tokenizer_dir(tmp_path_factory) -> Path:
    """Directory of the small ChatML tokenizer (``<|endoftext|>``=0, ``<|im_start|>``=1, ``<|im_end|>``=2)."""
    d = tmp_path_factory.mktemp("chatml_tokenizer")
    build_chatml_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def chatml_tokenizer(chatml_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(chatml_tokenizer_dir)


@pytest.fixture
def random_model(chatml_tokenizer):
    """Untied tiny Qwen2 with large random weights (initializer_range=1.0), so greedy argmax gaps
    are whole logits, not float noise, and replies really depend on the whole prompt."""
    from tiny_assets import tiny_model

    return tiny_model(len(chatml_tokenizer), tie_word_embeddings=False, initializer_range=1.0)


@pytest.fixture(scope="session")
def adapter_ckpt(tmp_path_factory, chatml_tokenizer):
    """``root/base_model`` (tiny Qwen2) and ``root/ckpt`` (LoRA r=4 on q/v with random, non-zero
    B, the tokenizer, generation_config.json with eos [2, 0]). Returns ``(root, peft_model)``."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tiny_assets import ENDOFTEXT, IM_END, tiny_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    root = tmp_path_factory.mktemp("run")
    tiny_model(len(chatml_tokenizer), seed=1).save_pretrained(root / "base_model")
    base = AutoModelForCausalLM.from_pretrained(root / "base_model")  # so name_or_path is the dir
    torch.manual_seed(2)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    ).eval()
    peft_model.save_pretrained(root / "ckpt")
    chatml_tokenizer.save_pretrained(root / "ckpt")
    GenerationConfig(eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT).save_pretrained(root / "ckpt")
    return root, peft_model


@pytest.fixture(scope="session")
def qwen2_tokenizer():
    """The real Qwen2 tokenizer from ``../shared/assets/qwen2-tokenizer``."""
    from transformers import AutoTokenizer

    if not QWEN2_TOKENIZER.is_dir():
        pytest.fail(f"real assets missing: {QWEN2_TOKENIZER} (shared/ must sit beside the project root)")
    return AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)


@pytest.fixture
def shared_dir() -> Path:
    return SHARED


@pytest.fixture(scope="session")
def multinode_config(tmp_path_factory) -> Path:
    """The tiny run every two-node test trains (``tests/multinode.py``); one workspace per session."""
    from multinode import build_workspace

    return build_workspace(tmp_path_factory.mktemp("multinode"))


@pytest.fixture(scope="session")
def one_node_reference(multinode_config) -> Path:
    """``output_dir`` of the one-node, two-process run of ``multinode_config`` that every two-node run
    must match step for step; trained once per session, on first use."""
    from launching import launch

    out = multinode_config.parent / "one-node-reference"
    launch(multinode_config, "--nproc-per-node", "2", f"output_dir={out}", log=out.with_suffix(".log"), timeout=600)
    return out


class RunConfigFactory:
    """Tiny run configs: a base built from ``{model_type: qwen2}``, the tiny ChatML tokenizer, one
    ``{"text"}`` record, no DeepSpeed, a data cache of its own. ``changes`` are dotted keys (``**{"lora.r": 0}``).

    ``factory(**changes)`` writes ``run.yaml`` (or ``name=``) and returns its path;
    ``factory.dict(**changes)`` returns the mapping, for ``config_from_dict``.
    """

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root, self.tokenizer_dir = root, tokenizer_dir
        (root / "d.jsonl").write_text('{"text": "x"}\n')

    def dict(self, **changes) -> dict:
        cfg = {
            "output_dir": str(self.root / "out"), "deepspeed": None,
            "model": {"config": {"model_type": "qwen2"}, "tokenizer": str(self.tokenizer_dir)},
            "data": {"train": [str(self.root / "d.jsonl")], "max_seq_length": 64, "cache_dir": str(self.root / "cache")},
            "training": {"max_steps": 3, "report_to": []},
        }
        for key, value in changes.items():
            node = cfg
            *parents, last = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        return cfg

    def __call__(self, name: str = "run.yaml", **changes) -> Path:
        import yaml

        path = self.root / name
        path.write_text(yaml.safe_dump(self.dict(**changes), allow_unicode=True))
        return path


@pytest.fixture
def run_config(tmp_path, chatml_tokenizer_dir) -> RunConfigFactory:
    """A ``RunConfigFactory`` in this test's ``tmp_path``."""
    return RunConfigFactory(tmp_path, chatml_tokenizer_dir)