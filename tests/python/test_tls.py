"""Haven over HTTPS (its own rustls listener, TLS 1.3) with the real Python `mcp` client in both
eras: a client that trusts the test CA works; one that trusts only the system roots is refused
by its own certificate check."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from conftest import MODES, REPO_ROOT, READY_TIMEOUT_S, _free_port, _stop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp.client.streamable_http import streamable_http_client

from mcp import Client

pytestmark = pytest.mark.anyio


@dataclass
class Secured:
    url: str
    ca_file: Path


def write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate for 127.0.0.1 it signed: (ca.pem, cert.pem, key.pem 0600)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "haven test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return ca_file, cert_file, key_file


def https_status(url: str, ca_file: Path) -> int | None:
    context = ssl.create_default_context(cafile=str(ca_file))
    try:
        import urllib.request

        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            return response.status
    except OSError:
        return None


@pytest.fixture(scope="module")
def secured() -> Iterator[Secured]:
    binary = Path(os.environ.get("HAVEN_BIN", REPO_ROOT / "target" / "debug" / "haven"))
    log_dir = Path(os.environ.get("HAVEN_TEST_LOGS", REPO_ROOT / "target" / "test-logs")) / "python"
    log_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="haven-tls-") as tmp:
        ca_file, cert_file, key_file = write_certificates(Path(tmp))
        port = _free_port()
        base = f"https://127.0.0.1:{port}"
        with open(log_dir / f"haven-tls-{port}.log", "wb") as log:
            haven = subprocess.Popen(
                [
                    str(binary), "serve", "--listen", f"127.0.0.1:{port}", "--data", str(Path(tmp) / "data"),
                    "--catalog", "default", "--tls-cert", str(cert_file), "--tls-key", str(key_file),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while https_status(f"{base}/readyz", ca_file) != 200:
                assert haven.poll() is None, "haven exited"
                assert time.monotonic() < deadline, "haven not ready"
                time.sleep(0.2)
            yield Secured(url=f"{base}/mcp", ca_file=ca_file)
        finally:
            _stop(haven)


@pytest.mark.parametrize("mode", MODES)
async def test_the_real_client_works_over_tls_in_both_eras(secured: Secured, mode: str) -> None:
    http = httpx2.AsyncClient(verify=ssl.create_default_context(cafile=str(secured.ca_file)), timeout=30)
    async with Client(streamable_http_client(secured.url, http_client=http), mode=mode, read_timeout_seconds=30) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert "echo" in tools
        result = await client.call_tool("echo", {"text": "over TLS"})
        assert result.content[0].text == "over TLS"


def test_a_client_that_does_not_trust_the_certificate_is_refused(secured: Secured) -> None:
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(secured.url.removesuffix("/mcp") + "/healthz", timeout=5)
    # Trusting the CA but offering at most TLS 1.2: refused (1.3 is required by default).
    context = ssl.create_default_context(cafile=str(secured.ca_file))
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises(httpx2.ConnectError):
        httpx2.get(secured.url.removesuffix("/mcp") + "/healthz", verify=context, timeout=5)
    # Trusting the CA, with TLS 1.3: it goes through.
    context = ssl.create_default_context(cafile=str(secured.ca_file))
    response = httpx2.get(secured.url.removesuffix("/mcp") + "/healthz", verify=context, timeout=5)
    assert response.status_code == 200
