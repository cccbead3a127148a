"""compose.yaml and the Dockerfile, tested without a container engine.

No container engine runs on these machines, so the image and the stack are tested
through what they are made of:

* The Dockerfile installs through scripts/bootstrap.sh only, the script CI runs
  (scripts/test sources it), and :func:`test_dockerfile_install_step_runs` runs its
  install step, with the Dockerfile's own settings, into a fresh virtual environment
  from a copy of the build context that .dockerignore filters as ``docker build`` does.
* :func:`test_compose_stack_runs` parses compose.yaml and runs each service's command
  line as a real process: RabbitMQ and Redis from the same config files
  (tests/servers.py: only ports and directories changed), the aggregator, its standby
  and the three banks with the image's entry point, command and environment, and
  Prometheus (Debian's ``prometheus``) with monitoring/prometheus.yml. The mapping
  from containers to this host is all that changes: service host names become
  127.0.0.1 with each service's own ports, container paths become the files an
  operator makes (compose.yaml's header: certificates, passwords, keys, spec, data)
  in a temporary project directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from aggregator.store import RedisModelStore, connect_redis
from aggregator.store.records import VersionRecord
from tests.servers import (
    AGGREGATOR,
    AUDITOR,
    PrivateRabbit,
    PrivateRedis,
    free_port,
    private_rabbit_fixture,  # noqa: F401
    private_redis_fixture,  # noqa: F401
    test_certificates,
)

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BOOTSTRAP = ROOT / "scripts" / "bootstrap.sh"
DATA = ROOT / "fedq" / "data" / "german_credit.csv"

FEDQ_SERVICES = ("aggregator", "aggregator-standby", "bank-1", "bank-2", "bank-3")
SERVICES = ("rabbitmq", "redis", *FEDQ_SERVICES, "prometheus", "grafana")
BANK_SERVICES = {"bank-1": "bank-a", "bank-2": "bank-b", "bank-3": "bank-c"}
#: What the images other than ours run (their ENTRYPOINT), and this machine's program.
IMAGE_PROGRAMS = {"prom/prometheus": "prometheus"}
#: The ports the servers' images listen on: RabbitMQ's AMQPS, Redis's TLS port.
SERVER_PORTS = {"rabbitmq": 5671, "redis": 6379}


# ------------------------------------------------------------------ Dockerfile


@dataclass
class Step:
    """One RUN of a Dockerfile, with the environment and directory it runs in."""

    command: list[str]
    env: dict[str, str]
    workdir: str


@dataclass
class Dockerfile:
    """The instructions of a single-stage Dockerfile that these tests rely on."""

    base: str = ""
    env: dict[str, str] = field(default_factory=dict)
    runs: list[Step] = field(default_factory=list)
    copies: list[tuple[str, str]] = field(default_factory=list)
    user: str = "root"
    workdir: str = "/"
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    healthcheck: list[str] = field(default_factory=list)


def _instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical = ""
    for line in text.splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if logical and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        name, _, args = logical.strip().partition(" ")
        yield name.upper(), args.strip()
        logical = ""


def _exec_form(args: str) -> list[str]:
    """A JSON exec form (``["a", "b"]``) or a shell form (``sh -c``)."""
    if args.startswith("["):
        value = json.loads(args)
        assert isinstance(value, list)
        return [str(v) for v in value]
    return ["/bin/sh", "-c", args]


#: Instructions kept as they are, and those in exec form, by Dockerfile attribute.
_PLAIN = {"FROM": "base", "WORKDIR": "workdir", "USER": "user"}
_EXEC = {"ENTRYPOINT": "entrypoint", "CMD": "cmd"}


def _set_env(env: dict[str, str], args: str) -> None:
    """``ENV A=1 B=$A``: each value with earlier variables substituted."""
    for item in shlex.split(args):
        key, _, value = item.partition("=")
        env[key] = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value)


def parse_dockerfile(text: str) -> Dockerfile:
    """The Dockerfile's base, environment, steps, user, entry point and health check."""
    d = Dockerfile()
    for name, args in _instructions(text):
        if name in _PLAIN:
            setattr(d, _PLAIN[name], args)
        elif name in _EXEC:
            setattr(d, _EXEC[name], _exec_form(args))
        elif name == "ENV":
            _set_env(d.env, args)
        elif name == "COPY":
            src, dest = shlex.split(args)
            d.copies.append((src, d.workdir if dest in (".", "./") else dest))
        elif name == "RUN":
            d.runs.append(Step(_exec_form(args), dict(d.env), d.workdir))
        elif name == "HEALTHCHECK":
            options, _, command = args.partition("CMD ")
            assert all(o.startswith("--") for o in options.split()), options
            d.healthcheck = _exec_form(command.strip())
        elif name not in {"EXPOSE", "LABEL", "ARG"}:
            raise AssertionError(f"Dockerfile instruction these tests do not know: {name}")
    return d


def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _install_step(d: Dockerfile) -> Step:
    """The one RUN that installs Python packages: it must be scripts/bootstrap.sh."""
    installs = [s for s in d.runs if re.search(r"pip|bootstrap|venv|uv ", " ".join(s.command))]
    assert len(installs) == 1, [s.command for s in installs]
    return installs[0]


