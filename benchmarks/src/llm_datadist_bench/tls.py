"""Certificates for the ``bench`` tcp+tls suite: a CA signing one certificate per process, made with ``openssl``."""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional, Tuple

from llm_datadist_bench.common import TlsFiles

__all__ = ["TLS_SUITE", "make_certificates"]

TLS_SUITE = "tcp+tls"
_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")  # quick to make, like RSA on the wire


def _openssl(folder: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def make_certificates(folder: str) -> Tuple[Optional[TlsFiles], Optional[str]]:
    """A CA and two certificates it signs ("prefill" for the owner, "decode" for the initiator) in ``folder``.

    Args:
        folder: an existing directory for the PEM files (the bench's temporary work folder).

    Returns:
        ``(files, None)``, or ``(None, reason)`` when the ``openssl`` command is missing or fails.
    """
    if shutil.which("openssl") is None:
        return None, "the openssl command is not installed: tcp+tls suite skipped"
    pki = os.path.join(folder, "pki")
    os.makedirs(pki, exist_ok=True)
    try:
        _openssl(pki, "req", "-x509", *_EC_KEY, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
                 "-subj", "/CN=llm-datadist-bench-ca")
        for name in ("prefill", "decode"):
            _openssl(pki, "req", *_EC_KEY, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                     "-subj", f"/CN=llm-datadist-bench-{name}")
            _openssl(pki, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                     "-CAcreateserial", "-out", f"{name}.pem", "-days", "2")
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        text = detail.decode(errors="replace").strip().splitlines()[-1:] if detail else [str(exc)]
        return None, f"making test certificates with openssl failed ({text[0] if text else exc}): tcp+tls skipped"
    files = {name: os.path.join(pki, name) for name in ("ca.pem", "prefill.pem", "prefill.key", "decode.pem",
                                                        "decode.key")}
    return TlsFiles(ca=files["ca.pem"], owner_cert=files["prefill.pem"], owner_key=files["prefill.key"],
                    initiator_cert=files["decode.pem"], initiator_key=files["decode.key"]), None
