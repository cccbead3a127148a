"""``fedq keys``: Ed25519 key pairs for participants and the aggregator, and the X25519
agreement key each one implies (secure aggregation, common/agreement.py)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from common.agreement import AgreementKey
from common.errors import ConfigError
from common.signing import SigningKey
from fedq.cli_common import FILE


@click.group()
def keys() -> None:
    """Signing keys (Ed25519): every update, model and receipt is signed.

    Each signing key also implies an agreement key (X25519, derived from it: no second
    file), which secure aggregation uses for the pairwise masks between banks.
    """


@keys.command("generate")
@click.option(
    "--out",
    "out",
    required=True,
    type=FILE,
    help="Private key file to write (PEM, mode 0600); the public key goes to OUT.pub.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def generate(out: Path, force: bool) -> None:
    """Write a new key pair and print the public key, its fingerprint and the agreement key.

    The public key (``ed25519:`` + 64 hex digits) goes into the task spec:
    ``identity.participant_keys.<participant>`` for a bank, ``identity.aggregator_key``
    for the aggregator. A bank's agreement key (``x25519:`` + 64 hex digits, derived
    from the same private key) goes to ``identity.agreement_keys.<participant>`` for
    secure aggregation. The private key never leaves its owner.
    """
    key = SigningKey.generate()
    public = out.with_name(out.name + ".pub")
    for path in (out, public):
        if path.exists() and not force:
            raise ConfigError(f"{path} exists; pass --force to overwrite it")
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        fd = os.open(out, flags, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_pem())
        os.chmod(out, 0o600)
        public.write_text(key.public.text + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write the key pair: {e.strerror or e}") from None
    click.echo(f"private key: {out}")
    _echo_public(key)


@keys.command("show")
@click.argument("path", type=FILE)
def show(path: Path) -> None:
    """Print the public key, fingerprint and agreement key of a private key file.

    The agreement key goes to ``identity.agreement_keys.<participant>`` (secure
    aggregation); the public key to ``identity.participant_keys.<participant>``.
    """
    _echo_public(SigningKey.load(path))


def _echo_public(key: SigningKey) -> None:
    click.echo(f"public key:  {key.public.text}")
    click.echo(f"fingerprint: {key.public.fingerprint}")
    click.echo(f"agreement key: {AgreementKey.from_signing_key(key).public.text}")
