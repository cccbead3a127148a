"""Static checks of the broker and store configuration in broker_config/ and compose.yaml.

These read files only: no broker, no Redis. RabbitMQ matches permission and policy
regexes with an unanchored search (Erlang ``re:run``), so every check below that a name
is refused uses ``re.search``; every check that a name is allowed also uses
``re.fullmatch`` to make sure the regex is anchored as intended.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from common.transport import TaskTopology

ROOT = Path(__file__).resolve().parent.parent
BROKER_CONFIG = ROOT / "broker_config"
DEFINITIONS = BROKER_CONFIG / "definitions.json"
RABBITMQ_CONF = BROKER_CONFIG / "rabbitmq.conf"
REDIS_CONF = BROKER_CONFIG / "redis.conf"
REDIS_USERS = BROKER_CONFIG / "redis-users.acl"
COMPOSE = ROOT / "compose.yaml"

VHOST = "fedq"
AGGREGATOR = "fedq-aggregator"
ADMIN = "fedq-admin"
AUDITOR = "fedq-auditor"
BANKS = ("bank-a", "bank-b", "bank-c")
EXCHANGES = ("fedq.updates", "fedq.models", "fedq.dlx", "fedq.receipts")
TASKS = ("credit", "fraud-v2")

# Policy keys that RabbitMQ 3.10 knows (4.x knows them all too); an unknown key makes
# the definition import fail.
KNOWN_POLICY_KEYS = frozenset(
    {
        "alternate-exchange",
        "dead-letter-exchange",
        "dead-letter-routing-key",
        "dead-letter-strategy",
        "message-ttl",
        "expires",
        "max-length",
        "max-length-bytes",
        "overflow",
        "delivery-limit",
        "max-age",
        "stream-max-segment-size-bytes",
        "queue-leader-locator",
        "initial-cluster-size",
    }
)


# --------------------------------------------------------------------------- loaders


@cache
def definitions() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    return data


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def section(name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = definitions()[name]
    return items


def user(name: str) -> dict[str, Any]:
    matches = [u for u in section("users") if u["name"] == name]
    assert len(matches) == 1, f"user {name!r} defined {len(matches)} times"
    return matches[0]


def permissions(name: str) -> dict[str, str]:
    matches = [p for p in section("permissions") if p["user"] == name and p["vhost"] == VHOST]
    assert len(matches) == 1, f"permissions of {name!r} in {VHOST!r}: {len(matches)} entries"
    perm: dict[str, str] = matches[0]
    return perm


def topic_permissions(name: str, exchange: str) -> dict[str, str]:
    matches = [
        p
        for p in section("topic_permissions")
        if p["user"] == name and p["vhost"] == VHOST and p["exchange"] == exchange
    ]
    assert len(matches) == 1, f"topic permissions of {name!r} on {exchange!r}: {len(matches)}"
    perm: dict[str, str] = matches[0]
    return perm


def policy(name: str) -> dict[str, Any]:
    matches = [p for p in section("policies") if p["name"] == name]
    assert len(matches) == 1, f"policy {name!r} defined {len(matches)} times"
    return matches[0]


def conf_values(path: Path) -> dict[str, str]:
    """Active ``key = value`` lines of a rabbitmq.conf (comments skipped)."""
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key = value line: {raw!r}"
        assert key.strip() not in values, f"duplicate key {key.strip()!r}"
        values[key.strip()] = value.strip()
    return values


def redis_directives(path: Path) -> list[list[str]]:
    """Active directives of a redis.conf, each split into words (comments skipped)."""
    directives: list[list[str]] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            directives.append(line.split())
    return directives


def redis_single(name: str) -> str:
    values = [d[1:] for d in redis_directives(REDIS_CONF) if d[0].lower() == name]
    assert len(values) == 1, f"redis.conf sets {name!r} {len(values)} times"
    return " ".join(values[0])


def allows(regex: str, resource: str) -> bool:
    """Whether RabbitMQ grants ``resource`` under ``regex`` (an unanchored PCRE search)."""
    return re.search(regex, resource) is not None


def assert_allows(regex: str, resources: list[str]) -> None:
    for resource in resources:
        assert allows(regex, resource), f"{regex!r} should allow {resource!r}"
        assert re.fullmatch(regex, resource), f"{regex!r} should match all of {resource!r}"


def assert_denies(regex: str, resources: list[str]) -> None:
    for resource in resources:
        assert not allows(regex, resource), f"{regex!r} must not allow {resource!r}"


def mounts(service: str) -> list[tuple[str, str]]:
    """(source, target) of each volume of a compose service, short or long syntax."""
    result: list[tuple[str, str]] = []
    for volume in compose()["services"][service].get("volumes", []):
        if isinstance(volume, str):
            parts = volume.split(":")
            result.append((parts[0], parts[1]))
        else:
            result.append((volume["source"], volume["target"]))
    return result


def bind_mounts(service: str) -> dict[str, Path]:
    """Container target -> host path of the bind mounts (sources starting with . or /)."""
    return {
        target: (ROOT / source).resolve()
        for source, target in mounts(service)
        if source.startswith((".", "/"))
    }


def model_stream(task: str) -> str:
    return f"fedq.model.{task}"


def legacy_model_queue(task: str, bank: str) -> str:
    """A bank's own model queue before the model stream: no longer declared."""
    return f"fedq.model.{task}.{bank}"


