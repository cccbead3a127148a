"""Private Redis and RabbitMQ servers that reliability tests may kill and restart.

The shared servers on this machine (Redis on 6379, RabbitMQ ``rabbit@localhost`` on
5672) are never touched: every private server here is a child process of the test
run, with its own port, data directory, log and (for RabbitMQ) node name, Erlang
cookie, distribution port and plugin list. Both run the project's shipped configuration
(broker_config/redis.conf, broker_config/rabbitmq.conf with definitions.json) copied
with ONLY the port and the directories changed (:func:`shipped_redis_conf`,
:func:`shipped_rabbitmq_conf`; the paths of the TLS files and of Redis's ACL file
count as directories), so what the tests exercise is what users deploy: TLS only
(no plaintext port), the ACL users of redis-users.acl, the vhost, users, permissions
and policies of definitions.json (no guest, no ``/`` vhost). The certificates are
made once per test run by :func:`test_certificates` (``scripts/make-certs``'s
function); every URL a server gives is a TLS URL that verifies the server against
that CA. Each server's passwords are its own, set by the documented operator step
(``rabbitmqctl change_password``; Redis's ACL file written by ``scripts/redis-acl``'s
function). Only processes this module
started are ever signalled, tracked by PID *and* start time, so a recycled PID can
never be hit.

Fixtures (import them into a test module, nothing is registered in conftest)::

    from tests.servers import private_rabbit_fixture, private_redis_fixture  # noqa: F401

    async def test_x(private_redis: PrivateRedis, private_rabbit: PrivateRabbit) -> None: ...

The functions are named ``*_fixture`` and the fixtures ``private_redis`` and
``private_rabbit`` (``@pytest.fixture(name=...)``): importing a function named like
the test's parameter would be ruff's F811 (redefinition of an unused import).

* ``private_redis`` (function scope): a fresh ``PrivateRedis`` per test.
* ``private_rabbit`` (function scope handle, node shared per test module): a cold
  RabbitMQ boot costs several seconds, so one node serves every test of a module and
  is shut down when the module finishes; before each test it is started again if an
  earlier test left it killed or stopped, so one failing crash test cannot cascade.
  Queues and messages of earlier tests in the module remain: use unique names.

Every server is also registered with ``atexit``: even if a fixture's teardown never
runs (an interpreter shutting down on an error), nothing is left behind. Only a
SIGKILLed test process (or ``os._exit``, e.g. pytest-timeout's ``thread`` method)
can leave a server running: its files are under ``$TMPDIR/fedqtest-*``.

For a run on these servers under the shipped users (the end of this module):
:class:`Federation` runs an aggregator as :data:`AGGREGATOR` and one worker per bank
as that bank's broker user on a :func:`bank_task`; :func:`replay_as_auditor` runs
``fedq replay --verify`` as :data:`AUDITOR`; :func:`wait_until` polls its progress.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import json
import os
import random
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pandas as pd
import pytest
import redis
from click.testing import CliRunner
from redis.backoff import NoBackoff
from redis.retry import Retry

from aggregator.service import AggregatorService, ServiceConfig
from aggregator.store import RedisModelStore
from common.spec import TaskSpec
from common.tls import Certificates, make_certificates, write_redis_acl
from common.transport import Transport
from common.transport.amqp import AmqpTransport
from fedq.cli_audit import replay
from fedq.simulate import SimulationConfig, prepare
from participant.worker import ParticipantWorker, WorkerConfig
from tests.helpers import party_key, signed_identity

__all__ = [
    "AGGREGATOR",
    "AUDITOR",
    "BANKS",
    "BROKER_CONFIG",
    "Federation",
    "PrivateRabbit",
    "PrivateRedis",
    "ServerError",
    "ServerExitedError",
    "bank_task",
    "client_ssl_context",
    "free_port",
    "private_rabbit",
    "private_rabbit_fixture",
    "private_redis",
    "private_redis_fixture",
    "replay_as_auditor",
    "shipped_rabbitmq_conf",
    "shipped_redis_conf",
    "test_certificates",
    "wait_until",
]

ROOT = Path(__file__).resolve().parent.parent
BROKER_CONFIG = ROOT / "broker_config"
SHIPPED_REDIS_CONF = BROKER_CONFIG / "redis.conf"
SHIPPED_REDIS_USERS = BROKER_CONFIG / "redis-users.acl"
SHIPPED_RABBITMQ_CONF = BROKER_CONFIG / "rabbitmq.conf"
SHIPPED_DEFINITIONS = BROKER_CONFIG / "definitions.json"

# Ports of the shared services on this machine and of RabbitMQ's defaults (AMQP,
# distribution, management, epmd, the CLI tools' distribution range): never chosen.
_RESERVED_PORTS = frozenset(
    {1883, 2024, 3306, 4222, 4369, 5432, 5672, 6379, 15672, 25672, 61613, 15692}
    | set(range(35672, 35683))
)
_allocated_ports: set[int] = set()
_port_lock = threading.Lock()


class ServerError(RuntimeError):
    """A private server did not start, answer or stop as expected."""


class ServerExitedError(ServerError):
    """A private server exited during start-up (a taken port, a bad config, ...)."""


# --------------------------------------------------------------------- ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A free TCP port on 127.0.0.1, below the kernel's ephemeral range.

    Ports from the ephemeral range could be taken by some outgoing connection while a
    server is down between ``kill()`` and ``restart()``; ports below it are only ever
    taken by listeners. Picked at random so parallel test runs rarely collide, never
    one this process already handed out, never a port of the shared services.
    """
    hi = max(_ephemeral_low() - 1, 20001)
    with _port_lock:
        for _ in range(500):
            port = random.randint(20000, hi)
            if port in _RESERVED_PORTS or port in _allocated_ports:
                continue
            if _bindable(port):
                _allocated_ports.add(port)
                return port
    raise ServerError("no free TCP port found on 127.0.0.1")


