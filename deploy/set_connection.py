"""Add (or update) a SuperLink connection in the Flower config, and optionally wait until it answers.

    python deploy/set_connection.py NAME HOST:PORT [--root-certificates CA.crt | --insecure] [--wait]

The Flower config is $FLWR_HOME/config.toml (default ~/.flwr/config.toml); `flwr run . NAME` then uses
the connection. --wait polls the SuperLink's /health endpoint (over TLS with the given CA) for up to
--timeout seconds and exits 1 if it never answers.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import tomli_w


def config_path() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser() / "config.toml"


def set_connection(name: str, address: str, root_certificates: Path | None) -> Path:
    path = config_path()
    config = tomllib.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", "local")
    superlink.setdefault("local", {"address": ":local:"})
    connection = {"address": address}
    if root_certificates is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(root_certificates.resolve())
    superlink[name] = connection
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def answers(address: str, root_certificates: Path | None) -> bool:
    if root_certificates is None:
        url, context = f"http://{address}/health", None
    else:
        url, context = f"https://{address}/health", ssl.create_default_context(cafile=str(root_certificates))
    try:
        urllib.request.urlopen(url, timeout=2, context=context)
    except OSError:  # refused, reset, TLS not up yet, timeout
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("address", help="HOST:PORT of the SuperLink")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--root-certificates", type=Path, help="CA certificate the SuperLink's is signed by")
    security.add_argument("--insecure", action="store_true", help="no TLS (local tests only)")
    parser.add_argument("--wait", action="store_true", help="wait until the SuperLink answers")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.root_certificates is not None and not args.root_certificates.is_file():
        parser.error(f"--root-certificates: {args.root_certificates} does not exist")
    path = set_connection(args.name, args.address, args.root_certificates)
    print(f"connection '{args.name}' -> {args.address} in {path}")
    if args.wait:
        deadline = time.monotonic() + args.timeout
        while not answers(args.address, args.root_certificates):
            if time.monotonic() > deadline:
                sys.exit(f"the SuperLink at {args.address} did not answer within {args.timeout:g} s")
            time.sleep(0.5)


if __name__ == "__main__":
    main()
