"""Two nodes without Slurm: ``packlora launch --launcher torchrun --nnodes 2 --node-rank {0,1}`` started
as two separate process trees (as on two machines, one command each), one process per node, train
with the per-step losses of the one-node, two-process run (``tests/multinode.py``): bit-identical
under gloo on CPU. The two trees share one data cache (one machine's file system), so only global
rank 0 prepares the data and the other node loads it (issue 22).

    python -m pytest -m distributed tests/distributed/test_two_node_torchrun.py -q
"""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from launching import REPO_ROOT, launch_env
from multinode import MAX_STEPS, placements, step_losses, tensorboard_losses

pytestmark = pytest.mark.distributed
RUN_TIMEOUT_S = 600  # both trees together; ~30 s on 2 idle cores


@pytest.fixture(scope="module")
def two_trees(multinode_config, tmp_path_factory):
    """Run both node commands at once; returns (output_dir, {node rank: output})."""
    from packlora.launcher.ports import choose_port

    host = socket.gethostname()  # node 0's address as the other node sees it: not a loopback literal
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        pytest.skip(f"this machine's host name {host!r} does not resolve; it is node 0's address here")
    port = choose_port(addr=host)
    out = tmp_path_factory.mktemp("two_trees") / "out"
    logs = {r: out.parent / f"node{r}.log" for r in (0, 1)}
    procs = {}
    for r in (0, 1):
        cmd = [sys.executable, "-m", "packlora.cli", "launch", str(multinode_config), f"output_dir={out}",
               "--launcher", "torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(r),
               "--master-addr", host, "--master-port", str(port),
               f"data.cache_dir={out.parent / 'cache'}"]  # fmt: skip  # a cold cache: someone must prepare
        with open(logs[r], "w", encoding="utf-8") as log:
            procs[r] = subprocess.Popen(cmd, cwd=REPO_ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
    try:
        codes = {r: p.wait(timeout=RUN_TIMEOUT_S) for r, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    text = {r: logs[r].read_text(encoding="utf-8", errors="replace") for r in (0, 1)}
    if codes != {0: 0, 1: 0}:
        pytest.fail(f"exit codes {codes}\n" + "\n".join(f"--- node {r}:\n{text[r][-4000:]}" for r in (0, 1)))
    return out, text


def test_two_torchrun_process_trees_give_the_one_node_losses(two_trees, one_node_reference):
    out, _ = two_trees
    reference = step_losses(one_node_reference)
    assert [s for s, _, _ in reference] == list(range(1, MAX_STEPS + 1))
    assert step_losses(out) == reference  # bit-identical: losses and gradient norms
    assert tensorboard_losses(out) == tensorboard_losses(one_node_reference)


def test_each_tree_ran_one_rank_of_two(two_trees):
    _, text = two_trees
    for r in (0, 1):
        place = placements(text[r])
        assert list(place) == [r], f"node {r} logged ranks {sorted(place)}"
        assert (place[r]["world"], place[r]["local"]) == (2, 0)


def test_with_a_cache_both_nodes_see_only_global_rank_0_prepares_the_data(two_trees):
    _, text = two_trees
    assert "INFO packlora.data.prepare: data " in text[0] and ": prepared in " in text[0], text[0][-3000:]
    assert ": prepared in " not in text[1] and "rank1] INFO packlora.data.prepare: data " in text[1], text[1][-3000:]
    assert ": loaded from the cache in " in text[1]
