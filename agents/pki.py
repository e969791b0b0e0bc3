"""godwit's private PKI: one EC P-256 CA per deployment and host certificates it signs.

Every channel between agents (and the control socket over TCP) is mutual
TLS 1.3, verified against this CA only — never the system trust store — so a
certificate from anywhere else is refused. A host certificate carries both
serverAuth and clientAuth because the same agent dials (source) and listens
(destination). Keys are written 0600 and a file is never replaced unless the
caller says ``force``: silently re-keying a CA would orphan every host
certificate it signed.

Layout of a PKI directory::

    DIR/ca.pem  DIR/ca.key          the CA (``godwit pki init DIR``)
    DIR/NAME.pem  DIR/NAME.key      a host (``godwit pki issue DIR NAME``)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .identity import Identity

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CertInfo",
    "Identity",
    "PKIError",
    "describe",
    "init_ca",
    "issue_cert",
    "load_identity",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CA_DAYS = 3650
# Backdate notBefore a little so a peer whose clock is slightly behind accepts
# a certificate issued a moment ago.
CLOCK_SKEW = dt.timedelta(minutes=5)
# A host name becomes a file name and the certificate's CN (at most 64 chars).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_RESERVED_NAMES = {"ca"}


class PKIError(Exception):
    """A PKI file is missing, exists already, or does not fit the CA."""


@dataclass(frozen=True)
class CertInfo:
    """One certificate of a PKI directory, as ``godwit pki list`` shows it."""

    name: str
    path: Path
    subject: str
    issuer: str
    is_ca: bool
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int
    sha256: str
    has_key: bool

    @property
    def expired(self) -> bool:
        return self.not_after < dt.datetime.now(dt.UTC)


def init_ca(directory: Path, *, force: bool = False, common_name: str = "godwit CA") -> Path:
    """Create the CA in ``directory`` (made 0700 if missing); return the path of ca.pem.

    pathlen 0: the CA signs host certificates only, never another CA.
    """
    directory = Path(directory)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not force:
        _refuse_existing([cert_path, key_path], f"godwit pki init {directory} --force")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "godwit"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    # Key first: a ca.pem without its key would look like a usable CA.
    _write(key_path, _key_pem(key), 0o600, replace=force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=force)
    return cert_path


def issue_cert(
    directory: Path,
    name: str,
    *,
    dns: Iterable[str] = (),
    ips: Iterable[str] = (),
    force: bool = False,
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue a host certificate for ``name`` signed by the CA in ``directory``.

    ``name`` is the CN and, unless it is an IP address, also a DNS SAN (an IP
    ``name`` becomes an IP SAN): a peer dialling the host by the name it was
    issued under must match. ``not_before`` exists for tests and labs that need
    a not-yet-valid or already-expired certificate. Returns (cert, key) paths.
    """
    directory = Path(directory)
    _check_name(name)
    if days < 1:
        raise PKIError(f"certificate for {name!r}: days must be >= 1, got {days}")
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if not force:
        _refuse_existing([cert_path, key_path], f"godwit pki issue {directory} {name} --force")
    ca_cert, ca_key = _load_ca(directory)

    dns_names: list[str] = []
    ip_addrs: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    try:
        ip_addrs.append(ipaddress.ip_address(name))
    except ValueError:
        dns_names.append(name)
    for d in dns:
        _check_dns(d, name)
        if d not in dns_names:
            dns_names.append(d)
    for raw in ips:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            raise PKIError(f"certificate for {name!r}: {raw!r} is not an IP address") from None
        if ip not in ip_addrs:
            ip_addrs.append(ip)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addrs]

    key = ec.generate_private_key(ec.SECP256R1())
    start = (not_before or dt.datetime.now(dt.UTC) - CLOCK_SKEW).astimezone(dt.UTC)
    end = min(start + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "godwit"),
                    x509.NameAttribute(NameOID.COMMON_NAME, name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600, replace=force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, replace=force)
    return cert_path, key_path