def _bootstrap_default(variable: str) -> str:
    """The default scripts/bootstrap.sh gives ``variable`` (``${VAR:-default}``)."""
    found = re.findall(r"\$\{" + variable + r":-([^}]*)\}", BOOTSTRAP.read_text(encoding="utf-8"))
    assert found, f"scripts/bootstrap.sh has no default for {variable}"
    return str(found[0])


def _dockerignore_patterns() -> list[re.Pattern[str]]:
    """.dockerignore's patterns as regexes over context-relative paths.

    Docker matches each pattern against the whole path from the context's root
    (``tls`` is the top-level ``tls`` only; ``**/`` matches any depth). These tests
    support that subset; an exception (``!``) or a character class is refused here
    rather than half-understood.
    """
    patterns = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        assert not line.startswith("!") and "[" not in line, f"unsupported pattern {line}"
        line = line.strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif line[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        patterns.append(re.compile(regex))
    return patterns


def build_context(dest: Path) -> list[str]:
    """Copy the repository into ``dest`` as ``docker build .`` sends it (.dockerignore
    applied; an ignored directory is skipped whole); the relative paths copied."""
    patterns = _dockerignore_patterns()
    copied: list[str] = []

    def ignored(rel: str) -> bool:
        return any(p.fullmatch(rel) for p in patterns)

    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath)
        rel_dir = here.relative_to(ROOT).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [n for n in dirnames if not ignored(prefix + n)]
        for name in filenames:
            rel = prefix + name
            if ignored(rel) or (here / name).is_symlink():
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(here / name, target)
            copied.append(rel)
    return copied


