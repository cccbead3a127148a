"""TLS and credentials of the server URLs, and the files a deployment needs for them.

URLs carry every TLS setting (no separate options):

* RabbitMQ: ``amqps://USER:PASSWORD@HOST:5671/fedq?cafile=CA&certfile=CRT&keyfile=KEY``
  (aio-pika's query options);
* Redis: ``rediss://USER:PASSWORD@HOST:6379/0?ssl_ca_certs=CA&ssl_certfile=CRT&ssl_keyfile=KEY``
  (redis-py's).

The server's certificate is always verified, chain and host name: there is no way to
turn that off (a URL that tries, with ``no_verify_ssl``, ``ssl_cert_reqs`` other than
``required`` or ``ssl_check_hostname=false``, is refused; give the CA with ``cafile=`` /
``ssl_ca_certs=`` instead). Without a CA in the URL the system's trust store is used.
The client certificate is optional (the servers shipped in broker_config/ accept a
password login over TLS, and verify a client certificate when one is presented).

:func:`url_problem` is what connecting checks (TLS settings and their files);
:func:`check_url` is what the ``fedq`` command line checks on top (placeholder
passwords). :func:`make_certificates` writes a CA, a server certificate and client
certificates (``scripts/make-certs``); :func:`render_redis_acl` writes Redis's ACL
file from broker_config/redis-users.acl with real passwords (``scripts/redis-acl``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from common.errors import ConfigError
from common.urls import redact_url

#: Query keys naming files, per scheme (the TLS form and the plain form share them).
_FILE_KEYS = {
    "amqp": ("cafile", "capath", "certfile", "keyfile"),
    "redis": ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile"),
}
_TLS_SCHEMES = {"amqps": "amqp", "rediss": "redis"}

#: What the shipped files and documents use where a password must go. A password that
#: contains one of these (any case) was never set: fedq refuses to start with it.
PLACEHOLDERS = ("change-me", "change_me", "changeme", "<password>", "password-here")

#: Host names and addresses the server certificate of :func:`make_certificates` is for.
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "rabbitmq", "redis")


def _query(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    values = parse_qs(parts.query, keep_blank_values=True)
    repeated = sorted(k for k, v in values.items() if len(v) > 1)
    if repeated:
        # Client libraries disagree on which of several values wins: never guess.
        raise _RepeatedError(repeated[0])
    return parts.scheme.lower(), {k: v[0] for k, v in values.items()}


class _RepeatedError(ValueError):
    """A query key given more than once."""


def _verification_off(scheme: str, query: Mapping[str, str]) -> str | None:
    if scheme == "amqps" and query.get("no_verify_ssl", "0") != "0":
        return "no_verify_ssl"
    if scheme == "rediss":
        if query.get("ssl_cert_reqs", "required").lower() != "required":
            return f"ssl_cert_reqs={query['ssl_cert_reqs']}"
        if query.get("ssl_check_hostname", "true").lower() in ("false", "0", "no", "off", "n"):
            return "ssl_check_hostname=false"
    return None


def _unreadable(path: str) -> str | None:
    try:
        if Path(path).is_dir():
            os.listdir(path)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except OSError as e:
        return e.strerror or str(e)
    return None


def url_problem(url: str) -> str | None:
    """Why ``url``'s TLS settings cannot be used (one line), or None when they can.

    Refused: TLS settings on a plaintext URL (``amqp://``, ``redis://``: they would be
    ignored and the connection would go in clear), turning server verification off, a
    key without its certificate, a file that cannot be read. URLs of other schemes
    (``memory://``) pass.
    """
    try:
        scheme, query = _query(url)
    except _RepeatedError as e:
        return f"{redact_url(url)} gives the option {e} more than once"
    except ValueError:
        return None  # the client library says what is wrong with the URL itself
    family = _TLS_SCHEMES.get(scheme, scheme)
    keys = _FILE_KEYS.get(family)
    if keys is None:
        return None
    shown = redact_url(url)
    given = [k for k in keys if query.get(k)]
    if scheme == family and given:
        return (
            f"{given[0]}= is given but {shown} is not a TLS URL: use "
            f"{family}s:// (plaintext would ignore the certificates)"
        )
    off = _verification_off(scheme, query)
    if off is not None:
        return (
            f"{off} in {shown} turns off the verification of the server's certificate, "
            f"which fedq never does: give the CA that signed it instead ({keys[0]}=)"
        )
    if query.get(keys[3]) and not query.get(keys[2]):
        return f"{keys[3]}= without {keys[2]}= in {shown}: give the client certificate too"
    for key in given:
        why = _unreadable(unquote(query[key]))
        if why is not None:
            return f"cannot read the TLS file {key}={query[key]} of {shown}: {why}"
    return None


def placeholder_problem(url: str) -> str | None:
    """Why ``url``'s password is a placeholder that was never replaced, or None."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password is None:
        return None
    lowered = unquote(password).lower()
    for marker in PLACEHOLDERS:
        if marker in lowered:
            return (
                f"the password of {parts.username or 'the user'} in {redact_url(url)} is "
                f"the placeholder {marker!r}: set a real password on the server and give "
                "it here (broker_config/README.md, Passwords)"
            )
    return None


def check_url(url: str, option: str) -> None:
    """Refuse (ConfigError, one line) a URL given as ``option`` that fedq must not use."""
    problem = placeholder_problem(url) or url_problem(url)
    if problem is not None:
        raise ConfigError(f"{option}: {problem}")


# ------------------------------------------------------------------ deployment files


@dataclass(frozen=True)
class Certificates:
    """Paths of the PEM files :func:`make_certificates` wrote (keys are mode 0600)."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: Mapping[str, tuple[Path, Path]]  # name -> (certificate, key)


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o600 if private else 0o644)
    os.replace(tmp, path)


def _key_usage(*, ca: bool) -> Any:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_key(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return data


def _pem_cert(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    data: bytes = cert.public_bytes(serialization.Encoding.PEM)
    return data


def _name(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _load_or_make_ca(out: Path, days: int, now: dt.datetime) -> tuple[Any, Any]:
    """(certificate, key) of the CA in ``out``, made (10 years at least) if missing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    cert_path, key_path = out / "ca.crt", out / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_path} is not an EC key written by make-certs")
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedq CA"))
        .issuer_name(_name("fedq CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=max(days, 3650)))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _pem_key(key), private=True)
    _write(cert_path, _pem_cert(cert), private=False)
    return cert, key


def _sans(hosts: Sequence[str]) -> list[Any]:
    from cryptography import x509

    out: list[Any] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _leaf(
    ca: tuple[Any, Any], name: str, hosts: Sequence[str], days: int, now: dt.datetime
) -> tuple[bytes, bytes]:
    """(certificate, key) PEMs: a server certificate for ``hosts``, or a client's if none."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_sans(hosts)), False)
    return _pem_cert(builder.sign(ca_key, hashes.SHA256())), _pem_key(key)


def make_certificates(
    out: Path,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    clients: Sequence[str] = (),
    days: int = 825,
    server: bool = True,
) -> Certificates:
    """Write a CA, a server certificate for ``hosts`` and a client certificate per name.

    Files in ``out``: ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``, and
    ``<name>.crt`` / ``<name>.key`` per client (its certificate's CN is the name, the
    broker user it is for). Keys are ECDSA P-256, PEM, mode 0600. An existing CA
    (``ca.crt`` and ``ca.key``) is reused, so clients can be added later; the server
    certificate is written when ``server`` is true or when there is none.
    """
    for name in clients:
        if not name or name in ("ca", "server") or "/" in name or name.startswith("."):
            raise ConfigError(f"client name {name!r} cannot be a certificate's file name")
    if days < 1:
        raise ConfigError("days must be at least 1")
    if not hosts:
        raise ConfigError("the server certificate needs at least one host name or address")
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca = _load_or_make_ca(out, days, now)
    written = [(n, _leaf(ca, n, (), days, now)) for n in clients]
    if server or not (out / "server.crt").exists():
        written.append(("server", _leaf(ca, hosts[0], hosts, days, now)))
    for stem, (cert, key) in written:
        _write(out / f"{stem}.key", key, private=True)
        _write(out / f"{stem}.crt", cert, private=False)
    return Certificates(
        directory=out,
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        clients={name: (out / f"{name}.crt", out / f"{name}.key") for name in clients},
    )


def render_redis_acl(template: str, passwords: Mapping[str, str]) -> str:
    """Redis's ACL file: ``template``'s ``user`` lines, each with its password's SHA-256.

    ``template`` is broker_config/redis-users.acl: the users and their rights, without
    passwords, with comments (which an ACL file may not hold, so the template itself is
    refused by Redis). A user given no password here gets none: nobody can log in as
    it. Only the hash (``#<sha256>``) is written, never the password.
    """
    users: list[list[str]] = []
    for raw in template.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] != "user" or len(words) < 2:
            raise ConfigError(f"not an ACL user line: {raw.strip()!r}")
        users.append(words)
    names = {w[1] for w in users}
    unknown = sorted(set(passwords) - names)
    if unknown:
        raise ConfigError(f"no such user in the ACL template: {', '.join(unknown)}")
    lines = []
    for words in users:
        password = passwords.get(words[1])
        if password is not None:
            if "nopass" in words:
                raise ConfigError(f"user {words[1]} takes no password (nopass)")
            if not password or any(m in password.lower() for m in PLACEHOLDERS):
                raise ConfigError(f"the password of {words[1]} is empty or a placeholder")
            words = [*words, "#" + hashlib.sha256(password.encode()).hexdigest()]
        lines.append(" ".join(words) + "\n")
    return "".join(lines)


def write_redis_acl(template: Path, out: Path, passwords: Mapping[str, str]) -> list[str]:
    """Write :func:`render_redis_acl` to ``out`` (mode 0600); the users left without a password.

    Those are the users that are ``on`` but neither ``nopass`` nor given a password:
    nobody can log in as them.
    """
    text = render_redis_acl(template.read_text(encoding="utf-8"), passwords)
    _write(out, text.encode(), private=True)
    unset = []
    for line in text.splitlines():
        words = line.split()
        if "on" in words and "nopass" not in words and not any(w[0] in "#>" for w in words):
            unset.append(words[1])
    return unset