def load_identity(directory: Path, name: str) -> Identity:
    """Find ``name``'s TLS material in ``directory`` and check that it fits together.

    Checked here rather than left to OpenSSL so the error says which file and
    which command fixes it, instead of a bare "key values mismatch".
    """
    directory = Path(directory)
    _check_name(name)
    ident = Identity(
        name=name,
        ca_path=directory / CA_CERT,
        cert_path=directory / f"{name}.pem",
        key_path=directory / f"{name}.key",
    )
    if not ident.ca_path.is_file():
        raise PKIError(
            f"CA certificate {ident.ca_path} is missing: make it with `godwit pki init {directory}`"
        )
    for path in (ident.cert_path, ident.key_path):
        if not path.is_file():
            raise PKIError(
                f"{path} for host {name!r} is missing: make it with "
                f"`godwit pki issue {directory} {name}`"
            )
    ca = _read_cert(ident.ca_path)
    cert = _read_cert(ident.cert_path)
    key = _read_key(ident.key_path)
    if cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise PKIError(
            f"{ident.key_path} is not the key of {ident.cert_path}: re-issue with "
            f"`godwit pki issue {directory} {name} --force`"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise PKIError(
            f"{ident.cert_path} was not signed by the CA {ident.ca_path} "
            f"({exc or type(exc).__name__}): "
            f"re-issue with `godwit pki issue {directory} {name} --force`"
        ) from None
    return ident


def describe(directory: Path) -> list[CertInfo]:
    """Every certificate in ``directory``, the CA first, then hosts by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PKIError(f"PKI directory {directory} does not exist: `godwit pki init {directory}`")
    paths = sorted(directory.glob("*.pem"), key=lambda p: (p.name != CA_CERT, p.name))
    infos = []
    for path in paths:
        cert = _read_cert(path)
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_names = tuple(san.get_values_for_type(x509.DNSName))
            ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
        except x509.ExtensionNotFound:
            dns_names, ips = (), ()
        try:
            is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        infos.append(
            CertInfo(
                name=path.stem,
                path=path,
                subject=cert.subject.rfc4514_string(),
                issuer=cert.issuer.rfc4514_string(),
                is_ca=is_ca,
                dns_names=dns_names,
                ip_addresses=ips,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                serial=cert.serial_number,
                sha256=cert.fingerprint(hashes.SHA256()).hex(":"),
                has_key=path.with_suffix(".key").is_file(),
            )
        )
    return infos


# ---------------------------------------------------------------- internals


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or name.lower() in _RESERVED_NAMES:
        raise PKIError(
            f"host name {name!r} is not usable: it becomes a file name and a CN, so it must "
            "be 1-64 characters of letters, digits, '.', '_' or '-', start with a letter "
            "or digit, and not be 'ca'"
        )


def _check_dns(d: str, name: str) -> None:
    labels = d.split(".")
    ok = 0 < len(d) <= 253 and all(
        re.fullmatch(r"(\*|[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)", label)
        for label in labels
    )
    if not ok:
        raise PKIError(f"certificate for {name!r}: {d!r} is not a DNS name")


def _refuse_existing(paths: Sequence[Path], fix: str) -> None:
    for path in paths:
        if path.exists():
            raise PKIError(f"{path} exists already; refusing to overwrite it (use `{fix}`)")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    """Write atomically with ``mode`` from the first byte (never briefly world-readable).

    Without ``replace`` the file is linked into place, which fails if another
    process created it meanwhile, rather than clobbering it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise PKIError(f"{path} exists already; refusing to overwrite it") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as exc:
        raise PKIError(f"{path} is not a PEM certificate: {exc}") from None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise PKIError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path} holds a {type(key).__name__}, not an EC key")
    return key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise PKIError(
                f"CA file {path} is missing: make the CA with `godwit pki init {directory}`"
            )
    return _read_cert(cert_path), _read_key(key_path)