def receipt_queue(task: str, bank: str) -> str:
    return f"fedq.receipt.{task}.{bank}"


def other_bank(bank: str) -> str:
    return next(b for b in BANKS if b != bank)


# --------------------------------------------------------------------------- definitions


def test_definitions_has_every_section() -> None:
    for name in (
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "policies",
        "exchanges",
        "queues",
        "bindings",
    ):
        assert isinstance(definitions()[name], list), name


def test_vhost_fedq_exists() -> None:
    assert [v["name"] for v in section("vhosts")] == [VHOST]


def test_every_entry_is_in_vhost_fedq() -> None:
    for name in ("permissions", "topic_permissions", "policies", "exchanges"):
        for entry in section(name):
            assert entry["vhost"] == VHOST, (name, entry)


def test_users_and_tags() -> None:
    assert {u["name"] for u in section("users")} == {AGGREGATOR, ADMIN, AUDITOR, *BANKS}
    assert user(ADMIN)["tags"] == ["administrator"]
    for name in (AGGREGATOR, AUDITOR, *BANKS):
        assert user(name)["tags"] == [], name


def test_no_user_may_impersonate() -> None:
    # With the impersonator tag a user could forge the validated user_id property.
    for entry in section("users"):
        assert "impersonator" not in entry["tags"], entry["name"]


def test_users_ship_without_a_usable_password() -> None:
    for entry in section("users"):
        assert "password" not in entry, entry["name"]
        assert entry["password_hash"] == "", entry["name"]
        assert entry["hashing_algorithm"] == "rabbit_password_hashing_sha256"


def test_permissions_refer_to_defined_users() -> None:
    names = {u["name"] for u in section("users")}
    for name in ("permissions", "topic_permissions"):
        for entry in section(name):
            assert entry["user"] in names, entry


@pytest.mark.parametrize("name", EXCHANGES)
def test_exchange_exists_durable_topic(name: str) -> None:
    matches = [x for x in section("exchanges") if x["name"] == name]
    assert len(matches) == 1
    exchange = matches[0]
    assert exchange["type"] == "topic"
    assert exchange["durable"] is True
    assert exchange["auto_delete"] is False
    assert exchange["internal"] is False


def test_updates_exchange_is_durable() -> None:
    (updates,) = [x for x in section("exchanges") if x["name"] == "fedq.updates"]
    assert updates["durable"] is True


def test_queues_and_bindings_are_left_to_the_aggregator() -> None:
    # Queues depend on the tasks: the aggregator declares and binds them at runtime.
    assert section("queues") == []
    assert section("bindings") == []


# --------------------------------------------------------------------------- participants


@pytest.mark.parametrize("bank", BANKS)
def test_participant_cannot_configure_anything(bank: str) -> None:
    configure = permissions(bank)["configure"]
    assert_denies(
        configure,
        [
            model_stream("credit"),
            "fedq.updates",
            "fedq.models",
            "fedq.work.credit",
            "fedq.audit.credit",
            "amq.gen-abc",
            "anything",
        ],
    )


