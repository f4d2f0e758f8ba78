"""The CPU world-size fix changes accelerate's answer only when processes were launched and no
device was found."""
import pytest
from accelerate.utils import DistributedType

from packlora.training.distributed import _cpu_fallback


@pytest.mark.parametrize(
    "env, result, cpu, expected",
    [
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, (None, DistributedType.NO), False, ("gloo", DistributedType.MULTI_CPU)),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, ("nccl", DistributedType.MULTI_GPU), False, ("nccl", DistributedType.MULTI_GPU)),
        ({}, (None, DistributedType.NO), False, (None, DistributedType.NO)),  # single process
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, (None, DistributedType.NO), False, (None, DistributedType.NO)),
        ({"LOCAL_RANK": "0", "WORLD_SIZE": "2"}, (None, DistributedType.NO), True, (None, DistributedType.NO)),
    ],
)
def test_cpu_fallback_only_when_launched_without_a_device(monkeypatch, env, result, cpu, expected):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _cpu_fallback(result, cpu) == expected
