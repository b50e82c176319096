"""``mbsec-pki``: a small offline CA for a plant's Modbus/TCP Security certificates.

The library (:mod:`mbsec.pki.ca`) is what the CLI, the demo and the test fixtures use; everything
that touches key material on disk goes through :mod:`mbsec.pki.files`.
"""

from mbsec.pki.ca import CertificateAuthority, IssuedFiles, PKIError

__all__ = ["CertificateAuthority", "IssuedFiles", "PKIError"]
