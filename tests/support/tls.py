"""Throwaway x509 certificates for TLS tests, made with the ``openssl`` command.

:func:`make_certs` writes, in one directory, the file names that qemu's
``tls-creds-x509``, libnbd's ``tls-certificates=DIR`` and dmuser's ``nbds://``
URIs read: ``ca-cert.pem``, ``server-cert.pem``/``server-key.pem`` (valid for
``localhost``, 127.0.0.1 and the extra addresses given) and
``client-cert.pem``/``client-key.pem``, all signed by the CA; plus
``other-ca-cert.pem``, a CA that signed nothing here.  EC P-256 keys keep it
fast (~50 ms).  A missing ``openssl`` skips, except under ``CI=true``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from support.system import in_ci


def _openssl(*args: str, cwd: Path) -> None:
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"openssl {' '.join(args)}: {res.stderr}"


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", f"/CN={name}", "-keyout", f"{name}-key.pem",
             "-out", f"{name}-cert.pem", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", f"/CN=dmuser-test-{name}", "-keyout", f"{name}-key.pem",
             "-out", f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca-cert.pem", "-CAkey",
             "ca-key.pem", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
             "-out", f"{name}-cert.pem", cwd=d)


def make_certs(d: Path, *addresses: str) -> Path:
    """The certificates described in the module docstring, in ``d`` (created)."""
    if not shutil.which("openssl"):
        if in_ci():
            pytest.fail("openssl not found (scripts/setup installs it)", pytrace=False)
        pytest.skip("openssl not found")
    d.mkdir(parents=True, exist_ok=True)
    _ca(d, "ca")
    _ca(d, "other-ca")
    alt = ",".join(["DNS:localhost", "IP:127.0.0.1", *(f"IP:{a}" for a in addresses)])
    _leaf(d, "server", f"subjectAltName={alt}\nextendedKeyUsage=serverAuth\n"
          "keyUsage=critical,digitalSignature\n")
    _leaf(d, "client", "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    return d
