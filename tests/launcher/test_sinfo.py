"""GPUs per node from ``sinfo -h -o '%P|%G'`` text (``launcher.sinfo``): only an unambiguous answer counts."""
from __future__ import annotations

import pytest

from packlora.launcher import sinfo

SINFO = """\
cpu*|(null)
gpu|gpu:a100:8(S:0-1)
gpu|gpu:a100:4(S:0,1),gpu:a100:4(S:2,3)
mixed|gpu:4
mixed|gpu:v100:8,mps:800
empty|(null)
"""


@pytest.mark.parametrize(
    ("gres", "gpus"),
    [
        ("(null)", 0),
        ("gpu:8", 8),
        ("gpu:h100:8(S:0-1)", 8),
        ("gpu:a100:4(S:0,1),gpu:a100:4(S:2,3)", 8),  # socket lists hold commas too
        ("gpu:v100:8,mps:800,shard:16", 8),
        ("mps:400", 0),
        ("gpu:tesla:no", 0),
    ],
)
def test_gres_gpus_counts_gpu_items_only(gres, gpus):
    assert sinfo.gres_gpus(gres) == gpus


@pytest.mark.parametrize(
    ("partition", "expected"),
    [
        ("gpu", (8, "")),  # two node configurations, 8 GPUs each
        ("mixed", (None, "partition 'mixed' mixes nodes with 4, 8 GPUs")),
        ("empty", (None, "partition 'empty' has no GPU GRES")),
        (None, (None, "partition 'cpu' (the default) has no GPU GRES")),
        ("nosuch", (None, "sinfo shows no partition 'nosuch'")),
    ],
)
def test_gpus_per_node_is_known_only_when_every_node_agrees(partition, expected):
    assert sinfo.gpus_per_node(SINFO, partition) == expected


def test_the_default_partition_may_have_gpus():
    assert sinfo.gpus_per_node("debug|(null)\ngpu*|gpu:4\n", None) == (4, "")
    assert sinfo.gpus_per_node("debug|(null)\n", None) == (None, "sinfo shows no default partition")


def test_query_without_sinfo_says_so(monkeypatch):
    monkeypatch.setattr(sinfo.shutil, "which", lambda name: None)
    assert sinfo.query("gpu") == (None, "sinfo is not on PATH")