# ----------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Proc:
    """One process, identified by PID and start time (a recycled PID is another one)."""

    pid: int
    start: int

    def alive(self) -> bool:
        info = _stat(self.pid)
        return info is not None and info.start == self.start and info.state != "Z"


@dataclass(frozen=True)
class _Stat:
    pid: int
    comm: str
    state: str
    ppid: int
    sid: int
    start: int


def _stat(pid: int) -> _Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # "pid (comm) state ppid pgrp session ..."; comm may contain spaces and parens.
    lpar, rpar = raw.index("("), raw.rindex(")")
    fields = raw[rpar + 2 :].split()
    return _Stat(
        pid=pid,
        comm=raw[lpar + 1 : rpar],
        state=fields[0],
        ppid=int(fields[1]),
        sid=int(fields[3]),
        start=int(fields[19]),
    )


def _all_stats() -> list[_Stat]:
    stats = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _stat(int(entry))
            if info is not None:
                stats.append(info)
    return stats


def _tree(root: int) -> list[_Stat]:
    """``root`` and all its live descendants (children that called setsid included)."""
    stats = _all_stats()
    children: dict[int, list[_Stat]] = {}
    by_pid = {s.pid: s for s in stats}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    out: list[_Stat] = []
    todo = [by_pid[root]] if root in by_pid else []
    while todo:
        s = todo.pop()
        out.append(s)
        todo.extend(children.get(s.pid, []))
    return out


