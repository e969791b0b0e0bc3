"""godwit pki: a private CA and host certificates that TLS 1.3 mutual auth accepts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agents import pki


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    d = tmp_path / "pki"
    pki.init_ca(d)
    return d


def test_ca_is_a_p256_ca_that_signs_hosts_only(ca_dir: Path) -> None:
    assert _mode(ca_dir / "ca.key") == 0o600
    assert _mode(ca_dir / "ca.pem") == 0o644
    assert _mode(ca_dir) == 0o700
    ca = _cert(ca_dir / "ca.pem")
    key = ca.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    ca.verify_directly_issued_by(ca)  # self-signed


def test_init_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    before = (ca_dir / "ca.pem").read_bytes()
    with pytest.raises(pki.PKIError, match=r"ca\.pem exists already.*--force"):
        pki.init_ca(ca_dir)
    assert (ca_dir / "ca.pem").read_bytes() == before
    pki.init_ca(ca_dir, force=True)
    assert (ca_dir / "ca.pem").read_bytes() != before
    assert _mode(ca_dir / "ca.key") == 0o600


def test_host_certificate_has_sans_both_ekus_and_the_ca_as_authority(ca_dir: Path) -> None:
    cert_path, key_path = pki.issue_cert(
        ca_dir, "dst-1", dns=["dst-1.lab", "localhost"], ips=["127.0.0.1", "::1"]
    )
    assert (cert_path, key_path) == (ca_dir / "dst-1.pem", ca_dir / "dst-1.key")
    assert _mode(key_path) == 0o600
    cert, ca = _cert(cert_path), _cert(ca_dir / "ca.pem")
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dst-1", "dst-1.lab", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=824) < lifetime <= dt.timedelta(days=825)


def test_an_ip_name_becomes_an_ip_san(ca_dir: Path) -> None:
    cert_path, _ = pki.issue_cert(ca_dir, "10.0.0.7")
    san = _cert(cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]


def test_issue_refuses_to_overwrite_without_force(ca_dir: Path) -> None:
    pki.issue_cert(ca_dir, "src")
    before = (ca_dir / "src.key").read_bytes()
    with pytest.raises(pki.PKIError, match=r"src\.(pem|key) exists already"):
        pki.issue_cert(ca_dir, "src")
    assert (ca_dir / "src.key").read_bytes() == before
    pki.issue_cert(ca_dir, "src", force=True)
    assert (ca_dir / "src.key").read_bytes() != before


@pytest.mark.parametrize(
    "name", ["", "../evil", "a/b", "a\\b", ".hidden", "ca", "x" * 65, "sp ace"]
)
def test_names_that_are_not_plain_file_names_are_refused(ca_dir: Path, name: str) -> None:
    with pytest.raises(pki.PKIError, match="not usable"):
        pki.issue_cert(ca_dir, name)
    assert sorted(p.name for p in ca_dir.iterdir()) == ["ca.key", "ca.pem"]


def test_bad_sans_are_refused(ca_dir: Path) -> None:
    with pytest.raises(pki.PKIError, match="not an IP address"):
        pki.issue_cert(ca_dir, "h", ips=["300.1.1.1"])
    with pytest.raises(pki.PKIError, match="not a DNS name"):
        pki.issue_cert(ca_dir, "h", dns=["bad name"])


def test_issue_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"ca\.pem is missing.*godwit pki init"):
        pki.issue_cert(tmp_path, "h")


def test_load_identity_names_the_missing_file_and_the_command(ca_dir: Path) -> None:
    with pytest.raises(pki.PKIError, match=r"ghost\.pem.*`godwit pki issue .* ghost`"):
        pki.load_identity(ca_dir, "ghost")
    with pytest.raises(pki.PKIError, match=r"ca\.pem is missing.*`godwit pki init"):
        pki.load_identity(ca_dir.parent / "nowhere", "ghost")
    pki.issue_cert(ca_dir, "h")
    (ca_dir / "h.key").unlink()
    with pytest.raises(pki.PKIError, match=r"h\.key for host 'h' is missing"):
        pki.load_identity(ca_dir, "h")


def test_load_identity_refuses_material_that_does_not_fit(ca_dir: Path, tmp_path: Path) -> None:
    pki.issue_cert(ca_dir, "a")
    pki.issue_cert(ca_dir, "b")
    (ca_dir / "a.key").write_bytes((ca_dir / "b.key").read_bytes())
    with pytest.raises(pki.PKIError, match=r"a\.key is not the key of .*a\.pem"):
        pki.load_identity(ca_dir, "a")

    other = tmp_path / "other"
    pki.init_ca(other)
    pki.issue_cert(other, "b")
    for suffix in (".pem", ".key"):
        (ca_dir / f"b{suffix}").write_bytes((other / f"b{suffix}").read_bytes())
    with pytest.raises(pki.PKIError, match=r"b\.pem was not signed by the CA"):
        pki.load_identity(ca_dir, "b")


def test_load_identity_points_at_the_files(ca_dir: Path) -> None:
    pki.issue_cert(ca_dir, "src")
    ident = pki.load_identity(ca_dir, "src")
    assert ident == pki.Identity("src", ca_dir / "ca.pem", ca_dir / "src.pem", ca_dir / "src.key")


def test_describe_lists_the_ca_first_with_sans_and_expiry(ca_dir: Path) -> None:
    pki.issue_cert(ca_dir, "zeta", ips=["192.0.2.1"])
    pki.issue_cert(ca_dir, "alpha", dns=["alpha.lab"], days=30)
    infos = pki.describe(ca_dir)
    assert [i.name for i in infos] == ["ca", "alpha", "zeta"]
    ca, alpha, zeta = infos
    assert ca.is_ca and not alpha.is_ca and ca.has_key
    assert alpha.subject == "CN=alpha,O=godwit" and alpha.issuer == ca.subject
    assert alpha.dns_names == ("alpha", "alpha.lab")
    assert zeta.ip_addresses == ("192.0.2.1",)
    assert not alpha.expired
    assert alpha.not_after < zeta.not_after < ca.not_after
