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

Where each process learns its place (``resolve_process_place``): from ``RANK``/``LOCAL_RANK``/``WORLD_SIZE``
when deepspeed or torchrun started it; from ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS``
when ``srun`` started it directly, one task per process. Counts that disagree (``SLURM_NTASKS`` vs the
tasks srun really started, the world size the launch spec asked for in ``PACKLORA_WORLD_SIZE``, more
processes per node than visible GPUs) stop the run before the process group is created.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from packlora.core.errors import StateError

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
    """Map an ``srun`` task's SLURM variables to RANK/LOCAL_RANK/WORLD_SIZE (checking every count),
    apply the CPU world-size fix and skip the shm-comm JIT build. Idempotent; call before
    ``TrainingArguments`` is created.

    Raises:
        LaunchEnvError: the launch environment is inconsistent (see ``resolve_process_place``).
    """
    global _PATCHED
    import torch

    place = resolve_process_place(os.environ, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if place.source == "srun":
        os.environ.update(
            RANK=str(place.rank), LOCAL_RANK=str(place.local_rank), WORLD_SIZE=str(place.world_size)
        )
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


EXPECTED_WORLD_SIZE_ENV = "PACKLORA_WORLD_SIZE"
"""Set by ``packlora slurm`` to nodes x processes per node: the world size the launch spec asked for."""


class LaunchEnvError(StateError):
    """The variables a launcher or srun set do not describe a consistent set of processes."""


@dataclass(frozen=True, slots=True)
class ProcessPlace:
    """Where this process sits in the run."""

    rank: int
    """Global rank in ``[0, world_size)``."""
    local_rank: int
    """Rank on this machine; the index of its GPU among the visible ones."""
    world_size: int
    """Number of training processes in the run."""
    source: str
    """``"launcher"`` (deepspeed/torchrun set RANK), ``"srun"`` (one srun task per process) or ``"single"``."""


def resolve_process_place(env: Mapping[str, str], cuda_devices: int = 0) -> ProcessPlace:
    """This process's rank, local rank and world size from the launch environment, checked.

    A launcher's ``RANK``/``WORLD_SIZE`` win (torchrun and deepspeed started under ``srun`` also
    inherit the srun task's SLURM variables, which then describe the launcher, not this process).
    Otherwise an ``srun`` step task (``SLURM_STEP_ID`` set; the batch script itself has none) maps
    ``SLURM_PROCID`` -> rank, ``SLURM_LOCALID`` -> local rank, ``SLURM_STEP_NUM_TASKS`` -> world size.

    Args:
        env: the environment, e.g. ``os.environ``.
        cuda_devices: CUDA devices this process sees (0 on CPU); local ranks must index them.

    Raises:
        LaunchEnvError: srun started a different number of tasks than ``SLURM_NTASKS``; the world
            size differs from ``PACKLORA_WORLD_SIZE``; a rank is out of range; MASTER_ADDR/PORT are
            missing for an srun task; or a local rank has no GPU of its own. The message names
            the variables, their values and the fix.

    Example:
        >>> resolve_process_place({"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        ...                        "SLURM_STEP_NUM_TASKS": "4", "SLURM_NTASKS": "4",
        ...                        "MASTER_ADDR": "node01", "MASTER_PORT": "20417"})
        ProcessPlace(rank=3, local_rank=1, world_size=4, source='srun')
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        place = ProcessPlace(
            _int(env, "RANK"), _int(env, "LOCAL_RANK", 0), _int(env, "WORLD_SIZE"), "launcher"
        )
    elif "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        started = _int(env, "SLURM_STEP_NUM_TASKS", _int(env, "SLURM_NTASKS", 1))
        requested = _int(env, "SLURM_NTASKS", started)
        if started != requested:
            raise LaunchEnvError(
                f"srun started SLURM_STEP_NUM_TASKS={started} tasks but the job asked for SLURM_NTASKS={requested}; "
                f"the world size would be wrong. Start one task per process with `srun --ntasks={requested}` "
                "(or plain `srun` inside the batch script)"
            )
        place = ProcessPlace(_int(env, "SLURM_PROCID"), _int(env, "SLURM_LOCALID", 0), started, "srun")
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not env.get(name)]
        if missing and started > 1:
            raise LaunchEnvError(
                f"started by srun as task {place.rank} of {started}, but {' and '.join(missing)} "
                "not set; export them in the batch script before srun (`packlora slurm` writes such a script)"
            )
    else:
        place = ProcessPlace(0, 0, 1, "single")

    expected = env.get(EXPECTED_WORLD_SIZE_ENV)
    if expected is not None and _int(env, EXPECTED_WORLD_SIZE_ENV) != place.world_size:
        raise LaunchEnvError(
            f"the launch asked for {EXPECTED_WORLD_SIZE_ENV}={expected} processes (nodes x processes per node) "
            f"but this one was started as rank {place.rank} of {place.world_size} ({_describe(place, env)}); "
            "make the srun task count / --nproc-per-node match the nodes and GPUs requested"
        )
    if not 0 <= place.rank < place.world_size or not 0 <= place.local_rank < place.world_size:
        raise LaunchEnvError(
            f"rank {place.rank} / local rank {place.local_rank} out of range for world size "
            f"{place.world_size} ({_describe(place, env)})"
        )
    if cuda_devices and place.local_rank >= cuda_devices:
        raise LaunchEnvError(
            f"local rank {place.local_rank} but this process sees only {cuda_devices} CUDA device(s) "
            f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}): more processes per node "
            "than GPUs. Start one process per GPU (--ntasks-per-node = --gpus-per-node, without --gpus-per-task)"
        )
    return place


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise LaunchEnvError(f"{name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchEnvError(f"{name}={value!r} is not an integer") from None


def _describe(place: ProcessPlace, env: Mapping[str, str]) -> str:
    if place.source == "srun":
        return f"SLURM_PROCID={env.get('SLURM_PROCID')}, SLURM_STEP_NUM_TASKS={env.get('SLURM_STEP_NUM_TASKS')}"
    if place.source == "launcher":
        return f"RANK={env.get('RANK')}, WORLD_SIZE={env.get('WORLD_SIZE')}"
    return "no launcher variables: a single process"


def describe_place(env: Mapping[str, str]) -> str:
    """One line: this process's rank, host and the CPUs it may run on (``os.sched_getaffinity``),
    with the Slurm and OpenMP settings that decide them, and the Slurm node name inside a job.

    Example:
        >>> describe_place({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "SLURM_CPUS_PER_TASK": "4",
        ...                 "OMP_NUM_THREADS": "1"})  # doctest: +ELLIPSIS
        'rank 1 of 2 (local rank 0) on ...: ... CPU(s) usable, SLURM_CPUS_PER_TASK=4, OMP_NUM_THREADS=1'
    """
    import socket

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    node = f", Slurm node {env['SLURMD_NODENAME']}" if env.get("SLURMD_NODENAME") else ""
    slurm_cpus, threads = env.get("SLURM_CPUS_PER_TASK", "<unset>"), env.get("OMP_NUM_THREADS", "<unset>")
    return (
        f"rank {env.get('RANK', 0)} of {env.get('WORLD_SIZE', 1)} (local rank {env.get('LOCAL_RANK', 0)}) on "
        f"{socket.gethostname()}: {cpus} CPU(s) usable, SLURM_CPUS_PER_TASK={slurm_cpus}, OMP_NUM_THREADS={threads}{node}"
    )


FAULT_ENV = "PACKLORA_TEST_FAULT"
"""Test hook, off unless set: ``RANK:STEP:exit``, ``RANK:STEP:kill``, ``RANK:STEP:hang`` or ``RANK:STEP:pause``
makes that rank die (``os._exit(17)``), die of SIGKILL (as the out-of-memory killer does it), stop
answering collectives, or wait until the stop file (``PACKLORA_STOP_FILE``, ``training.preemption``)
exists, after optimizer step STEP."""
PAUSE_LIMIT_S = 600
"""The longest a ``pause`` fault waits for the stop file."""


def fault_injection_callbacks() -> list:
    """``[callback]`` injecting the fault ``PACKLORA_TEST_FAULT`` names; ``[]`` when it is unset.
    For the failure-behaviour tests only (a dead or hung rank must end the job, not hang it)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return []
    try:
        rank_s, step_s, action = spec.split(":")
        fault_rank, fault_step = int(rank_s), int(step_s)
        if action not in ("exit", "kill", "hang", "pause"):
            raise ValueError
    except ValueError:
        raise LaunchEnvError(
            f"{FAULT_ENV}={spec!r} must be RANK:STEP:exit, RANK:STEP:kill, RANK:STEP:hang or RANK:STEP:pause"
        ) from None
    stop_file = os.environ.get("PACKLORA_STOP_FILE")
    if action == "pause" and not stop_file:
        raise LaunchEnvError(f"{FAULT_ENV}={spec!r}: pause waits for PACKLORA_STOP_FILE, which is not set")
    import signal
    import time

    from transformers import TrainerCallback

    class _Fault(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == fault_step and rank() == fault_rank:
                until = f" until {stop_file} exists" if action == "pause" else ""
                print(f"{FAULT_ENV}: rank {fault_rank} {action}s after step {fault_step}{until} "
                      f"(at {time.time():.3f})", flush=True)  # epoch time: tests measure from it
                if action == "exit":
                    os._exit(17)
                if action == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                deadline = time.monotonic() + PAUSE_LIMIT_S
                while action == "hang" or (not os.path.exists(stop_file) and time.monotonic() < deadline):
                    time.sleep(60 if action == "hang" else 0.1)

    return [_Fault()]


@contextlib.contextmanager
def without_zero3_init(args):
    """Build a model in one process without DeepSpeed's ZeRO-3 ``zero.Init`` (which needs every rank)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    ds = getattr(args, "hf_deepspeed_config", None)
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ds is not None:
            set_hf_deepspeed_config(ds)


def shared_by_all_ranks(directory: str | os.PathLike) -> bool:
    """Whether every process of the run sees the same ``directory`` (a shared file system): rank 0
    writes a probe file there, every rank looks for it. True for a single process.

    Decides who prepares the data (``TrainingRecipe.prepare_data``): global rank 0 when the cache is
    shared, else local rank 0 of each node. A file system that shows a new file late (NFS attribute
    caching) reads as not shared: each node then prepares its own copy, which is slower, never wrong
    (cache writes are atomic). Call on every rank: it is a collective."""
    import uuid
    from pathlib import Path

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = [f".shared-probe-{uuid.uuid4().hex}" if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(name, src=0)
    probe = directory / name[0]
    if dist.get_rank() == 0:
        probe.touch()
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, probe.exists())
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    return all(seen)