@pytest.mark.parametrize("bank", BANKS)
def test_participant_writes_only_to_updates_exchange(bank: str) -> None:
    write = permissions(bank)["write"]
    assert_allows(write, ["fedq.updates"])
    assert_denies(
        write,
        [
            "fedq.models",
            "fedq.dlx",
            "amq.default",  # the default exchange: would reach any queue directly
            "amq.topic",
            "fedq.updates.evil",
            "xfedq.updates",
            "fedq.work.credit",
            "fedq.audit.credit",
            "fedq.dead.credit",
            "fedq.receipts",
            model_stream("credit"),
            receipt_queue("credit", bank),
        ],
    )


@pytest.mark.parametrize("bank", BANKS)
def test_participant_reads_the_model_streams_only(bank: str) -> None:
    read = permissions(bank)["read"]
    assert_allows(read, [model_stream(task) for task in TASKS])
    assert_denies(
        read,
        [
            *(legacy_model_queue(task, b) for task in TASKS for b in BANKS),
            "fedq.model.credit.x",
            "fedq.model.",
            "fedq.model..credit",
            "xfedq.model.credit",
            "fedq.modelx.credit",
            "fedq.work.credit",
            "fedq.audit.credit",
            "fedq.dead.credit",
            "fedq.updates",
            "fedq.models",
            "fedq.dlx",
            "fedq.receipts",
        ],
    )


@pytest.mark.parametrize("bank", BANKS)
def test_participant_reads_only_its_own_receipt_queue(bank: str) -> None:
    read = permissions(bank)["read"]
    assert_allows(read, [receipt_queue(task, bank) for task in TASKS])
    other = other_bank(bank)
    assert_denies(
        read,
        [
            *(receipt_queue(task, other) for task in TASKS),
            f"fedq.receipt.credit.{bank}x",
            f"fedq.receipt.credit.x{bank}",
            f"fedq.receipt.credit.{bank}.extra",
            f"fedq.receipt.a.b.{bank}",
            f"fedq.receipt..{bank}",
            f"fedq.receipts.credit.{bank}",
            f"fedq.modelreceipt.credit.{bank}",
            "fedq.receipts",
        ],
    )


@pytest.mark.parametrize("bank", BANKS)
def test_receipt_queues_are_readable_only_by_their_bank_and_the_aggregator(bank: str) -> None:
    queues = [receipt_queue(task, bank) for task in TASKS]
    assert_allows(permissions(AGGREGATOR)["read"], queues)
    assert_denies(permissions(AUDITOR)["read"], queues)
    assert_denies(permissions(other_bank(bank))["read"], queues)
    for user in (bank, other_bank(bank), AUDITOR):
        assert_denies(permissions(user)["write"], [*queues, "fedq.receipts"])
        assert_denies(permissions(user)["configure"], [*queues, "fedq.receipts"])


@pytest.mark.parametrize("bank", BANKS)
def test_participant_publishes_only_under_its_own_name(bank: str) -> None:
    topic = topic_permissions(bank, "fedq.updates")
    assert_allows(topic["write"], [f"update.{task}.{bank}" for task in TASKS])
    assert_denies(
        topic["write"],
        [
            f"update.credit.{other_bank(bank)}",
            f"update.credit.{bank}.x",
            f"update.credit.{bank}x",
            f"update.a.b.{bank}",
            f"model.credit.{bank}",
            f"dead.credit.{bank}",
        ],
    )
    assert_denies(topic["read"], ["update.credit.bank-a", "#", "update.#"])


# --------------------------------------------------------------------------- aggregator


def test_aggregator_can_declare_what_it_needs() -> None:
    configure = permissions(AGGREGATOR)["configure"]
    assert_allows(
        configure,
        [
            *EXCHANGES,
            *(f"fedq.work.{task}" for task in TASKS),
            *(f"fedq.audit.{task}" for task in TASKS),
            *(f"fedq.dead.{task}" for task in TASKS),
            *(model_stream(task) for task in TASKS),
            *(receipt_queue(task, bank) for task in TASKS for bank in BANKS),
        ],
    )