def test_dockerfile_installs_through_the_ci_script() -> None:
    d = dockerfile()
    assert d.base == "python:3.11-slim"
    # One COPY of the whole (filtered) context, then the install: the script CI runs.
    assert d.copies == [(".", "/opt/fedq/src")]
    step = _install_step(d)
    assert step.workdir == "/opt/fedq/src"
    assert step.command[:2] == ["bash", "-c"]
    assert re.match(r"source scripts/bootstrap\.sh( |$)", step.command[2]), step.command
    ci_test = (ROOT / "scripts" / "test").read_text(encoding="utf-8")
    assert re.search(r'^source "\$\(dirname "\$0"\)/bootstrap\.sh"$', ci_test, re.M)
    assert "exec scripts/test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # The same torch as CI (bootstrap's default), the CPU build, no dev tools.
    assert step.env["FEDQ_TORCH"] == _bootstrap_default("FEDQ_TORCH") == "torch==2.13.0"
    assert step.env["FEDQ_TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    extras = step.env["FEDQ_EXTRAS"].split(",")
    assert "all" in extras and "dev" not in extras
    assert "dev" in _bootstrap_default("FEDQ_EXTRAS").split(",")  # CI keeps its tools
    assert step.env["FEDQ_VENV"] == "/opt/fedq/venv"
    assert d.env["PATH"].startswith("/opt/fedq/venv/bin:")
    # Non-root at run time; the entry point and health check are in the context.
    assert d.user.split(":")[0] not in {"root", "0"}
    assert d.entrypoint == ["python", "/opt/fedq/src/scripts/container-entrypoint"]
    assert d.cmd == ["aggregator", "run"]
    assert d.healthcheck[:2] == d.entrypoint
    assert d.healthcheck[2:] == ["--healthcheck", "aggregator"]
    patterns = _dockerignore_patterns()
    for needed in ("scripts/container-entrypoint", "scripts/bootstrap.sh", "pyproject.toml"):
        assert not any(p.fullmatch(needed) for p in patterns), needed
    for secret in ("tls", "secrets", "data", "task", ".venv", "a/b.key"):
        assert any(p.fullmatch(secret) for p in patterns), secret


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_dockerfile_install_step_runs(tmp_path: Path) -> None:
    """The Dockerfile's RUN step, with its ENV, into a fresh venv from the build context.

    The one setting replaced is FEDQ_TORCH_INDEX: CI machines reach only the package
    indexes pip is configured with, which hold the same torch==2.13.0 CPU build (the
    test checks the version and that it is a CPU build). The image's paths become
    temporary ones: /opt/fedq/src the copied context, /opt/fedq/venv a new venv.
    """
    try:
        _install_and_check(tmp_path)
    finally:  # about 1 GB: not left for pytest's kept temporary directories
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def _install_and_check(tmp_path: Path) -> None:
    d = dockerfile()
    step = _install_step(d)
    context = tmp_path / "src"
    copied = build_context(context)
    assert "scripts/container-entrypoint" in copied
    assert not [p for p in copied if p.split("/")[0] in {"tls", "secrets", ".venv", "tests"}]
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEDQ_", "VIRTUAL_ENV"))}
    # The base image's python3 (3.11), not this checkout's venv.
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not p.startswith(sys.prefix)
    )
    for key, value in step.env.items():
        env[key] = value.replace("/opt/fedq/venv", str(venv)).replace("/opt/fedq/src", str(context))
    del env["FEDQ_TORCH_INDEX"]
    assert step.command[0] == "bash"
    run = subprocess.run(
        step.command,
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=360,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    version = _project_version()
    assert run.stdout.strip() == f"fedq, version {version}"

    python = venv / "bin" / "python"
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, sys, torch; "
            "print(torch.__version__, torch.version.cuda, sys.version_info[:2], "
            "[m for m in ('redis', 'aiohttp', 'safetensors', 'matplotlib', 'pytest', "
            "'mypy', 'ruff') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert probe.stdout.split(" ", 1)[0].startswith("2.13.0")
    # A CPU build (no CUDA), Python 3.11, the aggregator's extras and no dev tools.
    assert probe.stdout.strip().split(" ", 1)[1] == (
        "None (3, 11) ['redis', 'aiohttp', 'safetensors', 'matplotlib']"
    )
    # The image's entry point with the image's interpreter: fedq of the new venv.
    entry = d.entrypoint[1].replace("/opt/fedq/src", str(context))
    shown = subprocess.run(
        [str(python), entry, "aggregator", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"},
    )
    assert shown.returncode == 0, shown.stderr
    assert "--http-port" in shown.stdout


def _project_version() -> str:
    import tomllib

    doc = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return str(doc["project"]["version"])


# ------------------------------------------------------------------ compose.yaml


@dataclass(frozen=True)
class Mount:
    """One entry of a service's ``volumes``."""

    kind: str  # bind or volume
    source: str
    target: str
    read_only: bool


def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target, *mode = v.split(":")
            kind = "bind" if source.startswith((".", "/")) else "volume"
            out.append(Mount(kind, source, target, mode == ["ro"]))
        else:
            out.append(Mount(v["type"], v["source"], v["target"], bool(v.get("read_only"))))
    return out


def _published(service: Mapping[str, Any]) -> dict[int, str]:
    """Container port -> the host binding it is published on."""
    out = {}
    for p in service.get("ports", []):
        host, _, container = str(p).rpartition(":")
        out[int(container)] = host
    return out


def _gitignored(path: str) -> bool:
    """Whether a path of the repository root is in .gitignore (its top directory or
    its extension; the patterns this file uses)."""
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    top = path.removeprefix("./").split("/")[0]
    return f"/{top}/" in lines or any(
        line.startswith("*.") and path.endswith(line[1:]) for line in lines
    )


def test_compose_declares_every_service_without_secrets() -> None:
    doc = compose()
    services = doc["services"]
    assert tuple(services) == SERVICES
    assert services["rabbitmq"]["image"].startswith("rabbitmq:4")
    assert services["redis"]["image"].startswith("redis:")
    d = dockerfile()
    for name in FEDQ_SERVICES:
        s = services[name]
        assert s["build"] == "." and s["image"] == "fedq:latest", name
        assert "entrypoint" not in s, name  # the image's: passwords from files
        env = s["environment"]
        assert env["FEDQ_SPEC"] == "/etc/fedq/spec.json"
        # Each URL names its user and no password; the password comes from a secret.
        for var in ("FEDQ_AMQP_URL", "FEDQ_REDIS_URL"):
            if var in env:
                user = re.fullmatch(r"(amqps|rediss)://([^:@/]+)@[^@]+", env[var])
                assert user, f"{name} {var} must be a TLS URL with a user, no password"
                secret = env[var.replace("_URL", "_PASSWORD_FILE")]
                assert secret.startswith("/run/secrets/") and secret[13:] in s["secrets"]
        assert env["FEDQ_SIGNING_KEY"] == f"/run/secrets/{s['secrets'][-1]}"
    # Each bank: its own broker user, key, data volume and metrics port.
    for service, bank in BANK_SERVICES.items():
        s = services[service]
        env = s["environment"]
        assert env["FEDQ_PARTICIPANT"] == bank
        assert env["FEDQ_AMQP_URL"].startswith(f"amqps://{bank}@rabbitmq:5671/fedq?")
        assert s["secrets"] == [f"{bank}-amqp-password", f"{bank}-signing-key"]
        assert env["FEDQ_METRICS_PORT"] == "9109"
        data = [m for m in mounts(s) if m.target == "/var/lib/fedq"]
        assert data == [Mount("bind", f"./data/{bank}", "/var/lib/fedq", False)]
        assert env["FEDQ_DATA"].startswith("/var/lib/fedq/")
        assert "--healthcheck" in s["healthcheck"]["test"]
        assert s["healthcheck"]["test"][1:3] == d.entrypoint
        assert s["depends_on"]["aggregator"]["condition"] == "service_healthy"
    # The aggregator and the standby: the same task and credentials, the image's check.
    agg, standby = services["aggregator"], services["aggregator-standby"]
    assert {k: v for k, v in agg.items() if k not in {"ports", "depends_on"}} == {
        k: v for k, v in standby.items() if k not in {"ports", "depends_on"}
    }
    assert "healthcheck" not in agg
    assert _published(agg) == {9108: "127.0.0.1:9108"}
    assert standby["depends_on"] == {"aggregator": {"condition": "service_healthy"}}
    # Secrets: files under the git-ignored secrets/ directory, none in the repository.
    for name, spec in doc["secrets"].items():
        assert spec["file"].startswith("./secrets/"), name
        assert _gitignored(spec["file"]), spec["file"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD__FILE"] == (
        "/run/secrets/grafana-admin-password"
    )
    # No service gets a password in its environment: only files that hold one.
    for name, s in services.items():
        for key, value in s.get("environment", {}).items():
            assert not re.search(r"PASSWORD|PASSWD|SECRET|TOKEN", key) or key.endswith("_FILE"), (
                name,
                key,
            )
            assert not re.search(r"://[^/@]*:[^/@]*@", str(value)), (name, key)
    # Only AMQPS leaves this host; every other port is on 127.0.0.1.
    for name, s in services.items():
        for port, host in _published(s).items():
            assert host.startswith("127.0.0.1:") or (name, port) == ("rabbitmq", 5671)


def _config_paths(text: str, keys: tuple[str, ...], sep: str) -> dict[str, str]:
    """The values of ``keys`` in a rabbitmq.conf / redis.conf style file."""
    out = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#") or sep not in line:
            continue
        key, _, value = line.partition(sep)
        if key.strip() in keys:
            out[key.strip()] = value.strip().strip('"')
    return out


def _mounted(service: Mapping[str, Any], path: str) -> Mount | None:
    for m in mounts(service):
        if path == m.target or path.startswith(m.target.rstrip("/") + "/"):
            return m
    return None


def test_compose_servers_mount_what_their_configs_name() -> None:
    services = compose()["services"]
    rabbit, redis_ = services["rabbitmq"], services["redis"]
    conf = (ROOT / "broker_config" / "rabbitmq.conf").read_text(encoding="utf-8")
    assert _mounted(rabbit, "/etc/rabbitmq/rabbitmq.conf") == Mount(
        "bind", "./broker_config/rabbitmq.conf", "/etc/rabbitmq/rabbitmq.conf", True
    )
    paths = _config_paths(
        conf,
        (
            "definitions.local.path",
            "ssl_options.cacertfile",
            "ssl_options.certfile",
            "ssl_options.keyfile",
        ),
        "=",
    )
    assert len(paths) == 4
    assert _mounted(rabbit, paths["definitions.local.path"]) == Mount(
        "bind", "./broker_config/definitions.json", "/etc/rabbitmq/definitions.json", True
    )
    for key in ("ssl_options.cacertfile", "ssl_options.certfile", "ssl_options.keyfile"):
        m = _mounted(rabbit, paths[key])
        assert m is not None and m.source == "./tls", key
    amqps = _config_paths(conf, ("listeners.ssl.default",), "=")["listeners.ssl.default"]
    assert _published(rabbit)[int(amqps)] == amqps == str(SERVER_PORTS["rabbitmq"])

    command = redis_["command"]
    assert command[0] == "redis-server"
    assert _mounted(redis_, command[1]) == Mount(
        "bind", "./broker_config/redis.conf", command[1], True
    )
    conf = (ROOT / "broker_config" / "redis.conf").read_text(encoding="utf-8")
    paths = _config_paths(
        conf, ("dir", "aclfile", "tls-cert-file", "tls-key-file", "tls-ca-cert-file"), " "
    )
    assert len(paths) == 5
    assert _mounted(redis_, paths["dir"]) == Mount("volume", "redis-data", "/data", False)
    acl = _mounted(redis_, paths["aclfile"])
    assert acl is not None and acl.source == "./secrets/redis-users.acl"
    for key in ("tls-cert-file", "tls-key-file", "tls-ca-cert-file"):
        m = _mounted(redis_, paths[key])
        assert m is not None and m.source == "./tls", key
    port = _config_paths(conf, ("tls-port",), " ")["tls-port"]
    assert _published(redis_)[int(port)] == f"127.0.0.1:{port}"
    assert port == str(SERVER_PORTS["redis"])


def test_compose_monitoring_files_fit_the_services() -> None:
    """Prometheus scrapes every fedq service on its port; Grafana's provisioning
    names the Prometheus service and the dashboard file that is there."""
    doc = compose()
    services = doc["services"]
    prom = services["prometheus"]
    for target in ("/etc/prometheus/prometheus.yml", "/etc/prometheus/alerts.yml"):
        m = _mounted(prom, target)
        assert m is not None and m.read_only and (ROOT / m.source).is_file(), target
    config = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    targets = {
        t
        for job in config["scrape_configs"]
        for sc in job.get("static_configs", [])
        for t in sc["targets"]
    }
    expected = {f"{s}:{services[s]['environment']['FEDQ_HTTP_PORT']}" for s in FEDQ_SERVICES[:2]}
    expected |= {f"{s}:{services[s]['environment']['FEDQ_METRICS_PORT']}" for s in BANK_SERVICES}
    assert targets == expected

    grafana = services["grafana"]
    prov = _mounted(grafana, "/etc/grafana/provisioning")
    dash = _mounted(grafana, "/var/lib/grafana/dashboards")
    assert prov is not None and dash is not None
    prov_dir, dash_dir = ROOT / prov.source, ROOT / dash.source
    datasources = [
        ds
        for f in sorted((prov_dir / "datasources").glob("*.y*ml"))
        for ds in yaml.safe_load(f.read_text())["datasources"]
    ]
    prom_ds = [ds for ds in datasources if ds["type"] == "prometheus"]
    assert len(prom_ds) == 1
    assert prom_ds[0]["url"] == "http://prometheus:9090"  # the service, Prometheus's port
    providers = [
        p
        for f in sorted((prov_dir / "dashboards").glob("*.y*ml"))
        for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    dashboards = []
    for p in providers:
        path = p["options"]["path"]
        assert path == dash.target or path.startswith(dash.target + "/"), path
        host = dash_dir / Path(path).relative_to(dash.target)
        dashboards += sorted(host.glob("*.json"))
    assert dashboards, "no dashboard JSON where the provider looks"
    uid = prom_ds[0].get("uid")
    for f in dashboards:
        board = json.loads(f.read_text())
        used = {
            str(v["uid"])
            for v in _walk(board)
            if isinstance(v, dict) and v.get("type") == "prometheus" and "uid" in v
        }
        if uid is not None:
            assert used <= {uid} | {u for u in used if u.startswith("$")}, (f, used)


def _walk(node: object) -> Iterator[object]:
    yield node
    if isinstance(node, dict):
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


# ------------------------------------------------------------- the stack, as processes


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def _poll(what: str, check: Callable[[], bool], seconds: float, why: Callable[[], str]) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OSError, ValueError):
            if check():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {seconds:.0f}s\n{why()}")
        time.sleep(0.2)


class Stack:
    """compose.yaml's services as processes of this host.

    Container paths map to the operator's files in ``project`` (compose's relative
    bind sources and secret files), to a directory per named volume, to this checkout
    (/opt/fedq/src, the Dockerfile's COPY) and its venv (/opt/fedq/venv); service
    host names map to 127.0.0.1 and each service's container ports to ports of its own.
    """

    def __init__(self, project: Path, rabbit: PrivateRabbit, redis: PrivateRedis) -> None:
        self.doc = compose()
        self.image = dockerfile()
        self.project = project
        self.ports: dict[tuple[str, int], int] = {
            ("rabbitmq", SERVER_PORTS["rabbitmq"]): rabbit.port,
            ("redis", SERVER_PORTS["redis"]): redis.port,
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self.extra_env: dict[str, str] = {}
        #: Files a service sees at a mount's target instead of the mount's source.
        self.overrides: dict[str, dict[str, Path]] = {}

    def service(self, name: str) -> dict[str, Any]:
        s = self.doc["services"][name]
        assert isinstance(s, dict)
        return s

    def port(self, service: str, container_port: int) -> int:
        """The host port standing for ``service:container_port``."""
        key = (service, container_port)
        if key not in self.ports:
            self.ports[key] = free_port()
        return self.ports[key]

    def paths(self, name: str) -> dict[str, Path]:
        """Container path -> host path, for one service."""
        s = self.service(name)
        out: dict[str, Path] = {}
        if s.get("image") == "fedq:latest":
            out["/opt/fedq/src"] = ROOT
            out["/opt/fedq/venv"] = Path(sys.prefix)
            home = self.project / "homes" / name
            home.mkdir(parents=True, exist_ok=True)
            out[self.image.workdir] = home
        for m in mounts(s):
            if m.kind == "bind":
                out[m.target] = self.project / m.source
            else:
                volume = self.project / "volumes" / m.source
                volume.mkdir(parents=True, exist_ok=True)
                out[m.target] = volume
        for secret in s.get("secrets", []):
            out[f"/run/secrets/{secret}"] = self.project / self.doc["secrets"][secret]["file"]
        out.update(self.overrides.get(name, {}))
        return out

    def map(self, name: str, value: str) -> str:
        """A value of ``name``'s command line or environment, as on this host."""
        paths = self.paths(name)
        hosts = sorted(self.doc["services"], key=len, reverse=True)
        host_re = r"(?<![\w.-])(" + "|".join(map(re.escape, hosts)) + r"):(\d+)\b"
        value = re.sub(
            host_re, lambda m: f"127.0.0.1:{self.port(m.group(1), int(m.group(2)))}", value
        )
        path_re = (
            r"(?<![\w.-])("
            + "|".join(map(re.escape, sorted(paths, key=len, reverse=True)))
            + r")(?=$|[/?&\s\"'])"
        )
        return re.sub(path_re, lambda m: str(paths[m.group(1)]), value)

    def env(self, name: str) -> dict[str, str]:
        s = self.service(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDQ_")}
        if s.get("image") == "fedq:latest":
            for key, value in self.image.env.items():
                env[key] = self.map(name, value.replace("$PATH", os.environ["PATH"]))
        for key, value in s.get("environment", {}).items():
            mapped = self.map(name, str(value))
            if key in {"FEDQ_HTTP_PORT", "FEDQ_METRICS_PORT"}:
                mapped = str(self.port(name, int(value)))
            env[key] = mapped
        if s.get("image") == "fedq:latest":
            env.update(self.extra_env)
        return env

    def argv(self, name: str) -> list[str]:
        s = self.service(name)
        image = str(s["image"])
        if image == "fedq:latest":
            entry = s.get("entrypoint", self.image.entrypoint)
            command = s.get("command", self.image.cmd)
        else:
            entry = [IMAGE_PROGRAMS[image.split(":")[0]]]
            command = s["command"]
        argv = [self.map(name, str(a)) for a in [*entry, *command]]
        program = shutil.which(argv[0], path=self.env(name)["PATH"])
        assert program is not None, argv[0]
        return [program, *argv[1:]]

    def start(self, name: str, *extra: str) -> None:
        log = self.project / "logs" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs[name] = log
        workdir = self.paths(name).get(self.image.workdir, self.project)
        with log.open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [*self.argv(name), *extra],
                env=self.env(name),
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        path = self.logs.get(name)
        return path.read_text(errors="replace")[-6000:] if path else ""

    def alive(self, name: str) -> bool:
        proc = self.procs[name]
        assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.log(name)}"
        return True

    def url(self, name: str, container_port: int, path: str) -> str:
        return f"http://127.0.0.1:{self.port(name, container_port)}{path}"

    def healthcheck(self, name: str) -> subprocess.CompletedProcess[str]:
        """The service's health check command (compose's, else the image's), run here."""
        s = self.service(name)
        test = s["healthcheck"]["test"] if "healthcheck" in s else ["CMD", *self.image.healthcheck]
        assert test[0] == "CMD", test
        argv = [self.map(name, str(a)) for a in test[1:]]
        env = self.env(name)
        program = shutil.which(argv[0], path=env["PATH"])
        assert program is not None
        return subprocess.run(
            [program, *argv[1:]], env=env, capture_output=True, text=True, timeout=30
        )

    def stop(self, name: str, timeout: float = 60.0) -> tuple[int, str]:
        """SIGTERM (what ``docker compose stop`` sends); the exit status and the log."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=timeout)
        return rc, self.log(name)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def _fedq(*args: str, cwd: Path) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "fedq", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def _add_bank_user(rabbit: PrivateRabbit, bank: str) -> None:
    """broker_config/README.md, "Adding a bank", for a bank definitions.json lacks."""
    password = f"{bank}-{secrets.token_hex(8)}"
    for args in (
        ("add_user", bank, password),
        (
            "set_permissions",
            "-p",
            rabbit.vhost,
            bank,
            "^$",
            "^fedq\\.updates$",
            f"^fedq\\.(model\\.[^.]+|receipt\\.[^.]+\\.{bank})$",
        ),
        (
            "set_topic_permissions",
            "-p",
            rabbit.vhost,
            bank,
            "fedq.updates",
            f"^update\\.[^.]+\\.{bank}$",
            "^$",
        ),
    ):
        result = rabbit.cli("rabbitmqctl", *args)
        assert result.returncode == 0, result.stdout + result.stderr
    rabbit.passwords[bank] = password


def operator_files(project: Path, rabbit: PrivateRabbit, redis: PrivateRedis, task: str) -> None:
    """What compose.yaml's header has the operator make, for these private servers."""
    (project / "broker_config").symlink_to(ROOT / "broker_config")
    (project / "monitoring").symlink_to(ROOT / "monitoring")
    certs = test_certificates()
    tls = project / "tls"
    tls.mkdir()
    for f in (certs.ca_cert, certs.server_cert, certs.server_key):
        shutil.copy2(f, tls / f.name)  # ca.crt, server.crt, server.key
    store = project / "secrets"
    store.mkdir()
    banks = tuple(BANK_SERVICES.values())
    for bank in banks:
        if bank not in rabbit.passwords:
            _add_bank_user(rabbit, bank)
    passwords = {
        "fedq-aggregator.amqp-password": rabbit.passwords[AGGREGATOR],
        "fedq-aggregator.redis-password": redis.passwords[AGGREGATOR],
        "fedq-auditor.redis-password": redis.passwords[AUDITOR],
        "grafana-admin-password": secrets.token_hex(12),
        **{f"{b}.amqp-password": rabbit.passwords[b] for b in banks},
    }
    for name, password in passwords.items():
        (store / name).write_text(password + "\n")
    # The private Redis's ACL file is scripts/redis-acl's, from these same passwords.
    shutil.copy2(redis.acl_file, store / "redis-users.acl")
    keys = {}
    for party in (AGGREGATOR, *banks):
        out = _fedq("keys", "generate", "--out", f"secrets/{party}.key", cwd=project)
        keys[party] = re.findall(r"public key:\s+(ed25519:\w+)", out)[0]
    (project / "task").mkdir()
    _fedq(
        "task",
        "init",
        "--data",
        str(DATA),
        "--target",
        "creditability",
        "--positive",
        "bad",
        "--task-id",
        task,
        "--participants",
        ",".join(banks),
        *[f"--participant-key={b}={keys[b]}" for b in banks],
        "--aggregator-key",
        keys[AGGREGATOR],
        "--out",
        "task/spec.json",
        cwd=project,
    )
    frame = pd.read_csv(DATA)
    for i, bank in enumerate(banks):
        shard = project / "data" / bank
        shard.mkdir(parents=True)
        frame.iloc[i :: len(banks)].to_csv(shard / "train.csv", index=False)


class Versions:
    """The task's versions in the store, read as the aggregator's Redis user."""

    def __init__(self, url: str, task: str) -> None:
        self.url, self.task = url, task
        self.records: list[VersionRecord] = []

    def refresh(self) -> list[VersionRecord]:
        asyncio.run(self._read())
        return self.records

    async def _read(self) -> None:
        store = RedisModelStore(connect_redis(self.url))
        try:
            head = await store.head(self.task) or 0
            for v in range(len(self.records) + 1, head + 1):
                self.records.append(await store.get_version(self.task, v))
        finally:
            await store.close()

    async def _verify(self) -> bool:
        store = RedisModelStore(connect_redis(self.url))
        try:
            return (await store.verify_chain(self.task)).ok
        finally:
            await store.close()

    def verify(self) -> bool:
        return asyncio.run(self._verify())

    def by(self, owner: str) -> set[str]:
        """The banks whose updates went into versions ``owner`` committed."""
        return {
            e.participant for r in self.records if r.info.get("owner") == owner for e in r.lineage
        }


def _answers(stack: Stack, name: str, port: int, path: str) -> bool:
    """Whether ``name`` is running and answers 200 on ``path``."""
    return stack.alive(name) and _get(stack.url(name, port, path))[0] == 200


def _status(stack: Stack, name: str) -> dict[str, Any]:
    code, body = _get(stack.url(name, 9108, "/status"))
    assert code == 200, body
    doc = json.loads(body)
    assert isinstance(doc, dict)
    return doc


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compose_stack_runs(
    tmp_path: Path, private_rabbit: PrivateRabbit, private_redis: PrivateRedis
) -> None:
    task = f"compose{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"
    project.mkdir()
    operator_files(project, private_rabbit, private_redis, task)
    stack = Stack(project, private_rabbit, private_redis)
    # Every file the services mount or read as a secret is one the operator made.
    for name in SERVICES:
        for container, host in stack.paths(name).items():
            assert host.exists(), f"{name}: {container} -> {host} missing"
    # Test-only settings, through the environment the image reads (FEDQ_CONFIG): the
    # banks pause between rounds so that five processes share this machine's CPUs.
    config = project / "test-only.toml"
    config.write_text("[participant]\ndelay = 1.0\n")
    stack.extra_env["FEDQ_CONFIG"] = str(config)
    try:
        _run_stack(stack, private_rabbit, private_redis, task)
    finally:
        stack.close()


def _server_healthchecks(stack: Stack, rabbit: PrivateRabbit, redis: PrivateRedis) -> None:
    """compose's health checks of RabbitMQ and Redis, against the private servers."""
    test = stack.service("rabbitmq")["healthcheck"]["test"]
    assert test[:2] == ["CMD", "rabbitmq-diagnostics"]
    result = rabbit.cli(test[1], *[a for a in test[2:] if a != "-q"])
    assert result.returncode == 0, result.stderr
    test = stack.service("redis")["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL" and test[1].startswith("redis-cli ")
    # The check talks to 127.0.0.1:6379 inside its container: here, the private port.
    shell = stack.map("redis", test[1]).replace("redis-cli ", f"redis-cli -p {redis.port} ", 1)
    assert str(stack.project / "tls" / "ca.crt") in shell
    result = subprocess.run(["sh", "-c", shell], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def _prometheus_config(stack: Stack) -> None:
    """Prometheus's mounted files, mapped like the command lines (targets, rule path)."""
    out = stack.project / "prometheus-mapped"
    out.mkdir()
    copies = {}
    for m in mounts(stack.service("prometheus")):
        if m.kind == "bind":
            text = (stack.project / m.source).read_text(encoding="utf-8")
            copies[m.target] = out / Path(m.target).name
            copies[m.target].write_text(stack.map("prometheus", text))
    # Prometheus reads the mapped copies where the originals are mounted.
    stack.overrides["prometheus"] = copies
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool not found (apt-get install prometheus)"
    check = subprocess.run(
        [promtool, "check", "config", str(out / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def _run_stack(stack: Stack, rabbit: PrivateRabbit, redis: PrivateRedis, task: str) -> None:
    _server_healthchecks(stack, rabbit, redis)

    # The aggregator takes the writer lease and serves /healthz.
    stack.start("aggregator")
    _poll(
        "the aggregator's /healthz 200",
        lambda: (
            stack.alive("aggregator") and _get(stack.url("aggregator", 9108, "/healthz"))[0] == 200
        ),
        90,
        lambda: stack.log("aggregator"),
    )
    active = _status(stack, "aggregator")
    assert active["role"] == "active" and active["task"] == task
    check = stack.healthcheck("aggregator")
    assert check.returncode == 0 and "active" in check.stdout, check.stdout + check.stderr

    # The standby waits: /healthz 503 (not consuming), /status names the holder.
    stack.start("aggregator-standby")
    _poll(
        "the standby's /status",
        lambda: (
            stack.alive("aggregator-standby")
            and _status(stack, "aggregator-standby")["lease"]["state"] == "standby"
        ),
        90,
        lambda: stack.log("aggregator-standby"),
    )
    standby = _status(stack, "aggregator-standby")
    assert standby["role"] == "standby"
    assert standby["lease"]["holder"] == active["owner"] != standby["owner"]
    code, body = _get(stack.url("aggregator-standby", 9108, "/healthz"))
    assert code == 503 and json.loads(body)["consuming"] is False
    check = stack.healthcheck("aggregator-standby")
    assert check.returncode == 0 and "standby" in check.stdout, check.stdout + check.stderr

    _prometheus_config(stack)
    stack.start("prometheus", f"--web.listen-address=127.0.0.1:{stack.port('prometheus', 9090)}")

    # The banks: each with its own user, key and data; each serves /metrics.
    for service in BANK_SERVICES:
        stack.start(service)
    for service in BANK_SERVICES:
        _poll(
            f"{service}'s /metrics",
            functools.partial(_answers, stack, service, 9109, "/metrics"),
            90,
            functools.partial(stack.log, service),
        )
        check = stack.healthcheck(service)
        assert check.returncode == 0, check.stdout + check.stderr

    # The aggregator commits versions made of all three banks' updates.
    versions = Versions(redis.url, task)
    banks = set(BANK_SERVICES.values())
    _poll(
        "versions from every bank",
        lambda: (
            stack.alive("aggregator")
            and bool(versions.refresh())
            and versions.by(active["owner"]) == banks
        ),
        120,
        lambda: stack.log("aggregator") + "".join(stack.log(s) for s in BANK_SERVICES),
    )
    for service, bank in BANK_SERVICES.items():
        _, metrics = _get(stack.url(service, 9109, "/metrics"))
        assert re.search(rf'participant="{bank}"', metrics), (service, metrics[:2000])

    # Prometheus scrapes all five fedq services.
    def scraped() -> bool:
        _, body = _get(stack.url("prometheus", 9090, "/api/v1/targets"))
        targets = json.loads(body)["data"]["activeTargets"]
        return len(targets) == 5 and all(t["health"] == "up" for t in targets)

    _poll("Prometheus scraping every target", scraped, 60, lambda: stack.log("prometheus"))

    # Fail-over: the aggregator stops (SIGTERM); the standby takes the lease and
    # goes on committing the banks' updates.
    head_before = versions.refresh()[-1].version
    rc, log = stack.stop("aggregator")
    assert rc == 0, log
    _poll(
        "the standby taking over",
        lambda: (
            stack.alive("aggregator-standby")
            and _get(stack.url("aggregator-standby", 9108, "/healthz"))[0] == 200
        ),
        60,
        lambda: stack.log("aggregator-standby"),
    )
    assert _status(stack, "aggregator-standby")["role"] == "active"
    _poll(
        "versions committed by the standby",
        lambda: bool(versions.refresh()) and bool(versions.by(standby["owner"])),
        60,
        lambda: stack.log("aggregator-standby"),
    )
    assert versions.records[-1].version > head_before

    for service in (*BANK_SERVICES, "aggregator-standby", "prometheus"):
        rc, log = stack.stop(service)
        assert rc == 0, f"{service}:\n{log}"
        assert "Traceback" not in log, f"{service}:\n{log}"
    assert versions.verify()
    # Every version's parent is the one before: one chain across the fail-over.
    records = versions.refresh()
    assert [r.parent for r in records] == [r.version - 1 for r in records]
    assert {r.info.get("owner") for r in records} == {active["owner"], standby["owner"]}


def test_entrypoint_reads_passwords_from_files(tmp_path: Path) -> None:
    """The image's entry point puts each password file's password into its URL."""
    entry = ROOT / "scripts" / "container-entrypoint"
    password = tmp_path / "pw"
    password.write_text("p@ss/w:rd\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("FEDQ_")},
        "FEDQ_AMQP_URL": "amqps://bank-a@rabbitmq:5671/fedq?cafile=/x",
        "FEDQ_AMQP_PASSWORD_FILE": str(password),
        "FEDQ_REDIS_URL": "rediss://fedq-aggregator:inline@redis:6379/0",
        "FEDQ_REDIS_PASSWORD_FILE": str(password),
    }
    bad = subprocess.run(
        [sys.executable, str(entry), "--version"], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        "error: FEDQ_REDIS_URL already holds a password: give it in one place only"
    )
    del env["FEDQ_REDIS_PASSWORD_FILE"], env["FEDQ_REDIS_URL"]
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, runpy; g = runpy.run_path(os.environ['ENTRY']); "
            "env = dict(os.environ); g['apply_password_files'](env); "
            "print(env['FEDQ_AMQP_URL'])",
        ],
        env={**env, "ENTRY": str(entry)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "amqps://bank-a:p%40ss%2Fw%3Ard@rabbitmq:5671/fedq?cafile=/x"
    env["FEDQ_AMQP_PASSWORD_FILE"] = str(tmp_path / "missing")
    missing = subprocess.run(
        [sys.executable, str(entry), "--version"], env=env, capture_output=True, text=True
    )
    assert missing.returncode == 2
    assert "FEDQ_AMQP_PASSWORD_FILE" in missing.stderr and "Traceback" not in missing.stderr
    del env["FEDQ_AMQP_PASSWORD_FILE"]
    version = subprocess.run(
        [sys.executable, str(entry), "--version"], env=env, capture_output=True, text=True
    )
    assert version.returncode == 0 and version.stdout.startswith("fedq, version")
