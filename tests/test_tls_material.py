"""TLS material: CRL files holding several CRLs, and CAs that no CRL covers (sans sockets)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mbsec.pki.ca import CertificateAuthority
from mbsec.settings import TlsSettings
from mbsec.tls import TlsConfigError, build_material


@pytest.fixture(scope="module")
def ica(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertificateAuthority, Path]:
    d = tmp_path_factory.mktemp("ica")
    ca = CertificateAuthority.init(d / "ca", common_name="Plant CA", intermediate=True)
    ca.issue("server", "proxy", dns=("localhost",), out_dir=d, name="srv")
    victim = ca.issue("client", "hmi", role="operator", out_dir=d, name="hmi")
    ca.revoke(victim.serial, reason="key_compromise")
    return ca, d


def _settings(d: Path, ca: CertificateAuthority, crl: list[Path]) -> TlsSettings:
    return TlsSettings(cert=d / "srv-chain.pem", key=d / "srv.key",
                       client_ca=ca.trust_bundle, crl=crl)


def test_every_crl_of_a_multi_crl_pem_file_is_loaded(
    ica: tuple[CertificateAuthority, Path],
) -> None:
    ca, d = ica
    crl = ca.write_crl(d / "crl.pem")  # the intermediate's CRL, then the root's
    material = build_material(_settings(d, ca, [crl]))
    assert len(material.crls) == 2
    assert {c.issuer for c in material.crls} == {
        ca.root.subject.rfc4514_string(), ca.intermediate.subject.rfc4514_string()  # type: ignore[union-attr]
    }
    victim = next(c for c in material.crls if c.revoked)
    assert material.is_revoked(victim.issuer, next(iter(victim.revoked)))


def test_a_ca_without_a_crl_is_a_startup_error_naming_it(
    ica: tuple[CertificateAuthority, Path],
) -> None:
    ca, d = ica
    crl = ca.write_crl(d / "crl2.pem")
    only_intermediate = d / "intermediate-only.pem"
    only_intermediate.write_bytes(crl.read_bytes().split(b"-----END X509 CRL-----")[0]
                                  + b"-----END X509 CRL-----\n")
    with pytest.raises(TlsConfigError) as err:
        build_material(_settings(d, ca, [only_intermediate]))
    assert any("no CRL for CA 'CN=Plant CA'" in p for p in err.value.problems), err.value.problems