def _signal(proc: _Proc, sig: signal.Signals) -> None:
    if proc.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def _wait_gone(procs: list[_Proc], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(p.alive() for p in procs):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of the TCP listeners on ``port`` (IPv4 and IPv6, any address)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN; field 9 the inode.
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def _listens(proc: _Proc, port: int) -> bool:
    """Whether ``proc`` itself holds a listening socket on ``port``.

    Proves that the server answering on the port is the process we started, not
    another one that took the port meanwhile.
    """
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not wanted or not proc.alive():
        return False
    fd_dir = Path(f"/proc/{proc.pid}/fd")
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        with contextlib.suppress(OSError):
            if os.readlink(fd_dir / name) in wanted:
                return True
    return False


# ------------------------------------------------------------- shipped configs


def _replace_lines(text: str, replacements: Mapping[str, str], sep: str) -> str:
    """``text`` with each line whose key is in ``replacements`` replaced, once each.

    The key of a line is what precedes ``sep`` (a space for redis.conf, `` = `` for
    rabbitmq.conf); comments are left alone. Every key must occur exactly once, so a
    shipped file that no longer sets it fails loudly instead of being half-copied.
    """
    seen: dict[str, int] = dict.fromkeys(replacements, 0)
    out = []
    for line in text.splitlines(keepends=True):
        key = line.split(sep, 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if key in replacements:
            seen[key] += 1
            out.append(replacements[key] + "\n")
        else:
            out.append(line)
    wrong = {k: n for k, n in seen.items() if n != 1}
    if wrong:
        raise ServerError(f"shipped config sets these keys not exactly once: {wrong}")
    return "".join(out)


_certificates: list[Certificates] = []
_certificates_lock = threading.Lock()


def test_certificates() -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost, and client certificates.

    Made once per test process (``scripts/make-certs``'s function) in a temporary
    directory removed at exit; clients: the aggregator, the auditor and the banks.
    """
    with _certificates_lock:
        if not _certificates:
            out = Path(tempfile.mkdtemp(prefix="fedqtest-tls-"))
            atexit.register(shutil.rmtree, out, ignore_errors=True)
            _certificates.append(
                make_certificates(
                    out, hosts=("127.0.0.1", "localhost"), clients=(AGGREGATOR, AUDITOR, *BANKS)
                )
            )
        return _certificates[0]


# Tell pytest this is not a test, though its name says so.
test_certificates.__test__ = False  # type: ignore[attr-defined]


def shipped_redis_conf(
    port: int, data_dir: Path, acl_file: Path, certs: Certificates | None = None
) -> str:
    """broker_config/redis.conf with only the TLS port and the directories changed.

    The directories: ``dir``, the ACL file and the TLS files (``certs``, by default
    :func:`test_certificates`).
    """
    certs = certs or test_certificates()
    return _replace_lines(
        SHIPPED_REDIS_CONF.read_text(encoding="utf-8"),
        {
            "tls-port": f"tls-port {port}",
            "dir": f'dir "{data_dir}"',
            "aclfile": f'aclfile "{acl_file}"',
            "tls-cert-file": f'tls-cert-file "{certs.server_cert}"',
            "tls-key-file": f'tls-key-file "{certs.server_key}"',
            "tls-ca-cert-file": f'tls-ca-cert-file "{certs.ca_cert}"',
        },
        " ",
    )


def shipped_rabbitmq_conf(
    port: int, definitions: Path = SHIPPED_DEFINITIONS, certs: Certificates | None = None
) -> str:
    """broker_config/rabbitmq.conf with only the AMQPS port and the paths changed.

    The paths: definitions.json and the TLS files (``certs``, by default
    :func:`test_certificates`).
    """
    certs = certs or test_certificates()
    return _replace_lines(
        SHIPPED_RABBITMQ_CONF.read_text(encoding="utf-8"),
        {
            "listeners.ssl.default": f"listeners.ssl.default = {port}",
            "definitions.local.path": f"definitions.local.path = {definitions}",
            "ssl_options.cacertfile": f"ssl_options.cacertfile = {certs.ca_cert}",
            "ssl_options.certfile": f"ssl_options.certfile   = {certs.server_cert}",
            "ssl_options.keyfile": f"ssl_options.keyfile    = {certs.server_key}",
        },
        "=",
    )


def client_ssl_context(
    certs: Certificates | None = None, client: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the private servers (and presents ``client``'s cert)."""
    certs = certs or test_certificates()
    context = ssl.create_default_context(cafile=str(certs.ca_cert))
    if client is not None:
        cert, key = certs.clients[client]
        context.load_cert_chain(str(cert), str(key))
    return context


_live_servers: set[_ServerProcess] = set()


class _ServerProcess:
    """A server run as a child process in its own session, with exact PID tracking."""

    name = "server"

    def __init__(self, base_dir: Path | None) -> None:
        self._owns_dir = base_dir is None
        self.dir = (
            Path(tempfile.mkdtemp(prefix=f"fedqtest-{self.name}-"))
            if base_dir is None
            else base_dir
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._popen: subprocess.Popen[bytes] | None = None
        self._leader: _Proc | None = None  # the Popen child; its PID is the session id
        self._out: Path = self.dir / "console.out"
        self.start_times: list[float] = []  # seconds from spawn to ready, per start
        self._closed = False

    # -- to be provided by subclasses
    def _argv(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def _main(self) -> _Proc | None:
        """The process that *is* the server (signalled by stop and kill)."""
        return self._leader

    def _probe(self) -> bool:
        """True once the server answers."""
        raise NotImplementedError

    def _after_ready(self, timeout: float) -> None:
        """Further readiness checks once the probe answers."""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's console output (for error messages)."""
        try:
            text = self._out.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- lifecycle
    @property
    def running(self) -> bool:
        """Whether the server process this object started is alive."""
        main = self._main()
        return main is not None and main.alive()

    @property
    def pid(self) -> int:
        """PID of the server process itself (beam.smp, redis-server)."""
        main = self._main()
        if main is None or not main.alive():
            raise ServerError(f"private {self.name} is not running")
        return main.pid

    def process_tree(self) -> list[int]:
        """PIDs of every live process of this server (session leader and descendants)."""
        if self._leader is None or not self._leader.alive():
            return []
        return [s.pid for s in _tree(self._leader.pid)]

    def _repick_ports(self) -> bool:
        """Choose new ports after a failed first start; False if the ports were given."""
        return False

    def start(self, timeout: float = 90.0) -> None:
        """Spawn the server and wait until it answers; raises ServerError otherwise.

        The first start retries on new ports if the server dies during start-up (a
        port taken by someone else between choosing and binding it); later starts
        keep the port, as restarts must.
        """
        attempts = 3 if not self.start_times else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return
            except ServerExitedError:
                if attempt + 1 == attempts or not self._repick_ports():
                    raise

    def _start_once(self, timeout: float) -> None:
        if self._closed:
            raise ServerError(f"private {self.name} is closed")
        if self._popen is not None:
            raise ServerError(f"private {self.name} is already running; use restart()")
        t0 = time.monotonic()
        with self._out.open("ab") as out:
            self._popen = subprocess.Popen(
                self._argv(),
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session: no Ctrl-C from the terminal; killpg target
            )
        info = _stat(self._popen.pid)
        self._leader = _Proc(self._popen.pid, info.start if info else 0)
        _live_servers.add(self)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self._terminate(graceful=False)
            raise
        self.start_times.append(time.monotonic() - t0)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll until the server answers; raise ServerError if it died or timed out."""
        deadline = time.monotonic() + timeout
        while self._leader_exited() or not self._probe():
            if self._leader_exited():
                raise ServerExitedError(
                    f"private {self.name} exited during start-up; output:\n{self.log_tail()}"
                )
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"private {self.name} not ready after {timeout:.0f}s; output:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.1)
        self._after_ready(max(deadline - time.monotonic(), 1.0))

    def _leader_exited(self) -> bool:
        """Whether the spawned process has exited, *without* reaping it.

        Reaping happens only in ``_terminate``, after the last ``killpg``: until then
        the session id (the leader's PID) cannot be recycled by the kernel.
        """
        if self._popen is None:
            return True
        if self._popen.returncode is not None:
            return True
        try:
            result = os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return result is not None

    def stop(self, timeout: float = 60.0) -> None:
        """Graceful shutdown (SIGTERM to the server process), waiting for it to exit."""
        self._terminate(graceful=True, timeout=timeout)

    def kill(self) -> None:
        """Crash the server: SIGKILL to the server process, then reap what it leaves."""
        self._terminate(graceful=False)

    def restart(self, *, hard: bool = False, timeout: float = 90.0) -> None:
        """Stop (or with ``hard``, kill) if running, then start on the same port and data."""
        if self._popen is not None:
            self._terminate(graceful=not hard)
        self.start(timeout)

    def ensure_running(self, timeout: float = 90.0) -> None:
        """Start the server again if it was stopped or killed (or died)."""
        if not self.running:
            self.restart(hard=True, timeout=timeout)

    async def astart(self) -> None:
        """``start()`` in a worker thread, so an event loop keeps running meanwhile."""
        await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """``stop()`` in a worker thread."""
        await asyncio.to_thread(self.stop)

    async def akill(self) -> None:
        """``kill()`` in a worker thread."""
        await asyncio.to_thread(self.kill)

    async def arestart(self, *, hard: bool = False) -> None:
        """``restart()`` in a worker thread."""
        await asyncio.to_thread(functools.partial(self.restart, hard=hard))

    def _terminate(self, *, graceful: bool, timeout: float = 60.0) -> None:
        popen, leader = self._popen, self._leader
        if popen is None or leader is None:
            return
        main = self._main() or leader
        # Everything this server runs now, by PID and start time: the beam's
        # erl_child_setup calls setsid, so the session alone would miss it.
        tree = [_Proc(s.pid, s.start) for s in _tree(leader.pid)] if leader.alive() else []
        if graceful:
            _signal(main, signal.SIGTERM)
            if not _wait_gone([main], timeout):
                _signal(main, signal.SIGKILL)
        else:
            _signal(main, signal.SIGKILL)
        _wait_gone([main], 10.0)
        # Helpers exit on their own once the server is gone; give them a moment,
        # then kill what is left. The leader is not reaped yet, so the session id
        # is still ours and no PID in `tree` can have been recycled.
        if not _wait_gone(tree, 5.0 if graceful else 2.0):
            for proc in tree:
                _signal(proc, signal.SIGKILL)
            _wait_gone(tree, 5.0)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(leader.pid, signal.SIGKILL)  # a late fork, if any
        try:
            popen.wait(timeout=10.0)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        self._popen = None
        self._leader = None
        self._on_exit()

    def _on_exit(self) -> None:
        """Hook after the process is gone."""

    def close(self) -> None:
        """Stop the server (kill it if it does not stop) and remove its files."""
        if self._closed:
            return
        try:
            try:
                self._terminate(graceful=True, timeout=30.0)
            finally:
                self._terminate(graceful=False)
        finally:
            self._closed = True
            _live_servers.discard(self)
            if self._owns_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self._popen is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    """Backstop: no private server outlives the interpreter that started it."""
    for server in list(_live_servers):
        with contextlib.suppress(Exception):
            server._terminate(graceful=False)
        with contextlib.suppress(Exception):
            server.close()


# --------------------------------------------------------------------- Redis


class PrivateRedis(_ServerProcess):
    """A ``redis-server`` of our own, running the shipped broker_config/redis.conf.

    The config file is a copy of the shipped one with only the TLS port (``tls-port``;
    ``port 0``: no plaintext port) and the directories (``dir``, ``aclfile``, the TLS
    files) changed; everything else, ``appendfsync always`` included, is what users
    deploy (``logfile ""`` sends the log to our captured stdout). The ACL file is
    written as the operator does (broker_config/README.md): the users of the shipped
    redis-users.acl, each with a password of this server's own. Clients therefore
    authenticate over TLS: :attr:`url` is the aggregator's (``fedq-aggregator``),
    :meth:`url_for` any other user's, :meth:`tls_kwargs` the TLS settings of a client.
    Restarts reuse the same port, data directory and passwords.
    """

    name = "redis"
    #: The user :attr:`url` and :meth:`client` log in as.
    user = "fedq-aggregator"

    def __init__(self, *, port: int | None = None, base_dir: Path | None = None) -> None:
        super().__init__(base_dir)
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise ServerError("redis-server not found (apt-get install redis-server)")
        self.binary = binary
        self._auto_port = port is None
        self.port = port if port is not None else free_port()
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.logfile = self._out  # the shipped file logs to stdout
        self.config_file = self.dir / "redis.conf"
        self.certs = test_certificates()
        #: The users that log in with a password, each with this server's own.
        self.passwords = {user: f"{user}-{secrets.token_hex(8)}" for user in (AGGREGATOR, AUDITOR)}
        # The operator step: the ACL file, from the shipped template (scripts/redis-acl).
        self.acl_file = self.dir / "acl" / "users.acl"
        write_redis_acl(SHIPPED_REDIS_USERS, self.acl_file, self.passwords)
        self._write_config()

    def _repick_ports(self) -> bool:
        if not self._auto_port:
            return False
        self.port = free_port()
        self._write_config()
        return True

    def _write_config(self) -> None:
        self.config_file.write_text(
            shipped_redis_conf(self.port, self.data_dir, self.acl_file, self.certs)
        )

    def url_for(self, user: str) -> str:
        """``rediss://USER:PASSWORD@127.0.0.1:PORT/0?ssl_ca_certs=CA``: TLS, server verified."""
        return (
            f"rediss://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/0"
            f"?ssl_ca_certs={self.certs.ca_cert}"
        )

    @property
    def url(self) -> str:
        """The aggregator's URL: rediss://fedq-aggregator:PASSWORD@127.0.0.1:PORT/0?..."""
        return self.url_for(self.user)

    def tls_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments for TLS to this server, verifying it against the CA."""
        return {"ssl": True, "ssl_ca_certs": str(self.certs.ca_cert)}

    def client(self, user: str | None = None) -> redis.Redis:
        """A sync client as ``user`` (default the aggregator); close it, or use ``with``."""
        name = user or self.user
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            username=name,
            password=self.passwords[name],
            socket_timeout=5.0,
            **self.tls_kwargs(),
        )

    def _argv(self) -> list[str]:
        return [self.binary, str(self.config_file)]

    def _probe(self) -> bool:
        # Our own process listens on the port (not some other server that took it)...
        if self._leader is None or not _listens(self._leader, self.port):
            return False
        # ...and has finished loading its AOF: an authenticated read answers LOADING
        # until then (INFO would say so too, but it is @dangerous: refused to every
        # user of the shipped file).
        try:
            with redis.Redis(
                host="127.0.0.1",
                port=self.port,
                username=self.user,
                password=self.passwords[self.user],
                socket_connect_timeout=1.0,
                socket_timeout=1.0,
                retry=Retry(NoBackoff(), 0),
                **self.tls_kwargs(),
            ) as c:
                c.get("fedq:readiness-probe")
        except redis.RedisError:
            return False
        return True


# ------------------------------------------------------------------ RabbitMQ


def _rabbit_sbin() -> Path:
    """The directory of RabbitMQ's own scripts (not Debian's su-to-rabbitmq wrappers).

    /usr/sbin/rabbitmq-server on Debian switches to the ``rabbitmq`` user when run as
    root (losing our environment and our temp dir's permissions); the scripts it
    wraps run as whoever calls them.
    """
    override = os.environ.get("FEDQ_TEST_RABBITMQ_SBIN")
    candidates = [Path(override)] if override else []
    candidates.append(Path("/usr/lib/rabbitmq/bin"))
    candidates.extend(sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin")))
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for d in candidates:
        # Debian's /usr/sbin wrappers have no rabbitmq-env beside them.
        if (d / "rabbitmq-server").exists() and (d / "rabbitmq-env").exists():
            return d
    raise ServerError("RabbitMQ server scripts not found (apt-get install rabbitmq-server)")


def _amqp_handshake(port: int, certs: Certificates | None = None) -> bool:
    """True when an AMQP 0-9-1 listener over TLS on the port answers the protocol header."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1.0) as raw,
            client_ssl_context(certs).wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(b"AMQP\x00\x00\x09\x01")
            frame = s.recv(7)
    except OSError:
        return False
    return len(frame) == 7 and frame[0] == 1  # a method frame: connection.start


class PrivateRabbit(_ServerProcess):
    """A second RabbitMQ node of our own, isolated from the shared ``rabbit@localhost``.

    Runs the shipped broker_config/rabbitmq.conf, copied with only the AMQPS port
    (``listeners.ssl.default``; ``listeners.tcp = none``: no plaintext port) and the
    paths of definitions.json (the repository's) and of the TLS files
    (:func:`test_certificates`) changed: vhost ``fedq``, the shipped users, permissions,
    exchanges and policies, no guest. Once the node first boots, every user of
    definitions.json gets a password of this node's own with ``rabbitmqctl
    change_password`` (the operator step of broker_config/README.md);
    ``definitions.skip_if_unchanged`` keeps them across restarts. :meth:`url_for`
    gives a user's ``amqps://`` URL on vhost ``fedq`` (the server verified against the
    CA); :attr:`url` is ``fedq-admin``'s.

    Own node name (``fedqtest-<hex>@localhost``), AMQP port, distribution port,
    Mnesia/quorum/log directories, pid file, config file, empty plugin list (no
    management listener, so no 15672 clash), empty rabbitmq-env.conf (the shared
    /etc/rabbitmq/rabbitmq-env.conf names the shared node) and its own ``$HOME``
    holding its own Erlang cookie, so neither node nor the CLI tools can ever reach
    the shared node. It registers with the machine's epmd (4369), which is shared by
    design.

    Runs the package's own ``rabbitmq-server`` script as a child in a new session;
    the script forks the VM (``beam.smp``), which ``stop()`` (SIGTERM, RabbitMQ's
    graceful shutdown) and ``kill()`` (SIGKILL) signal by exact PID.
    """

    name = "rabbit"

    def __init__(
        self,
        *,
        port: int | None = None,
        dist_port: int | None = None,
        base_dir: Path | None = None,
        extra_config: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_dir)
        self.sbin = _rabbit_sbin()
        self._auto_ports = port is None and dist_port is None
        self.port = port if port is not None else free_port()
        self.dist_port = dist_port if dist_port is not None else free_port()
        self._extra_config = dict(extra_config or {})
        self.certs = test_certificates()
        definitions = json.loads(SHIPPED_DEFINITIONS.read_text(encoding="utf-8"))
        #: Every user of definitions.json, with the password this node gives it.
        self.passwords = {
            str(u["name"]): f"{u['name']}-{secrets.token_hex(8)}" for u in definitions["users"]
        }
        self.vhost = str(definitions["vhosts"][0]["name"])
        self.nodename = f"fedqtest-{secrets.token_hex(4)}@localhost"
        self.home = self.dir / "home"
        self.mnesia_base = self.dir / "mnesia"
        self.log_base = self.dir / "log"
        for d in (self.home, self.mnesia_base, self.log_base):
            d.mkdir(exist_ok=True)
        self.pid_file = self.dir / "rabbit.pid"
        cookie = self.home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        self.config_file = self.dir / "rabbitmq.conf"
        self._write_config()
        self.plugins_file = self.dir / "enabled_plugins"
        self.plugins_file.write_text("[].\n")
        self.env_file = self.dir / "rabbitmq-env.conf"
        self.env_file.write_text("# private test node: nothing from /etc/rabbitmq\n")
        self._beam: _Proc | None = None

    def _repick_ports(self) -> bool:
        if not self._auto_ports:
            return False
        self.port, self.dist_port = free_port(), free_port()
        self._write_config()
        return True

    def _write_config(self) -> None:
        text = shipped_rabbitmq_conf(self.port, certs=self.certs)
        if self._extra_config:  # not the shipped configuration any more: tests that say so
            text += "".join(f"{k} = {v}\n" for k, v in self._extra_config.items())
        self.config_file.write_text(text)

    def url_for(self, user: str) -> str:
        """``amqps://USER:PASSWORD@127.0.0.1:PORT/fedq?cafile=CA``, a user of definitions.json."""
        return (
            f"amqps://{user}:{self.passwords[user]}@127.0.0.1:{self.port}/{self.vhost}"
            f"?cafile={self.certs.ca_cert}"
        )

    @property
    def url(self) -> str:
        """``fedq-admin``'s URL (full rights on vhost ``fedq``), for generic broker tests."""
        return self.url_for("fedq-admin")

    @property
    def logfile(self) -> Path:
        """The node's log file."""
        return self.log_base / f"{self.nodename}.log"

    def log_tail(self, lines: int = 40) -> str:
        parts = [super().log_tail(lines)]
        with contextlib.suppress(OSError):
            parts.append("\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(p for p in parts if p)

    def _env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("RABBITMQ_") and k not in {"ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS"}
        }
        env.update(
            {
                "HOME": str(self.home),  # the cookie: $HOME/.erlang.cookie
                "LANG": env.get("LANG") or "C.UTF-8",
                "RABBITMQ_NODENAME": self.nodename,
                # No RABBITMQ_NODE_PORT / _IP_ADDRESS: they would open a plaintext
                # listener that the shipped file turns off (listeners.tcp = none).
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONF_ENV_FILE": str(self.env_file),
                "RABBITMQ_CONFIG_FILE": str(self.config_file),
                "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.plugins_file),
                "RABBITMQ_PLUGINS_EXPAND_DIR": str(self.mnesia_base / "plugins-expand"),
                "RABBITMQ_MNESIA_BASE": str(self.mnesia_base),
                "RABBITMQ_MNESIA_DIR": str(self.mnesia_base / self.nodename),
                "RABBITMQ_LOG_BASE": str(self.log_base),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": (
                    "-kernel inet_dist_use_interface {127,0,0,1}"
                ),
            }
        )
        env.setdefault("ERL_EPMD_ADDRESS", "127.0.0.1")
        return env

    def _argv(self) -> list[str]:
        return [str(self.sbin / "rabbitmq-server")]

    def _find_beam(self) -> _Proc | None:
        if self._beam is not None and self._beam.alive():
            return self._beam
        if self._leader is None or not self._leader.alive():
            return None
        for s in _tree(self._leader.pid):
            if s.comm == "beam.smp":
                self._beam = _Proc(s.pid, s.start)
                return self._beam
        return None

    def _main(self) -> _Proc | None:
        return self._find_beam()

    def _probe(self) -> bool:
        beam = self._find_beam()
        return (
            beam is not None
            and _listens(beam, self.port)
            and _amqp_handshake(self.port, self.certs)
        )

    def _after_ready(self, timeout: float) -> None:
        # The AMQP listener opens late in the boot; await_startup confirms the rest.
        result = self.cli("rabbitmqctl", "await_startup", timeout=timeout)
        if result.returncode != 0:
            error = ServerExitedError if self._leader_exited() else ServerError
            raise error(
                f"rabbitmqctl await_startup failed for {self.nodename}:\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        if not self.start_times:
            self._set_passwords()

    def _set_passwords(self) -> None:
        """Give every user of definitions.json its password (they ship without one)."""
        for user, password in self.passwords.items():
            result = self.cli("rabbitmqctl", "change_password", user, password)
            if result.returncode != 0:
                raise ServerError(
                    f"rabbitmqctl change_password {user} failed on {self.nodename}:\n"
                    f"{result.stdout}{result.stderr}"
                )

    def _on_exit(self) -> None:
        self._beam = None

    def sync_quorum_directory(self) -> None:
        """Flush the node's Ra directory (DETS) to disk before a ``kill()``.

        RabbitMQ 3.10 (Ra 2.2) records which Ra server backs each quorum queue in a
        DETS table saved about every 500 ms; only later Ra versions sync it on every
        change (rabbitmq/ra#443). A node SIGKILLed within that window of declaring a
        quorum queue comes back with the queue's member started afresh under a new
        id: term 0, no leader ever, its confirmed messages orphaned on disk. Call
        this after declaring quorum queues and before a deliberate crash (or wait a
        second); it changes nothing else.
        """
        result = self.cli("rabbitmqctl", "eval", "[dets:sync(T) || T <- dets:all()].")
        if result.returncode != 0:
            raise ServerError(f"dets:sync on {self.nodename} failed: {result.stderr}")

    def cli(self, tool: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run a RabbitMQ CLI tool (``rabbitmqctl``, ``rabbitmq-diagnostics``, ...) on this node.

        Uses this node's cookie (via ``$HOME``); never reaches the shared node.
        """
        try:
            return subprocess.run(
                [str(self.sbin / tool), "-q", "-n", self.nodename, "-t", str(int(timeout)), *args],
                env=self._env(),
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout + 15.0,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ServerError(f"{tool} {' '.join(args)} timed out on {self.nodename}") from e


# ------------------------------------------------------------------ fixtures


@pytest.fixture(name="private_redis")
def private_redis_fixture() -> Iterator[PrivateRedis]:
    """A started private Redis for one test; killed and removed afterwards."""
    server = PrivateRedis()
    try:
        server.start()
        yield server
    finally:
        server.close()


_module_rabbits: dict[str, PrivateRabbit] = {}


def _close_module_rabbit(key: str) -> None:
    node = _module_rabbits.pop(key, None)
    if node is not None:
        node.close()


@pytest.fixture(name="private_rabbit")
def private_rabbit_fixture(request: pytest.FixtureRequest) -> PrivateRabbit:
    """A started private RabbitMQ node, shared by the tests of one module.

    Started on first use in a module and closed when the module is torn down (a
    finalizer on the module's node, so a plain function-scoped import suffices);
    before every test it is started again if an earlier test left it killed or
    stopped.
    """
    module = request.node.getparent(pytest.Module)
    if module is None:
        raise ServerError("private_rabbit is for tests in a module")
    key = module.nodeid
    node = _module_rabbits.get(key)
    if node is None:
        node = PrivateRabbit()
        _module_rabbits[key] = node
        module.addfinalizer(functools.partial(_close_module_rabbit, key))
        node.start()
    else:
        node.ensure_running()
    return node


# Aliases, so `from tests.servers import private_redis, private_rabbit` also works;
# but every test taking a parameter of the imported name is then ruff's F811
# (redefinition of an unused import): import the *_fixture names instead.
private_redis = private_redis_fixture
private_rabbit = private_rabbit_fixture


# ------------------------------------------------- a federation on the private servers

AGGREGATOR = "fedq-aggregator"
AUDITOR = "fedq-auditor"
#: Broker users of definitions.json: participant ids must be broker user names.
BANKS = ("bank-a", "bank-b")


async def wait_until(cond: Callable[[], Awaitable[bool]], seconds: float = 90.0) -> None:
    """Await an async condition (a federation's progress) every 0.1 s until it holds."""
    async with asyncio.timeout(seconds):
        while not await cond():
            await asyncio.sleep(0.1)


def bank_task(banks: tuple[str, ...] = BANKS) -> tuple[TaskSpec, dict[str, pd.DataFrame]]:
    """A simulation task whose participants are the shipped bank users, with their shards."""
    prep = prepare(SimulationConfig(participants=len(banks)))
    shards = {
        bank: prep.shards[name] for name, bank in zip(prep.spec.participants, banks, strict=True)
    }
    spec = TaskSpec.model_validate(
        {
            **prep.spec.model_dump(by_alias=True),
            "participants": banks,
            "declared_samples": {bank: len(shard) for bank, shard in shards.items()},
            "async": {**prep.spec.async_.model_dump(), "max_staleness": 1000},
            # Signed as in production: tests.helpers.party_key gives each party its key.
            "identity": signed_identity(banks, AGGREGATOR).model_dump(),
        }
    )
    return spec, shards


class Federation:
    """An aggregator and one worker per bank, each with its own broker credentials."""

    def __init__(self, spec: TaskSpec, store: RedisModelStore, rabbit: PrivateRabbit) -> None:
        self.spec, self.store, self.rabbit = spec, store, rabbit
        self.task = spec.task_id
        self.stop, self.bank_stop = asyncio.Event(), asyncio.Event()
        self.tasks: list[asyncio.Task[object]] = []
        self.workers: list[ParticipantWorker] = []
        self.service: AggregatorService | None = None

    async def start(self, shards: Mapping[str, pd.DataFrame]) -> None:
        agg: Transport = await AmqpTransport.connect(
            self.rabbit.url_for(AGGREGATOR), name="restart-aggregator"
        )
        # require_sender_match stays True: the banks publish with their own user_id.
        self.service = AggregatorService(
            self.spec,
            self.store,
            agg,
            ServiceConfig(lease_ttl_s=5, signing_key=party_key(AGGREGATOR)),
        )
        self.tasks.append(asyncio.create_task(_run(self.service, self.stop)))
        async with asyncio.timeout(30):
            await self.service.ready.wait()
        for i, name in enumerate(self.spec.participants):
            t = await AmqpTransport.connect(self.rabbit.url_for(name), name=f"restart-{name}")
            w = ParticipantWorker(
                self.spec,
                WorkerConfig(
                    participant=name,
                    seed=i,
                    delay_s=0.05,
                    wait_for_model_s=0.5,
                    signing_key=party_key(name),
                ),
                t,
                shards[name],
            )
            self.workers.append(w)
            self.tasks.append(asyncio.create_task(_work(w, self.bank_stop)))

    @property
    def aggregator(self) -> AggregatorService:
        assert self.service is not None
        return self.service

    def published(self) -> list[str]:
        """Update ids the broker confirmed to the banks so far."""
        return [uid for w in self.workers for uid in w.stats.published_ids]

    async def head_at_least(self, n: int) -> bool:
        return (await self.store.head(self.task) or 0) >= n

    async def wind_down(self) -> None:
        """Stop the banks, let the aggregator settle every update they sent, then stop it."""
        self.bank_stop.set()
        await asyncio.gather(*self.tasks[1:])
        async with asyncio.timeout(60):
            while await self._unsettled():
                await asyncio.sleep(0.2)
        self.stop.set()
        await self.tasks[0]

    async def _unsettled(self) -> set[str]:
        """Confirmed update ids neither applied nor refused (yet)."""
        confirmed = self.published()
        applied = await self.store.applied_in(self.task, confirmed)
        return set(confirmed) - set(applied) - await self._refused()

    async def _refused(self) -> set[str]:
        return {
            d["update_id"]
            for d in await self.store.decisions(self.task)
            if d["decision"] == "refused" and "update_id" in d
        }

    async def accounted(self) -> int:
        """Every confirmed update applied exactly once or refused; the chain verifies."""
        head = await self.store.head(self.task)
        assert head is not None
        applied: list[str] = []
        for v in range(1, head + 1):
            record = await self.store.get_version(self.task, v)
            assert record.parent == v - 1
            applied += [e.update_id for e in record.lineage]
        assert len(applied) == len(set(applied))
        confirmed = set(self.published())
        assert confirmed, "the banks published nothing"
        assert all(w.stats.published > 0 for w in self.workers)
        missing = confirmed - set(applied) - await self._refused()
        assert not missing, f"{len(missing)} confirmed updates neither applied nor refused"
        assert (await self.store.verify_chain(self.task)).ok
        return head

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for w in self.workers:
            await w.transport.close()
        if self.service is not None:
            await self.service.transport.close()
        await self.store.close()


async def _run(service: AggregatorService, stop: asyncio.Event) -> object:
    await service.run(stop)
    return None


async def _work(worker: ParticipantWorker, stop: asyncio.Event) -> object:
    return await worker.run(stop)


def replay_as_auditor(rabbit: PrivateRabbit, redis: PrivateRedis, task: str) -> dict[str, Any]:
    """``fedq replay --verify --json`` with the auditor's read-only credentials."""
    result = CliRunner().invoke(
        replay,
        [
            "--task",
            task,
            "--verify",
            "--json",
            "--amqp-url",
            rabbit.url_for(AUDITOR),
            "--redis-url",
            redis.url_for(AUDITOR),
        ],
    )
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    report: dict[str, Any] = json.loads(result.stdout)
    assert report["ok"] is True, report
    return report
