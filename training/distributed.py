"""Make multi-process CPU runs see the right world size, in one place.

The problem (accelerate 1.15, no GPU): ``PartialState._prepare_backend`` finds no accelerator, returns
no backend, and accelerate counts **one** process even when ``LOCAL_RANK``/``WORLD_SIZE`` say 2.
DeepSpeed then fails its batch check (``train_batch_size ... != micro_batch * grad_acc * world_size``),
and, worse, without ``train_batch_size`` both ranks act as process 0 and see the same data.

The fix: when a launcher started several processes (``LOCAL_RANK`` set, ``WORLD_SIZE > 1``) and no
accelerator is visible, report the DeepSpeed CPU accelerator's communication backend (``gloo``) as a
``MULTI_CPU`` setup. accelerate then initialises DeepSpeed/torch.distributed with the real world size.
With CUDA (or any accelerator accelerate recognises) present, the patch returns accelerate's own
answer unchanged.

Also here, because it must happen before the first distributed init: DeepSpeed's CPU shared-memory
all-reduce op (``deepspeed_shm_comm``, used only for inference all-reduce) is marked incompatible,
so it is not JIT-compiled (about 82 s on 2 cores; ``../shared/ENVIRONMENT.md``).
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)
_PATCHED = False


def _cpu_fallback(result: tuple, cpu: bool) -> tuple:
    """accelerate's ``(backend, distributed_type)``, or ``("gloo", MULTI_CPU)`` when it found no
    device although several processes were launched."""
    from accelerate.utils import DistributedType

    backend, dtype = result
    launched = int(os.environ.get("LOCAL_RANK", -1)) != -1 and int(os.environ.get("WORLD_SIZE", 1)) > 1
    if dtype == DistributedType.NO and backend is None and launched and not cpu:
        return _cpu_comm_backend(), DistributedType.MULTI_CPU
    return result


def _cpu_comm_backend() -> str:
    try:
        from deepspeed.accelerator import get_accelerator

        return get_accelerator().communication_backend_name() or "gloo"
    except ImportError:
        return "gloo"


def configure() -> None:
    """Apply the CPU world-size fix and skip the shm-comm JIT build. Idempotent; call before
    ``TrainingArguments`` is created."""
    global _PATCHED
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except ImportError:
        pass
    if _PATCHED:
        return
    from accelerate.state import PartialState

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        return _cpu_fallback(original(self, cpu, sagemaker_dp, backend), cpu)

    PartialState._prepare_backend = _prepare_backend
    _PATCHED = True


def rank() -> int:
    """Global rank from the launcher's environment (0 when not distributed)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """World size from the launcher's environment (1 when not distributed)."""
    return int(os.environ.get("WORLD_SIZE", 1))
