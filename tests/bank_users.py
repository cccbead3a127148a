"""Broker users for banks on the shared RabbitMQ: one user per bank, as in production.

``fedq simulate`` on a real broker runs each bank as its own broker user with the
sender check on, so tests that simulate on the shared broker first give it users
``bank-01``, ``bank-02``, ... with the permissions broker_config/definitions.json gives
a bank (nothing to configure, write only ``fedq.updates`` under its own routing key,
read only the tasks' model streams and its own receipt queues), on the vhost of
:data:`AMQP_URL`. One ``rabbitmqctl import_definitions`` per test process; users
already there are reset to the same password, so a run never depends on an earlier one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from urllib.parse import quote, urlsplit

from tests.helpers import AMQP_URL

#: The password every test bank user gets on the shared broker (tests only).
PASSWORD = "fedq-test-bank"
_lock = threading.Lock()
_created: set[str] = set()


def _vhost() -> str:
    path = urlsplit(AMQP_URL).path
    return "/" if path in ("", "/") else path.lstrip("/")


def _password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def _definitions(names: list[str]) -> dict[str, object]:
    vhost = _vhost()
    return {
        "users": [
            {
                "name": n,
                "password_hash": _password_hash(PASSWORD),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }
            for n in names
        ],
        "permissions": [
            {
                "user": n,
                "vhost": vhost,
                "configure": "^$",
                "write": "^fedq\\.updates$",
                "read": f"^fedq\\.(model\\.[^.]+|receipt\\.[^.]+\\.{n})$",
            }
            for n in names
        ],
        "topic_permissions": [
            {
                "user": n,
                "vhost": vhost,
                "exchange": "fedq.updates",
                "write": f"^update\\.[^.]+\\.{n}$",
                "read": "^$",
            }
            for n in names
        ],
    }


def shared_bank_urls(count: int) -> dict[str, str]:
    """``{bank-01: amqp://bank-01:...@host/vhost, ...}``: ``count`` banks on the shared broker."""
    names = [f"bank-{i + 1:02d}" for i in range(count)]
    with _lock:
        missing = [n for n in names if n not in _created]
        if missing:
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
                json.dump(_definitions(missing), f)
            os.chmod(f.name, 0o644)  # the broker (its own OS user) reads the file
            try:
                # The shared broker's CLI needs its Erlang cookie: root's, as .ci/run starts it.
                sudo = ["sudo", "-n"] if os.geteuid() != 0 and shutil.which("sudo") else []
                done = subprocess.run(
                    [*sudo, "rabbitmqctl", "import_definitions", f.name],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
            finally:
                os.unlink(f.name)
            if done.returncode != 0:
                raise RuntimeError(f"rabbitmqctl import_definitions failed: {done.stderr}")
            _created.update(missing)
    parts = urlsplit(AMQP_URL)
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    vhost = quote(_vhost(), safe="")
    return {n: f"amqp://{n}:{PASSWORD}@{host}{port}/{vhost}" for n in names}
