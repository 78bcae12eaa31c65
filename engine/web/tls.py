"""A self-signed certificate for the status page's HTTPS (``--status-https``).

Browsers give the camera (``getUserMedia``) only to https pages and http://localhost, so a
phone on the venue's LAN can send its camera to the show only over HTTPS. A self-signed
certificate makes the browser warn once ("not private"); the performer accepts it on the
phone, which is the price of needing no certificate authority and no internet. The pair is
kept (in the state folder) so that the phone's exception survives a restart.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from pathlib import Path

from engine.files import write_atomic


def self_signed(folder: Path, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """(certificate, key) PEM files in ``folder``, made on first use, valid ten years.

    Raises ValueError with one line when the ``cryptography`` package (aiortc's) is missing.
    """
    cert_path, key_path = folder / "status-cert.pem", folder / "status-key.pem"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        raise ValueError(
            "a self-signed certificate needs the cryptography package (pip install 'dreamdeck[webrtc]'), "
            "or give --status-cert and --status-key"
        ) from None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dreamdeck")])
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.DNSName(socket.gethostname())]
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_atomic(key_path, key_pem, mode=0o600)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