def test_aggregator_can_bind_and_publish() -> None:
    write = permissions(AGGREGATOR)["write"]
    # Publishing to the model and dead-letter exchanges.
    assert_allows(write, ["fedq.models", "fedq.dlx", "fedq.receipts"])
    # queue.bind needs write on the queue.
    assert_allows(
        write,
        [
            *(f"fedq.work.{task}" for task in TASKS),
            *(f"fedq.audit.{task}" for task in TASKS),
            *(f"fedq.dead.{task}" for task in TASKS),
            *(model_stream(task) for task in TASKS),
            *(receipt_queue(task, bank) for task in TASKS for bank in BANKS),
        ],
    )
    assert_denies(write, ["amq.default", "amq.topic"])


def test_aggregator_can_consume_and_bind_from_exchanges() -> None:
    read = permissions(AGGREGATOR)["read"]
    assert_allows(
        read,
        [
            # queue.bind needs read on the source exchange.
            *EXCHANGES,
            *(f"fedq.work.{task}" for task in TASKS),
            *(f"fedq.audit.{task}" for task in TASKS),
            *(f"fedq.dead.{task}" for task in TASKS),
        ],
    )


def test_aggregator_has_no_topic_restriction() -> None:
    assert not [p for p in section("topic_permissions") if p["user"] == AGGREGATOR]


def test_admin_has_full_access_in_fedq() -> None:
    perm = permissions(ADMIN)
    for kind in ("configure", "write", "read"):
        assert perm[kind] == ".*"


# --------------------------------------------------------------------------- auditor


def test_auditor_reads_only_audit_streams_and_dead_letters() -> None:
    read = permissions(AUDITOR)["read"]
    assert_allows(
        read,
        [
            *(f"fedq.audit.{task}" for task in TASKS),
            *(f"fedq.dead.{task}" for task in TASKS),
        ],
    )
    assert_denies(
        read,
        [
            *(f"fedq.work.{task}" for task in TASKS),
            *(model_stream(task) for task in TASKS),
            *(receipt_queue(task, bank) for task in TASKS for bank in BANKS),
            *EXCHANGES,
            "fedq.audit.credit.x",
            "fedq.audit.",
            "xfedq.audit.credit",
            "fedq.auditx.credit",
            "amq.default",
        ],
    )


def test_auditor_cannot_configure_or_write_anything() -> None:
    perm = permissions(AUDITOR)
    everything = [
        *EXCHANGES,
        "amq.default",
        "amq.topic",
        *(f"fedq.{kind}.{task}" for kind in ("work", "audit", "dead") for task in TASKS),
        *(model_stream(task) for task in TASKS),
        "anything",
    ]
    assert_denies(perm["configure"], everything)
    assert_denies(perm["write"], everything)
    assert not [p for p in section("topic_permissions") if p["user"] == AUDITOR]


# --------------------------------------------------------------------------- policies

POLICY_EXAMPLES = {
    "fedq-work-delivery-limit": ["fedq.work.credit", "fedq.work.fraud-v2"],
    "fedq-audit-retention": ["fedq.audit.credit", "fedq.audit.fraud-v2"],
    "fedq-model-retention": [model_stream(task) for task in TASKS],
}
OTHER_QUEUES = [
    "fedq.dead.credit",
    "fedq.updates",
    "fedq.models",
    "amq.gen-x",
    "work.credit",
    receipt_queue("credit", "bank-a"),
    legacy_model_queue("credit", "bank-a"),
]


def test_policy_names() -> None:
    assert {p["name"] for p in section("policies")} == set(POLICY_EXAMPLES)


@pytest.mark.parametrize("name", sorted(POLICY_EXAMPLES))
def test_policy_applies_to_its_queues_only(name: str) -> None:
    pol = policy(name)
    assert pol["apply-to"] == "queues"
    mine = POLICY_EXAMPLES[name]
    others = [q for n, qs in POLICY_EXAMPLES.items() if n != name for q in qs]
    for queue in mine:
        assert allows(pol["pattern"], queue), (name, queue)
    for queue in others + OTHER_QUEUES:
        assert not allows(pol["pattern"], queue), (name, queue)


