"""GPUs per node of a Slurm partition, read from its GRES (``sinfo``), for ``packlora slurm``.

The submit host (a login node, usually without GPUs) says nothing about the compute nodes, so
``--gpus-per-node`` comes from the flag, the config's ``gpus_per_node``, or, when every node of the
partition has the same number of GPUs, from here. Anything else is an error naming the flag.

The pure part (``gpus_per_node``) reads ``sinfo -h -o '%P|%G'`` text; ``query`` runs sinfo.
"""
from __future__ import annotations

import re
import shutil
import subprocess

SINFO_ARGV = ["sinfo", "--noheader", "--format=%P|%G"]
"""One line per partition and node configuration: ``NAME|GRES``; the default partition ends in ``*``."""
_PARENS = re.compile(r"\([^)]*\)")  # socket bindings such as (S:0-1) or (S:0,1)


def gres_gpus(gres: str) -> int:
    """GPUs in one node's GRES string: the counts of its ``gpu[:type]:N`` items, summed.

    Example:
        >>> gres_gpus("gpu:a100:4(S:0-1),gpu:v100:2,mps:400")
        6
        >>> gres_gpus("(null)")
        0
    """
    total = 0
    for item in _PARENS.sub("", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def gpus_per_node(sinfo_text: str, partition: str | None) -> tuple[int | None, str]:
    """``(G, "")`` when every node of ``partition`` (``None``: the default one) has G > 0 GPUs;
    otherwise ``(None, why)``.

    Example:
        >>> gpus_per_node("cpu*|(null)\\ngpu|gpu:a100:8(S:0-1)\\ngpu|gpu:h100:8\\n", "gpu")
        (8, '')
        >>> gpus_per_node("cpu*|(null)\\ngpu|gpu:4\\ngpu|gpu:8\\n", "gpu")
        (None, "partition 'gpu' mixes nodes with 4, 8 GPUs")
        >>> gpus_per_node("cpu*|(null)\\n", None)
        (None, "partition 'cpu' (the default) has no GPU GRES")
    """
    rows = [line.split("|", 1) for line in sinfo_text.splitlines() if "|" in line]
    if partition is None:
        rows = [(name.rstrip("*"), gres) for name, gres in rows if name.endswith("*")]
        if not rows:
            return None, "sinfo shows no default partition"
        label = f"partition {rows[0][0]!r} (the default)"
    else:
        rows = [(name.rstrip("*"), gres) for name, gres in rows if name.rstrip("*") == partition]
        if not rows:
            return None, f"sinfo shows no partition {partition!r}"
        label = f"partition {partition!r}"
    counts = sorted({gres_gpus(gres) for _, gres in rows})
    if counts == [0]:
        return None, f"{label} has no GPU GRES"
    if len(counts) > 1:
        return None, f"{label} mixes nodes with {', '.join(map(str, counts))} GPUs"
    return counts[0], ""


def query(partition: str | None, timeout: float = 20) -> tuple[int | None, str]:
    """``gpus_per_node`` of what ``sinfo`` says now; ``(None, why)`` when sinfo is missing or fails."""
    if shutil.which("sinfo") is None:
        return None, "sinfo is not on PATH"
    try:
        proc = subprocess.run(SINFO_ARGV, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"sinfo did not answer within {timeout:.0f} s"
    if proc.returncode != 0:
        return None, f"sinfo failed: {proc.stderr.strip() or proc.returncode}"
    return gpus_per_node(proc.stdout, partition)
