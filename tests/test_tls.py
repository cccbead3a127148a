"""TLS on every link, and no usable default password.

Private RabbitMQ and Redis run the shipped broker_config/ files (TLS only, certificates
this test run made with scripts/make-certs's function): the aggregator's store and a
bank's transport connect over TLS and verify the server; a client trusting another CA
is refused, a client certificate is accepted (one from another CA is not), plaintext
to a TLS port fails. Without the operator's password step Redis refuses to start and
says why; ``fedq`` refuses a placeholder password or a URL that turns verification
off, on one line.
"""

from __future__ import annotations

import hashlib
import ssl
import stat
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from click.testing import CliRunner
from cryptography import x509

from aggregator.store import RedisModelStore, connect_redis
from common.errors import ConfigError, StoreError, TransportError
from common.tls import check_url, make_certificates, render_redis_acl, url_problem
from common.transport.amqp import AmqpTransport
from fedq.cli import main
from tests.servers import (  # noqa: F401
    AGGREGATOR,
    BROKER_CONFIG,
    PrivateRabbit,
    PrivateRedis,
    ServerExitedError,
    private_rabbit_fixture,
    private_redis_fixture,
    test_certificates,
)

BANK = "bank-a"


def _with(url: str, **query: str) -> str:
    """``url`` with its query replaced by ``query``."""
    base = url.split("?", 1)[0]
    return base + "?" + "&".join(f"{k}={quote(v, safe='/')}" for k, v in query.items())


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Certificates from a CA the servers do not know (a bank client among them)."""
    out = tmp_path_factory.mktemp("other-ca")
    make_certificates(out, hosts=("127.0.0.1",), clients=(BANK, AGGREGATOR))
    return out


# ------------------------------------------------------------------ no server needed


def test_make_certificates_writes_a_ca_server_and_clients(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path, clients=(BANK,))
    for key in (certs.ca_key, certs.server_key, certs.clients[BANK][1]):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "rabbitmq", "redis"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client = x509.load_pem_x509_certificate(certs.clients[BANK][0].read_bytes())
    assert client.subject.rfc4514_string() == f"CN={BANK}"
    # Python's verification accepts the chain (as the servers and clients will).
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    ctx.load_cert_chain(str(certs.clients[BANK][0]), str(certs.clients[BANK][1]))
    # Run again to add a client: the CA stays, the new client is signed by it.
    ca = certs.ca_cert.read_bytes()
    more = make_certificates(tmp_path, clients=("bank-c",), server=False)
    assert more.ca_cert.read_bytes() == ca
    new = x509.load_pem_x509_certificate(more.clients["bank-c"][0].read_bytes())
    assert new.issuer == client.issuer
    with pytest.raises(ConfigError):
        make_certificates(tmp_path, clients=("../x",))


def test_redis_acl_from_the_shipped_template_holds_hashes_only() -> None:
    template = (BROKER_CONFIG / "redis-users.acl").read_text(encoding="utf-8")
    text = render_redis_acl(template, {AGGREGATOR: "s3cret-a", "fedq-auditor": "s3cret-b"})
    assert "#" + hashlib.sha256(b"s3cret-a").hexdigest() in text
    assert "s3cret" not in text and ">" not in text
    assert all(line.startswith("user ") for line in text.splitlines())
    # Without a password a user keeps none: nobody can log in as it.
    bare = render_redis_acl(template, {})
    assert not [w for w in bare.split() if w.startswith(("#", ">"))]
    for bad in ({AGGREGATOR: "CHANGE_ME"}, {AGGREGATOR: ""}, {"nobody": "x"}):
        with pytest.raises(ConfigError):
            render_redis_acl(template, bad)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("amqps://bank-a:x@h:5671/fedq?no_verify_ssl=1", "no_verify_ssl"),
        ("rediss://u:x@h:6379/0?ssl_cert_reqs=none", "ssl_cert_reqs=none"),
        ("rediss://u:x@h:6379/0?ssl_check_hostname=false", "ssl_check_hostname"),
        ("amqp://bank-a:x@h:5672/fedq?cafile=/etc/hosts", "not a TLS URL"),
        ("redis://u:x@h:6379/0?ssl_ca_certs=/etc/hosts", "not a TLS URL"),
        ("amqps://bank-a:x@h:5671/fedq?cafile=/nonexistent/ca.crt", "cannot read"),
        ("amqps://bank-a:x@h:5671/fedq?keyfile=/etc/hosts", "without certfile"),
    ],
)
def test_url_problems(url: str, words: str) -> None:
    problem = url_problem(url)
    assert problem is not None and words in problem
    assert "\n" not in problem
    assert ":x@" not in problem  # the password is never shown


def test_good_urls_pass() -> None:
    ca = str(test_certificates().ca_cert)
    for url in (
        "amqp://guest:guest@127.0.0.1:5672/",
        f"amqps://bank-a:pw@h:5671/fedq?cafile={ca}",
        f"rediss://u:pw@h:6379/0?ssl_ca_certs={ca}",
        "rediss://u:pw@h:6379/0",  # the system's trust store
        "memory://",
    ):
        assert url_problem(url) is None, url
        check_url(url, "--x")


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "show", "--task", "t", "--version", "1", "--redis-url",
         "rediss://fedq-auditor:CHANGE_ME@127.0.0.1:6379/0"],
        ["participant", "run", "--spec", "task.json", "--participant", "bank-a",
         "--data", "d.csv", "--amqp-url", "amqps://bank-a:change-me-bank-a@127.0.0.1/fedq"],
        ["audit", "show", "--task", "t", "--version", "1", "--redis-url",
         "rediss://fedq-auditor:pw@127.0.0.1:6379/0?ssl_cert_reqs=none"],
    ],
)  # fmt: skip
def test_fedq_refuses_placeholders_and_unverified_tls_on_one_line(argv: list[str]) -> None:
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "placeholder" in lines[0] or "verification" in lines[0]
    assert "Traceback" not in result.output
    assert "CHANGE_ME" not in result.output and "change-me-bank-a" not in result.output


# ------------------------------------------------------------------------ Redis


@pytest.mark.real
@pytest.mark.slow
async def test_store_connects_over_tls_and_verifies_the_server(
    private_redis: PrivateRedis, other_ca: Path
) -> None:
    assert private_redis.url.startswith("rediss://")
    store = RedisModelStore(connect_redis(private_redis.url))
    try:
        assert await store.head("tls-check") is None
    finally:
        await store.close()
    # A client that trusts another CA refuses the server.
    wrong = RedisModelStore(
        connect_redis(_with(private_redis.url, ssl_ca_certs=str(other_ca / "ca.crt")))
    )
    try:
        with pytest.raises(StoreError, match="certificate verify failed"):
            await wrong.head("tls-check")
    finally:
        await wrong.close()


@pytest.mark.real
@pytest.mark.slow
async def test_redis_accepts_a_client_certificate_of_its_ca_only(
    private_redis: PrivateRedis, other_ca: Path
) -> None:
    cert, key = private_redis.certs.clients[AGGREGATOR]
    ca = str(private_redis.certs.ca_cert)
    store = RedisModelStore(
        connect_redis(
            _with(private_redis.url, ssl_ca_certs=ca, ssl_certfile=str(cert), ssl_keyfile=str(key))
        )
    )
    try:
        assert await store.head("tls-check") is None
    finally:
        await store.close()
    foreign = _with(
        private_redis.url,
        ssl_ca_certs=ca,
        ssl_certfile=str(other_ca / f"{AGGREGATOR}.crt"),
        ssl_keyfile=str(other_ca / f"{AGGREGATOR}.key"),
    )
    store = RedisModelStore(connect_redis(foreign))
    try:
        with pytest.raises(StoreError):
            await store.head("tls-check")
    finally:
        await store.close()


@pytest.mark.real
@pytest.mark.slow
def test_redis_has_no_plaintext_port(private_redis: PrivateRedis) -> None:
    password = private_redis.passwords[AGGREGATOR]
    with (
        redis.Redis(
            host="127.0.0.1",
            port=private_redis.port,
            username=AGGREGATOR,
            password=password,
            socket_timeout=5.0,
        ) as plain,
        pytest.raises(redis.exceptions.ConnectionError),
    ):
        plain.ping()
    with private_redis.client() as tls:
        assert tls.ping()


@pytest.mark.real
@pytest.mark.slow
def test_missing_tls_file_is_a_clear_store_error(private_redis: PrivateRedis) -> None:
    with pytest.raises(StoreError, match="cannot read the TLS file ssl_ca_certs=") as err:
        connect_redis(_with(private_redis.url, ssl_ca_certs="/nonexistent/ca.crt"))
    assert private_redis.passwords[AGGREGATOR] not in str(err.value)


@pytest.mark.real
@pytest.mark.slow
def test_redis_without_the_operators_acl_file_refuses_to_start(tmp_path: Path) -> None:
    """No ACL file (the operator never set passwords), or the template as it is: no start."""
    server = PrivateRedis(base_dir=tmp_path / "missing")
    try:
        server.acl_file.unlink()
        with pytest.raises(ServerExitedError, match="No such file or directory"):
            server.start(timeout=20)
    finally:
        server.close()
    server = PrivateRedis(base_dir=tmp_path / "template")
    try:
        server.acl_file.write_bytes((BROKER_CONFIG / "redis-users.acl").read_bytes())
        with pytest.raises(ServerExitedError, match="ACL"):
            server.start(timeout=20)
    finally:
        server.close()


# --------------------------------------------------------------------- RabbitMQ


@pytest.mark.real
@pytest.mark.slow
async def test_bank_transport_connects_over_tls_and_verifies_the_server(
    private_rabbit: PrivateRabbit, other_ca: Path
) -> None:
    url = private_rabbit.url_for(BANK)
    assert url.startswith("amqps://")
    transport = await AmqpTransport.connect(url, name="tls-bank")
    await transport.close()
    with pytest.raises(TransportError, match="CERTIFICATE_VERIFY_FAILED"):
        await AmqpTransport.connect(
            _with(url, cafile=str(other_ca / "ca.crt")), name="tls-wrong-ca", connect_timeout=10
        )


@pytest.mark.real
@pytest.mark.slow
async def test_rabbit_accepts_a_client_certificate_of_its_ca_only(
    private_rabbit: PrivateRabbit, other_ca: Path
) -> None:
    url = private_rabbit.url_for(BANK)
    ca = str(private_rabbit.certs.ca_cert)
    cert, key = private_rabbit.certs.clients[BANK]
    transport = await AmqpTransport.connect(
        _with(url, cafile=ca, certfile=str(cert), keyfile=str(key)), name="tls-client-cert"
    )
    await transport.close()
    foreign = _with(
        url,
        cafile=ca,
        certfile=str(other_ca / f"{BANK}.crt"),
        keyfile=str(other_ca / f"{BANK}.key"),
    )
    with pytest.raises(TransportError):
        await AmqpTransport.connect(foreign, name="tls-foreign-cert", connect_timeout=10)


@pytest.mark.real
@pytest.mark.slow
async def test_rabbit_has_no_plaintext_port(private_rabbit: PrivateRabbit) -> None:
    plain = private_rabbit.url_for(BANK).split("?", 1)[0].replace("amqps://", "amqp://", 1)
    with pytest.raises(TransportError, match="cannot connect"):
        await AmqpTransport.connect(plain, name="tls-plaintext", connect_timeout=10)


@pytest.mark.real
@pytest.mark.slow
async def test_missing_tls_file_is_a_clear_transport_error(private_rabbit: PrivateRabbit) -> None:
    url = _with(private_rabbit.url_for(BANK), cafile="/nonexistent/ca.crt")
    with pytest.raises(TransportError, match="cannot read the TLS file cafile=") as err:
        await AmqpTransport.connect(url, name="tls-missing")
    assert private_rabbit.passwords[BANK] not in str(err.value)
