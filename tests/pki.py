"""Test certificates made with the openssl command: a CA and certificates it signs (RSA 2048, valid two days)."""
from __future__ import annotations

import os
import subprocess


def openssl(cwd: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(cwd: str, name: str) -> None:
    """``name.pem`` and ``name.key`` in ``cwd``: a self-signed CA."""
    openssl(cwd, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}")


def make_cert(cwd: str, name: str, ca: str) -> None:
    """``name.pem`` and ``name.key`` in ``cwd``: a certificate the CA ``ca`` (made there before) signed."""
    openssl(cwd, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
    openssl(cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2")


def files(cwd: str, name: str, ca: str = "ca") -> dict:
    """The LLMConfig TLS attributes of certificate ``name`` signed by ``ca``."""
    return {"tls_cert_file": os.path.join(cwd, f"{name}.pem"), "tls_key_file": os.path.join(cwd, f"{name}.key"),
            "tls_ca_file": os.path.join(cwd, f"{ca}.pem")}