def test_policy_keys_are_known_to_rabbitmq() -> None:
    for pol in section("policies"):
        assert set(pol["definition"]) <= KNOWN_POLICY_KEYS, pol["name"]


def test_policy_priorities_are_distinct() -> None:
    priorities = [p["priority"] for p in section("policies")]
    assert all(isinstance(p, int) for p in priorities)
    assert len(set(priorities)) == len(priorities)


def test_work_queue_policy() -> None:
    definition = policy("fedq-work-delivery-limit")["definition"]
    assert definition["delivery-limit"] == 5
    assert definition["dead-letter-exchange"] == "fedq.dlx"
    # at-least-once dead-lettering on quorum queues needs overflow reject-publish.
    if definition.get("dead-letter-strategy") == "at-least-once":
        assert definition["overflow"] == "reject-publish"


def test_audit_retention_policy() -> None:
    definition = policy("fedq-audit-retention")["definition"]
    assert re.fullmatch(r"[1-9][0-9]*[YMDhms]", definition["max-age"])
    assert isinstance(definition["max-length-bytes"], int)
    assert definition["max-length-bytes"] >= 10**9
    segment = definition["stream-max-segment-size-bytes"]
    assert isinstance(segment, int)
    assert 0 < segment < definition["max-length-bytes"]


def test_model_stream_retention_policy_matches_what_the_aggregator_declares() -> None:
    # For a stream the policy's values win over the declared arguments: keep them equal.
    definition = policy("fedq-model-retention")["definition"]
    topology = TaskTopology("credit")
    assert definition == {
        "max-age": topology.models_max_age,
        "max-length-bytes": topology.models_max_bytes,
        "stream-max-segment-size-bytes": topology.models_segment_bytes,
    }
    assert re.fullmatch(r"[1-9][0-9]*[YMDhms]", definition["max-age"])
    # Retention drops whole segments: several must fit in the size limit.
    assert 0 < 4 * definition["stream-max-segment-size-bytes"] <= definition["max-length-bytes"]


# --------------------------------------------------------------------------- rabbitmq.conf


def test_rabbitmq_conf_imports_the_mounted_definitions() -> None:
    values = conf_values(RABBITMQ_CONF)
    path = values.get("definitions.local.path") or values.get("load_definitions")
    assert path == "/etc/rabbitmq/definitions.json"
    assert bind_mounts("rabbitmq")[path] == DEFINITIONS
    if "definitions.local.path" in values:
        # The modern keys need the backend; skip_if_unchanged keeps passwords set by
        # operators from being reset on every restart.
        assert values["definitions.import_backend"] == "local_filesystem"
        assert values["definitions.skip_if_unchanged"] == "true"
        # Both forms at once would import twice (and defeat skip_if_unchanged).
        assert "load_definitions" not in values


def test_rabbitmq_conf_limits() -> None:
    values = conf_values(RABBITMQ_CONF)
    assert int(values["max_message_size"]) == 16 * 1024 * 1024
    assert int(values["consumer_timeout"]) >= 30 * 60 * 1000
    assert values["loopback_users.guest"] == "true"
    assert "vm_memory_high_watermark.relative" in values
    assert any(key.startswith("disk_free_limit.") for key in values)


def test_rabbitmq_conf_speaks_tls_only() -> None:
    values = conf_values(RABBITMQ_CONF)
    assert values["listeners.tcp"] == "none"
    assert not [k for k in values if k.startswith("listeners.tcp.")]
    assert values["listeners.ssl.default"] == "5671"
    tls = bind_mounts("rabbitmq")
    assert "/etc/rabbitmq/tls" in tls
    for key, name in (
        ("cacertfile", "ca.crt"),
        ("certfile", "server.crt"),
        ("keyfile", "server.key"),
    ):
        assert values[f"ssl_options.{key}"] == f"/etc/rabbitmq/tls/{name}", key
    # Client certificates verified when presented, not required: passwords over TLS work.
    assert values["ssl_options.verify"] == "verify_peer"
    assert values["ssl_options.fail_if_no_peer_cert"] == "false"
    assert {v for k, v in values.items() if k.startswith("ssl_options.versions.")} <= {
        "tlsv1.3",
        "tlsv1.2",
    }


