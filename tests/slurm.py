"""A one-node SLURM cluster for tests, started as root without systemd: munged, a socket-only MariaDB for
slurmdbd (submitit reads job states through `sacct`, which needs accounting), slurmdbd, slurmctld and slurmd,
every file in a temporary folder, every port on the loopback. `OneNodeSlurm.unavailable()` says why it cannot
start here (not root, binaries missing), for the test's skip."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

BINARIES = ("munged", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct",
            "squeue", "scancel", "scontrol", "srun")
PACKAGES = "slurm-wlm slurmdbd munge mariadb-server"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OneNodeSlurm:
    """Start with `start()`, stop with `stop()`; `env` is what a client (sbatch, sacct, submitit) needs."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 1000) -> None:
        self.root, self.cpus, self.memory_mb = Path(root), cpus, memory_mb
        self.processes: list[tuple[str, subprocess.Popen]] = []
        self.node = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    @staticmethod
    def unavailable() -> Optional[str]:
        """Why a cluster cannot start here, or None."""
        if os.geteuid() != 0:
            return "the one-node SLURM starts as root only (munged, slurmd)"
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            return f"missing {', '.join(missing)} (apt-get install {PACKAGES})"
        return None

    def _spawn(self, name: str, argv: list[str], env: Optional[dict] = None) -> None:
        log = open(self.root / f"{name}.console", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env or self.env,
                                   start_new_session=True)
        self.processes.append((name, process))

    def _wait(self, what: str, ready, timeout: float = 60.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}): {self.console(name)}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} not ready after {timeout:.0f} s: {self.console(self.processes[-1][0])}")

    def console(self, name: str) -> str:
        path = self.root / f"{name}.console"
        return path.read_text(errors="replace")[-2000:] if path.is_file() else ""

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)

    def start(self) -> "OneNodeSlurm":
        r = self.root
        for folder in ("munge", "db", "state", "spool", "log"):
            (r / folder).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._start_mariadb()
        self._write_configs()
        self._spawn("slurmdbd", ["slurmdbd", "-D"],
                    env=dict(self.env, MYSQL_UNIX_PORT=str(r / "db" / "mysqld.sock")))
        self._wait("slurmdbd", lambda: _listening(self.dbd_port))
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(r / "slurm.conf")])
        self._wait("slurmctld", lambda: _listening(self.ctld_port))
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(r / "slurm.conf")])
        self._wait("the node", lambda: "idle" in self._run("sinfo", "-h", "-o", "%t").stdout)
        return self

    def _start_munge(self) -> None:
        """munged on its default socket: slurmctld's connection to slurmdbd ignores AuthInfo's socket (22.05).
        A munged already answering there is used as it is."""
        self.munge_socket = MUNGE_SOCKET
        if _munge_works():
            return
        m = self.root / "munge"
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                               f"--socket={MUNGE_SOCKET}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={m / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait("munged", _munge_works)

    def _start_mariadb(self) -> None:
        db = self.root / "db"
        install = subprocess.run(["mariadb-install-db", "--user=root", f"--datadir={db / 'data'}",
                                  "--auth-root-authentication-method=socket", "--skip-test-db"],
                                 capture_output=True, text=True, timeout=120)
        if install.returncode:
            raise RuntimeError(f"mariadb-install-db failed: {install.stderr[-2000:]}")
        self.db_socket = db / "mysqld.sock"
        self._spawn("mariadb", ["mariadbd", "--no-defaults", "--user=root", f"--datadir={db / 'data'}",
                                f"--socket={self.db_socket}", "--skip-networking", f"--pid-file={db / 'mysqld.pid'}",
                                "--innodb-buffer-pool-size=16M", "--skip-log-bin"])
        self._wait("mariadb", self.db_socket.exists)

    def _write_configs(self) -> None:
        r = self.root
        self.dbd_port, self.ctld_port, self.slurmd_port = free_port(), free_port(), free_port()
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        dbd = r / "slurmdbd.conf"
        dbd.write_text(auth + f"DbdHost=localhost\nDbdAddr=127.0.0.1\nDbdPort={self.dbd_port}\nSlurmUser=root\n"
                       f"StorageType=accounting_storage/mysql\nStorageHost=localhost\nStorageUser=root\n"
                       f"StorageLoc=slurm_acct_db\nPidFile={r / 'log' / 'slurmdbd.pid'}\n"
                       f"LogFile={r / 'log' / 'slurmdbd.log'}\n")
        dbd.chmod(0o600)
        (r / "slurm.conf").write_text(
            auth + f"ClusterName=dnrttest\nSlurmctldHost={self.node}(127.0.0.1)\nSlurmctldPort={self.ctld_port}\n"
            f"SlurmdPort={self.slurmd_port}\nSlurmUser=root\nSlurmdUser=root\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'log' / 'slurmctld.pid'}\nSlurmdPidFile={r / 'log' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}\nSlurmdLogFile={r / 'log' / 'slurmd.log'}\n"
            "MpiDefault=none\nProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nEnforcePartLimits=ALL\n"
            "MailProg=/bin/true\n"
            "JobAcctGatherType=jobacct_gather/none\nSelectType=select/cons_tres\nSelectTypeParameters=CR_Core\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={self.dbd_port}\nReturnToService=2\nKillWait=5\nMinJobAge=300\n"
            "SchedulerParameters=sched_interval=1\nMessageTimeout=20\nPluginDir=/usr/lib/x86_64-linux-gnu/slurm-wlm\n"
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n")

    def stop(self) -> None:
        for _, process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _munge_works() -> bool:
    """Whether a munged answers on the default socket (a credential encoded and decoded)."""
    if not MUNGE_SOCKET.exists():
        return False
    encoded = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
    return encoded.returncode == 0 and subprocess.run(["unmunge"], input=encoded.stdout, capture_output=True,
                                                      timeout=10).returncode == 0
