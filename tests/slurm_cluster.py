"""A real two-node Slurm cluster on this machine for tests: munged, slurmctld and two slurmd
(``node1``, ``node2``: both ``NodeHostname=localhost`` on their own ports), everything under a
temporary folder, stopped by PID afterwards.

Facts this relies on (Debian's Slurm 22.05): several slurmd may run on one host when each has its
own ``Port`` and is started with ``-N <name>``; ``proctrack/linuxproc`` and ``task/none`` avoid
cgroups; ``SlurmdParameters=config_overrides`` lets the nodes advertise more CPUs than the host has;
a ``gres.conf`` whose ``File=`` points at empty files makes ``--gpus-per-node`` requests schedulable;
node names do not resolve, so jobs get ``MASTER_ADDR=127.0.0.1`` from the environment.

    pytest: ``slurm_cluster`` fixture (module scope) -> :class:`SlurmCluster`
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo")
CPUS_PER_NODE = 4


def missing_binaries() -> list[str]:
    found = {b: shutil.which(b) or (os.path.exists(f"/usr/sbin/{b}") and f"/usr/sbin/{b}") for b in BINARIES}
    return [b for b, path in found.items() if not path]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60, **kwargs)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}{proc.stdout}")
        return proc

    def sbatch(self, script: str, *args: str, script_args: list[str] | tuple = (), env: dict[str, str] | None = None,
               cwd=None) -> int:
        """Submit ``script`` with sbatch options ``args`` and script arguments ``script_args``."""
        out = subprocess.run(["sbatch", "--parsable", *args, script, *script_args], env={**self.env, **(env or {})},
                             capture_output=True, text=True, timeout=60, cwd=cwd)
        if out.returncode:
            raise AssertionError(f"sbatch {script} failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        text = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def wait(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
             timeout: float = 300, poll: float = 0.5) -> dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                # a requeued job waits before it becomes eligible again; no need to here
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)
            time.sleep(poll)
        raise AssertionError(f"job {job_id} did not reach {states} in {timeout}s: {self.job(job_id)}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            parts.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel every job (so slurmd ends their steps), then stop the daemons by PID."""
        if self.procs and all(p.poll() is None for p in self.procs):
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
            deadline = time.time() + 30
            while time.time() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _write_config(root: Path, ctl_port: int, node_ports: list[int]) -> Path:
    gpus = root / "dev"
    gpus.mkdir()
    gres = []
    nodes = []
    for i, port in enumerate(node_ports, start=1):
        (gpus / f"gpu{i}").touch()
        gres.append(f"NodeName=node{i} Name=gpu File={gpus / f'gpu{i}'}")
        nodes.append(f"NodeName=node{i} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} "
                     f"CPUs={CPUS_PER_NODE} RealMemory=1000 Gres=gpu:1 State=UNKNOWN")
    (root / "gres.conf").write_text("\n".join(gres) + "\n")
    (root / "state").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=d4dtest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctl_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.socket'}
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MaxJobCount=1000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=600
TmpFS={root}
{chr(10).join(nodes)}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def start_cluster(root: Path) -> SlurmCluster:
    """Start munged, slurmctld and two slurmd under ``root``; wait until both nodes are idle."""
    root.mkdir(parents=True, exist_ok=True)
    ctl_port, *node_ports = _free_ports(3)
    conf = _write_config(root, ctl_port, node_ports)
    # Jobs must not inherit the test process's wandb service (WANDB_SERVICE): a requeued job would
    # reattach to it and find the killed job's run id still registered there ("run ID in use").
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"},
           "SLURM_CONF": str(conf), "MASTER_ADDR": "127.0.0.1"}
    env.pop("SLURM_JOB_ID", None)
    cluster = SlurmCluster(root, env)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    devnull = subprocess.DEVNULL
    cluster.procs.append(subprocess.Popen(
        [_binary("munged"), "-F", "--force", f"--socket={root / 'munge.socket'}", f"--key-file={key}",
         f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
         f"--seed-file={root / 'munged.seed'}"], env=env, stdout=devnull, stderr=devnull))
    _wait_for(lambda: (root / "munge.socket").exists(), 20, "munged socket", cluster)
    cluster.procs.append(subprocess.Popen([_binary("slurmctld"), "-D", "-i", "-f", str(conf)], env=env,
                                          stdout=devnull, stderr=devnull))
    _wait_for(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, 30,
              "slurmctld", cluster)
    for i in range(1, len(node_ports) + 1):
        cluster.procs.append(subprocess.Popen([_binary("slurmd"), "-D", "-N", f"node{i}", "-f", str(conf)],
                                              env=env, stdout=devnull, stderr=devnull))

    def nodes_idle() -> bool:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
        return states.count("idle") == len(node_ports)

    _wait_for(nodes_idle, 60, "two idle nodes", cluster)
    return cluster


def _wait_for(check, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(p.poll() is not None for p in cluster.procs):
            cluster.stop()
            raise RuntimeError(f"a Slurm daemon exited while waiting for {what}:\n{cluster.logs()}")
        if check():
            return
        time.sleep(0.3)
    cluster.stop()
    raise RuntimeError(f"timed out waiting for {what}:\n{cluster.logs()}")


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed (missing {', '.join(missing)}): "
                    "apt-get install -y slurm-wlm munge, as .ci/run does")
    if os.geteuid() != 0:
        pytest.skip("the local test cluster runs slurmd, which needs root")
    root = Path(tmp_path_factory.mktemp("slurm"))
    # short paths: unix sockets are limited to ~100 characters
    cluster = start_cluster(root)
    try:
        yield cluster
    finally:
        cluster.stop()


try:  # a test-only callback the Slurm jobs load with --trainer.callbacks+=...
    import torch
    from lightning.pytorch import Callback

    class SaveRankWeights(Callback):
        """Every rank saves its final parameters to ``<dirpath>/rank<global_rank>.pt`` (not buffers:
        BatchNorm statistics are per rank under DDP)."""

        def __init__(self, dirpath: str):
            self.dirpath = dirpath

        def on_train_end(self, trainer, pl_module) -> None:
            Path(self.dirpath).mkdir(parents=True, exist_ok=True)
            # parameter names as state_dict() gives them (activation checkpointing wrappers stripped)
            torch.save({k.replace("_checkpoint_wrapped_module.", ""): v.detach().cpu()
                        for k, v in pl_module.named_parameters()},
                       Path(self.dirpath) / f"rank{trainer.global_rank}.pt")
except ImportError:  # pragma: no cover
    pass