# --------------------------------------------------------------------------- redis.conf


def test_redis_persistence() -> None:
    assert redis_single("appendonly") == "yes"
    # The aggregator acks updates after the commit: the commit must be on disk first.
    assert redis_single("appendfsync") == "always"
    assert redis_single("aof-use-rdb-preamble") == "yes"
    assert redis_single("dir") == "/data"


def test_redis_conf_speaks_tls_only() -> None:
    assert redis_single("port") == "0"
    assert redis_single("tls-port") == "6379"
    assert redis_single("tls-cert-file") == "/usr/local/etc/redis/tls/server.crt"
    assert redis_single("tls-key-file") == "/usr/local/etc/redis/tls/server.key"
    assert redis_single("tls-ca-cert-file") == "/usr/local/etc/redis/tls/ca.crt"
    assert redis_single("tls-auth-clients") == "optional"
    assert "/usr/local/etc/redis/tls" in bind_mounts("redis")


def test_no_usable_password_is_shipped() -> None:
    # Redis: users come from an ACL file the operator writes (scripts/redis-acl); the
    # template holds no password and, having comments, is refused by Redis as it is.
    assert redis_single("aclfile") == "/usr/local/etc/redis/acl/users.acl"
    assert not [d for d in redis_directives(REDIS_CONF) if d[0] == "user"]
    text = REDIS_USERS.read_text(encoding="utf-8")
    assert text.startswith("#")
    for words in redis_users().values():
        assert not [w for w in words if w.startswith((">", "<", "#"))], words
    # RabbitMQ: nobody can log in until an operator sets the password.
    assert all(u["password_hash"] == "" for u in section("users"))
    for path in (REDIS_CONF, REDIS_USERS, RABBITMQ_CONF, COMPOSE, DEFINITIONS):
        assert "change-me" not in path.read_text(encoding="utf-8").lower(), path


def test_redis_never_evicts() -> None:
    assert redis_single("maxmemory-policy") == "noeviction"


def redis_users() -> dict[str, list[str]]:
    """The users of the ACL template (redis.conf loads the ACL file written from it)."""
    users = {d[1]: d[2:] for d in redis_directives(REDIS_USERS) if d[0] == "user"}
    assert len(users) == len(redis_directives(REDIS_USERS))
    return users


def test_redis_acl_users() -> None:
    users = redis_users()
    assert set(users) == {"default", AGGREGATOR, AUDITOR, "fedq-health"}
    aggregator = users[AGGREGATOR]
    assert "on" in aggregator
    assert "~fedq:*" in aggregator
    assert not [r for r in aggregator if r.startswith("~") and r != "~fedq:*"]
    assert "allkeys" not in aggregator
    assert "nopass" not in aggregator
    assert "-@dangerous" in aggregator
    # requirepass would rewrite the default user defined here.
    assert not [d for d in redis_directives(REDIS_CONF) if d[0] == "requirepass"]


def test_redis_default_user_is_off_with_the_writers_rights() -> None:
    # Redis 7.0 re-checks every MULTI/EXEC of the AOF against the default user while
    # loading it: with fewer rights than the aggregator, every commit is dropped on a
    # restart (tests/test_server_restarts.py). Off: nobody can log in as it.
    default = redis_users()["default"]
    assert "off" in default
    assert "on" not in default
    assert [r for r in default if r not in ("off", "nopass")] == [
        r for r in redis_users()[AGGREGATOR] if r != "on" and not r.startswith((">", "#"))
    ]


def test_redis_auditor_is_read_only() -> None:
    auditor = redis_users()[AUDITOR]
    assert "on" in auditor
    assert "nopass" not in auditor
    assert auditor.index("-@all") < auditor.index("+@read")
    # Read-only key permission, fedq keys only, no channels, nothing dangerous last.
    assert [r for r in auditor if r.startswith(("~", "%"))] == ["%R~fedq:*"]
    assert "allkeys" not in auditor and "allchannels" not in auditor
    assert not [r for r in auditor if r.startswith("&")]
    assert auditor[-1] == "-@dangerous"
    granted = [r for r in auditor if r.startswith("+")]
    assert granted == ["+@read", "+@connection"]


