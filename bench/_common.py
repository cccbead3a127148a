"""Helpers shared by the benchmarks: machine facts, tables, JSON output, clean-up.

The benchmarks run as scripts (``python bench/NAME.py``), so this module is
imported as ``_common`` from the script's own folder.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU model, cores, RAM, OS and the versions that matter, for the report."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("torch", "aio_pika", "redis", "msgpack", "zstandard", "flwr", "ray"):
        try:
            versions[mod] = str(__import__(mod).__version__)
        except Exception:  # noqa: BLE001, S112 - optional packages
            continue
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "os": f"{platform.system()} {platform.release()}",
        "load_avg_at_start": os.getloadavg(),
        "versions": versions,
    }


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def git_revision() -> str:
    """The commit the benchmark ran on, with ``+dirty`` when the tree has changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def envelope(name: str, quick: bool, figures: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON document every benchmark writes."""
    return {
        "benchmark": name,
        "date": now_iso(),
        "git": git_revision(),
        "command": command_line(),
        "quick": quick,
        "machine": machine(),
        **extra,
        "figures": figures,
    }


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table (also valid Markdown)."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v == 0:
                return "0"
            if abs(v) >= 100:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            if abs(v) >= 0.01:
                return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
            return f"{v:.2e}"
        return str(v)

    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = []
    if title:
        lines.append(f"\n{title}")
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("| " + " | ".join("-" * w for w in widths) + " |")
    for r in cells:
        lines.append("| " + " | ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's current resident set (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...`` then ``t[0]`` holds the elapsed seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


async def delete_queues(amqp_url: str, names: Sequence[str]) -> None:
    """Delete the queues this benchmark declared (the broker is shared)."""
    import aio_pika

    conn = await aio_pika.connect_robust(amqp_url)
    try:
        ch = await conn.channel()
        for name in names:
            try:
                await ch.queue_delete(name)
            except Exception as e:  # noqa: BLE001 - already gone is fine
                print(f"   (queue {name} not deleted: {type(e).__name__})")
                ch = await conn.channel()  # an error closes the channel
        if not ch.is_closed:
            await ch.close()
    finally:
        await conn.close()


async def delete_redis_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix:`` (each run uses its own prefix)."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(redis_url)
    n = 0
    try:
        batch: list[bytes] = []
        async for key in r.scan_iter(match=f"{prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                n += await r.delete(*batch)
                batch.clear()
        if batch:
            n += await r.delete(*batch)
    finally:
        await r.aclose()
    return n


#: The password of the per-bank broker users on the shared test broker: the one
#: tests/bank_users.py gives them (bank-01, ... are shared with the tests, so it must
#: stay the same or a test process that created them earlier could not log in).
BANK_PASSWORD = "fedq-test-bank"  # noqa: S105 - a test broker's, as in tests/


def _rabbitmqctl(*args: str, timeout: float = 120.0) -> Any:
    import shutil
    import subprocess

    # The shared broker's CLI needs its Erlang cookie: root's (sudo where not root).
    sudo = ["sudo", "-n"] if os.geteuid() != 0 and shutil.which("sudo") else []
    return subprocess.run(  # noqa: S603 - fixed arguments
        [*sudo, "rabbitmqctl", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def broker_users() -> set[str]:
    """The user names the broker has (``rabbitmqctl list_users``)."""
    done = _rabbitmqctl("list_users", "--quiet", "--formatter", "json")
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl list_users failed: {done.stderr.strip()}")
    return {u["user"] for u in json.loads(done.stdout or "[]")}


def ensure_bank_users(amqp_url: str, names: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Broker users for banks, as tests/bank_users.py makes them: one per bank name,
    password :data:`BANK_PASSWORD`, a bank's permissions (broker_config/definitions.json:
    configure nothing, write only ``fedq.updates`` under its own routing key, read the
    model streams and its own receipt queues). Returns each bank's AMQP URL and the
    names that did not exist before (for :func:`delete_broker_users`)."""
    import base64
    import hashlib
    import tempfile
    from urllib.parse import quote, urlsplit

    parts = urlsplit(amqp_url)
    vhost = "/" if parts.path in ("", "/") else parts.path.lstrip("/")
    created = [n for n in names if n not in broker_users()]

    def password_hash() -> str:
        salt = os.urandom(4)
        digest = hashlib.sha256(salt + BANK_PASSWORD.encode()).digest()
        return base64.b64encode(salt + digest).decode()

    doc = {
        "users": [
            {
                "name": n,
                "password_hash": password_hash(),
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
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(doc, f)
    os.chmod(f.name, 0o644)  # the broker (its own OS user) reads the file
    try:
        done = _rabbitmqctl("import_definitions", f.name)
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl import_definitions failed: {done.stderr.strip()}")
    host = parts.hostname or "127.0.0.1"
    port = f":{parts.port}" if parts.port else ""
    path = quote(vhost, safe="")
    urls = {n: f"amqp://{n}:{BANK_PASSWORD}@{host}{port}/{path}" for n in names}
    return urls, created


def delete_broker_users(names: Sequence[str]) -> None:
    """Delete broker users this benchmark created (never ones that were there before)."""
    for n in names:
        done = _rabbitmqctl("delete_user", n)
        if done.returncode != 0:
            print(f"   (broker user {n} not deleted: {done.stderr.strip()})")
