"""TLS certificates for a SuperLink and authentication keys for its SuperNodes.

    python deploy/make_credentials.py DIR [--supernodes 2] [--host 127.0.0.1 --host superlink.example.org]

Writes into DIR (private keys readable by the owner only):
  ca.crt, ca.key               a certificate authority (give ca.crt to every SuperNode and to `flwr`)
  server.pem, server.key       the SuperLink's certificate, signed by the CA, valid for every --host
  supernode-<i>, -<i>.pub      one ECDSA P-384 key pair per SuperNode, in OpenSSH format: the SuperNode
                               starts with the private key, the SuperLink operator registers the .pub
                               (`flwr supernode register supernode-<i>.pub <connection>`)
For a real federation, each site makes its own key pair and sends only the .pub; the CA key stays with
the SuperLink operator. Existing files are never overwritten.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


def write(path: Path, data: bytes, private: bool = False) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it (or use another directory) to make new credentials")
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def certificate(subject: str, public_key, issuer: x509.Name | None, signing_key,
                hosts: list[str] = ()) -> x509.Certificate:
    """Self-signed CA certificate when ``issuer`` is None, else a server certificate for ``hosts``."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))
    if issuer is None:  # the CA itself
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    else:
        names = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = (builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--supernodes", type=int, default=2, help="number of SuperNode key pairs (default 2)")
    parser.add_argument("--host", action="append", default=None,
                        help="name or IP the SuperLink is reached at (repeatable; default localhost, 127.0.0.1, ::1)")
    args = parser.parse_args()
    if args.supernodes < 0:
        parser.error(f"--supernodes must be >= 0, got {args.supernodes}")
    hosts = args.host or ["localhost", "127.0.0.1", "::1"]
    out: Path = args.directory
    out.mkdir(parents=True, exist_ok=True)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = certificate("dpmemarc federation CA", ca_key.public_key(), None, ca_key)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = certificate(hosts[0], server_key.public_key(), ca_cert.subject, ca_key, hosts)
    write(out / "ca.key", pem_key(ca_key), private=True)
    write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM))
    write(out / "server.key", pem_key(server_key), private=True)
    write(out / "server.pem", server_cert.public_bytes(serialization.Encoding.PEM))
    for i in range(args.supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        write(out / f"supernode-{i}", key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()), private=True)
        write(out / f"supernode-{i}.pub", key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                                         serialization.PublicFormat.OpenSSH) + b"\n")
    print(f"credentials for a SuperLink at {', '.join(hosts)} and {args.supernodes} SuperNode(s) in {out}")


if __name__ == "__main__":
    main()
