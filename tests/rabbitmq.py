"""A real RabbitMQ server for one test session, on loopback, in its own folder.

The Globus Compute SDK takes task results over AMQP; the tests run its own
result watcher against this server rather than replacing the socket. Debian's
``rabbitmq-server`` (scripts/install-servers.sh installs it) is started from
its own scripts under ``/usr/lib/rabbitmq/bin`` (the ``/usr/sbin`` wrapper
switches to the ``rabbitmq`` user and drops our environment), with every
port, data folder, log folder and Erlang cookie private to this session, so
it cannot collide with a system broker or another session's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
START_TIMEOUT_S = 120  # an idle machine starts it in ~5 s; a loaded one far slower


def rabbitmq_installed() -> bool:
    return (RABBITMQ_BIN / "rabbitmq-server").exists() and (RABBITMQ_BIN / "rabbitmqctl").exists()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class RabbitMQ:
    """One running broker: ``url`` for pika, ``ctl`` for rabbitmqctl against this node only."""

    folder: Path
    port: int
    node: str
    env: dict[str, str]
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    @classmethod
    def start(cls) -> RabbitMQ:
        # Not under pytest's temp root: the broker runs as root, and the folder
        # name must stay short (Erlang limits the node's path lengths).
        folder = Path(tempfile.mkdtemp(prefix="tpm-rmq-"))
        port, dist_port, epmd_port = _free_port(), _free_port(), _free_port()
        node = f"tpm{port}@localhost"
        (folder / "enabled_plugins").write_text("[].\n")  # no management plugin: faster, fewer ports
        env = {
            **os.environ,
            "HOME": str(folder),  # the Erlang cookie rabbitmqctl shares with the server
            "RABBITMQ_NODENAME": node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(folder / "log"),
            "RABBITMQ_PID_FILE": str(folder / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(folder / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(folder / "rabbitmq"),  # absent: defaults
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(folder / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(folder / "rabbitmq-env.conf"),
        }
        broker = cls(folder, port, node, env)
        with open(folder / "server.out", "wb") as out:
            broker.process = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=env, stdout=out,
                                              stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
        waited = broker.ctl("wait", str(folder / "pid"), "--timeout", str(START_TIMEOUT_S),
                            timeout=START_TIMEOUT_S + 30, check=False)
        if waited.returncode != 0:
            log = (folder / "server.out").read_text(errors="replace")[-3000:]
            broker.stop()
            raise RuntimeError(f"rabbitmq-server did not start:\n{waited.stdout}{waited.stderr}\n{log}")
        return broker

    def ctl(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=check)

    def close_all_connections(self) -> None:
        """The broker closes every client connection (as on a broker restart or failover)."""
        self.ctl("close_all_connections", "tpm tests: the broker drops its connections")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.ctl("stop", str(self.folder / "pid"), timeout=120, check=False)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # epmd daemonizes and outlives the node; this one listens on our private port only.
        epmd = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
        if epmd is not None:
            subprocess.run([str(epmd), "-kill"], env=self.env, capture_output=True, timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)