def test_redis_health_user_may_only_ping() -> None:
    health = redis_users()["fedq-health"]
    assert "-@all" in health
    assert not [r for r in health if r.startswith(("~", "%", "&", "+@")) or r == "allkeys"]
    assert [r for r in health if r.startswith("+")] == ["+ping"]


# --------------------------------------------------------------------------- compose.yaml


def test_compose_services() -> None:
    services = compose()["services"]
    assert {"rabbitmq", "redis"} <= set(services)
    assert services["rabbitmq"]["image"] == "rabbitmq:4-management"
    assert services["redis"]["image"] == "redis:7"


#: What the operator creates before the first start (broker_config/README.md): the
#: certificates (scripts/make-certs) and Redis's ACL file (scripts/redis-acl).
OPERATOR_FILES = {ROOT / "tls", ROOT / "secrets" / "redis-users.acl"}


def test_compose_bind_mounts_exist_in_broker_config() -> None:
    for service in ("rabbitmq", "redis"):
        for target, source in bind_mounts(service).items():
            if source in OPERATOR_FILES:
                continue
            assert source.is_file(), f"{service}: {source} (mounted at {target}) is missing"
            assert source.parent == BROKER_CONFIG, source
    assert bind_mounts("redis")["/usr/local/etc/redis/acl/users.acl"] in OPERATOR_FILES


def test_compose_rabbitmq() -> None:
    service = compose()["services"]["rabbitmq"]
    binds = bind_mounts("rabbitmq")
    assert binds["/etc/rabbitmq/rabbitmq.conf"] == RABBITMQ_CONF
    assert binds["/etc/rabbitmq/definitions.json"] == DEFINITIONS
    assert any(target == "/var/lib/rabbitmq" for _, target in mounts("rabbitmq"))
    published = {str(p).rsplit(":", 1)[-1] for p in service["ports"]}
    assert {"5671", "15672"} <= published
    assert "5672" not in published  # no plaintext AMQP
    test = service["healthcheck"]["test"]
    assert "rabbitmq-diagnostics" in test
    assert "ping" in test


def test_compose_redis() -> None:
    service = compose()["services"]["redis"]
    binds = bind_mounts("redis")
    assert binds["/usr/local/etc/redis/redis.conf"] == REDIS_CONF
    command = service["command"]
    words = command.split() if isinstance(command, str) else command
    assert words == ["redis-server", "/usr/local/etc/redis/redis.conf"]
    assert any(target == "/data" for _, target in mounts("redis"))
    # The default user is off: the healthcheck logs in as the PING-only user.
    check = " ".join(service["healthcheck"]["test"])
    assert "redis-cli" in check
    assert "--user fedq-health" in check
    assert "--tls --cacert /usr/local/etc/redis/tls/ca.crt" in check
    assert check.split("|")[0].split()[-1] == "ping"


def test_compose_named_volumes_are_declared() -> None:
    declared = set(compose().get("volumes") or {})
    for service in ("rabbitmq", "redis"):
        for source, _ in mounts(service):
            if not source.startswith((".", "/")):
                assert source in declared, source


# --------------------------------------------------------------------------- documents


@pytest.mark.parametrize(
    "path",
    [BROKER_CONFIG / "README.md", RABBITMQ_CONF, REDIS_CONF, REDIS_USERS, DEFINITIONS, COMPOSE],
)
def test_config_documents_describe_the_project_as_it_is(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert "DESIGN.md" not in text  # not in the repository
    assert "later issue" not in text.lower()
    assert "chunked" not in text  # fedq has no chunking


def test_readme_matches_the_shipped_redis_and_work_queue() -> None:
    text = (BROKER_CONFIG / "README.md").read_text(encoding="utf-8")
    assert "everysec" not in text
    assert "`appendfsync always`" in text
    assert "no `x-overflow`" not in text
    for name in (AUDITOR, "fedq-health"):
        assert f"`{name}`" in text, name
