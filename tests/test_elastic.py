"""Recovery without a person: two torchrun agents (one worker each) with a c10d rendezvous, ``--nnodes 1:2
--max-restarts``; one "host" is lost mid-run and the other restarts its worker, which resumes (``--resume auto``)
from the newest complete checkpoint on the world size that is left (ZeRO-1: through the universal checkpoint)
and finishes the run.

* on one address: the second agent and its worker are killed;
* on two hosts with their own addresses (network namespaces joined by a veth pair, as root): the second host's
  processes are killed, and separately its link is cut (its peers then learn of it through the collective
  timeout, ``train.collective_timeout_s``). Skipped, with the reason, where namespaces cannot be created.

The sample accounting: the surviving run's metrics run on from the checkpoint it resumed at (the samples
trained after that checkpoint on the lost world size are trained again, at-least-once) to the total, with no
gap; the summary says the run ended on one rank.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from lct_fast.distributed import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.distributed

TOTAL = 12000
CKPT = 1024
BATCH = 8
SETS = ["model.width=32", f"train.global_batch={BATCH}", "train.log_interval=8", "optim.warmup_samples=0",
        "data.shuffle_buffer=64", f"train.ckpt_interval={CKPT}", "train.sample_interval=0", "train.eval_interval=0",
        "deepspeed.zero_optimization.stage=1", f"train.total_samples={TOTAL}", "train.collective_timeout_s=20",
        "train.progress_s=0"]


def agent_cmd(run: str, endpoint: str, local_addr: str | None, is_host: bool | None = None) -> list[str]:
    # is_host: which agent serves the rendezvous store (torchrun guesses it from the host name, which the two
    # namespaces share)
    conf = "join_timeout=60,last_call_timeout=3,keep_alive_interval=2,keep_alive_max_attempt=3"
    if is_host is not None:
        conf += f",is_host={str(is_host).lower()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
           "--max-restarts", "3", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "elastic-test",
           "--rdzv-conf", conf, "--monitor-interval", "1"]
    if local_addr:
        cmd += ["--local-addr", local_addr]
    cmd += ["launch/train.py", "--config", "configs/tiny.json", "--out", run, "--resume", "auto"]
    return cmd + [a for s in SETS for a in ("--set", s)]


def start(cmd: list[str], log: str, netns: str | None = None, ifname: str | None = None) -> subprocess.Popen:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    if ifname:
        env["GLOO_SOCKET_IFNAME"] = ifname
    if netns:
        cmd = ["ip", "netns", "exec", netns] + cmd
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout.split()
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def kill_host(proc: subprocess.Popen) -> None:
    """Every process of that agent: the agent and its workers (torchrun puts workers in sessions of their own)."""
    for pid in [proc.pid] + descendants(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_checkpoint(run: str, procs, timeout: float = 180) -> str:
    latest = os.path.join(run, "checkpoints", "latest")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if os.path.exists(latest):
            return open(latest).read().strip()
        gone = [p for p in procs if p.poll() is not None]
        assert not gone, f"an agent exited before the first checkpoint: {gone[0].args[-40:]}"
        time.sleep(0.5)
    raise AssertionError("no checkpoint in time")


def check_recovered(run: str, survivor: subprocess.Popen, log: str, timeout: float = 300) -> None:
    try:
        rc = survivor.wait(timeout=timeout)
    finally:
        text = open(log).read()
    assert rc == 0, text[-4000:]
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["samples"] == TOTAL and summary["world_size"] == 1
    assert "resumed on 1)" in text, text[-3000:]
    m = re.search(r"resumed from \S+ at (\d+) samples \(written on 2 ranks, resumed on 1\)", text)
    assert m, text[-3000:]
    resumed_at = int(m.group(1))
    assert resumed_at % CKPT == 0 and 0 < resumed_at < TOTAL
    rows = [json.loads(line)["samples"] for line in open(os.path.join(run, "metrics.jsonl"))]
    # the last segment starts right after the checkpoint it resumed at and runs to the total without a gap
    start = max(i for i, s in enumerate(rows) if s == resumed_at + BATCH)
    assert rows[start:] == list(range(resumed_at + BATCH, TOTAL + 1, BATCH))
    assert rows[start - 1] >= resumed_at, "the lost world size had reached the checkpoint before it failed"


def test_agent_killed_on_one_address(tmp_path):
    run, port = str(tmp_path / "run"), free_port()
    logs = [str(tmp_path / "a.log"), str(tmp_path / "b.log")]
    a = start(agent_cmd(run, f"127.0.0.1:{port}", None, True), logs[0])  # a hosts the rendezvous store
    time.sleep(1.0)
    b = start(agent_cmd(run, f"127.0.0.1:{port}", None, False), logs[1])
    try:
        wait_for_checkpoint(run, [a, b])
        kill_host(b)
        check_recovered(run, a, logs[0])
    finally:
        kill_host(a)
        kill_host(b)


NS = ("lctel_a", "lctel_b")
ADDR = ("10.77.31.1", "10.77.31.2")
IF = ("lctel_va", "lctel_vb")


@pytest.fixture
def two_hosts():
    """Two network namespaces with their own addresses, joined by a veth pair (root only)."""
    if shutil.which("ip") is None:
        pytest.skip("no `ip` command: network namespaces unavailable")
    # a veth left in the root namespace by an earlier crashed set-up would block this one
    cleanup = [["ip", "netns", "del", NS[0]], ["ip", "netns", "del", NS[1]], ["ip", "link", "del", IF[0]]]
    for c in cleanup:
        subprocess.run(c, capture_output=True)
    steps = [["ip", "netns", "add", NS[0]], ["ip", "netns", "add", NS[1]],
             ["ip", "link", "add", IF[0], "type", "veth", "peer", "name", IF[1]],
             ["ip", "link", "set", IF[0], "netns", NS[0]], ["ip", "link", "set", IF[1], "netns", NS[1]]]
    for ns, ifn, addr in zip(NS, IF, ADDR):
        steps += [["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", ifn], ["ip", "-n", ns, "link", "set", ifn, "up"],
                  ["ip", "-n", ns, "link", "set", "lo", "up"]]
    for s in steps:
        proc = subprocess.run(s, capture_output=True, text=True)
        if proc.returncode != 0:
            for c in cleanup:
                subprocess.run(c, capture_output=True)
            pytest.skip(f"cannot create network namespaces ({' '.join(s)}: {proc.stderr.strip()}); needs root")
    yield
    for c in cleanup:
        subprocess.run(c, capture_output=True)


@pytest.mark.parametrize("loss", ["killed", "link_cut"])
def test_host_lost_on_two_addresses(tmp_path, two_hosts, loss):
    run, port = str(tmp_path / "run"), free_port()
    logs = [str(tmp_path / "a.log"), str(tmp_path / "b.log")]
    endpoint = f"{ADDR[0]}:{port}"
    a = start(agent_cmd(run, endpoint, ADDR[0], True), logs[0], NS[0], IF[0])
    time.sleep(1.0)
    b = start(agent_cmd(run, endpoint, ADDR[1], False), logs[1], NS[1], IF[1])
    try:
        wait_for_checkpoint(run, [a, b])
        if loss == "killed":
            kill_host(b)
        else:
            subprocess.run(["ip", "-n", NS[1], "link", "set", IF[1], "down"], check=True)
        check_recovered(run, a, logs[0])
    finally:
        kill_host(a)
        kill_host(b)
