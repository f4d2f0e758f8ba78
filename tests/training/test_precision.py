"""model.dtype on a machine without CUDA: bfloat16 trains (the GPU-only check in TrainingArguments is
answered for the arguments alone), float16 is refused up front with the fix."""
import pytest
import torch

from packlora.training.config import load_config
from packlora.training.model import check_runs_here


@pytest.fixture
def cfg_path(run_config):
    return run_config()


def test_float16_without_cuda_is_refused_with_the_fix(cfg_path):
    cfg = load_config(cfg_path, ["model.dtype=float16"])
    with pytest.raises(ValueError, match="model.dtype: float16 needs a CUDA GPU .* use bfloat16 or float32 on CPU"):
        check_runs_here(cfg.model, cuda=False)
    check_runs_here(cfg.model, cuda=True)
    for dtype in ("bfloat16", "float32", "auto"):
        check_runs_here(load_config(cfg_path, [f"model.dtype={dtype}"]).model, cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_bfloat16_training_arguments_build_on_cpu_and_leave_transformers_check_alone(cfg_path):
    import transformers.training_args as training_args

    from packlora.training.recipe import build_training_arguments

    original = training_args.is_torch_bf16_gpu_available
    args = build_training_arguments(load_config(cfg_path, ["model.dtype=bfloat16"]))
    assert (args.bf16, args.fp16, args.mixed_precision) == (True, False, "bf16")
    assert training_args.is_torch_bf16_gpu_available is original and original() is False
    with pytest.raises(ValueError, match="Your setup doesn't support bf16/gpu"):  # what the patch answers, unpatched
        training_args.TrainingArguments(output_dir=str(cfg_path.parent / "o"), bf16=True, report_to=[])
    assert build_training_arguments(load_config(cfg_path, ["model.dtype=float32"])).bf16 is False
