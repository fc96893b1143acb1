"""Mutual TLS for link handshakes and the tcp data plane: certificates made with the openssl command."""
from __future__ import annotations

import os
import shutil
import socket
import ssl

import numpy as np
import pytest
import pki as pki_files
from ports import free_port as _port

from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig, LLMDataDist, LLMException,
                          LLMRole, LLMStatusCode, Placement)

S = LLMStatusCode
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA signing "prefill" and "decode", and a foreign CA signing "stranger"."""
    cwd = str(tmp_path_factory.mktemp("pki"))
    pki_files.make_ca(cwd, "ca")
    pki_files.make_ca(cwd, "other-ca")
    for name in ("prefill", "decode"):
        pki_files.make_cert(cwd, name, "ca")
    pki_files.make_cert(cwd, "stranger", "other-ca")
    return cwd


def _files(pki: str, name: str, ca: str = "ca") -> dict:
    return pki_files.files(pki, name, ca)


def _instance(role, cluster_id, listen_port=None, **attrs) -> LLMDataDist:
    cfg = LLMConfig()
    cfg.enable_cache_manager = True
    cfg.sync_kv_timeout = 3000
    if listen_port is not None:
        cfg.listen_ip_info = f"127.0.0.1:{listen_port}"
    for key, value in attrs.items():
        setattr(cfg, key, value)
    dd = LLMDataDist(role, cluster_id)
    dd.init(cfg.generate_options())
    return dd


def _blocks(dd, seed=None, model_id=0):
    arrays = [np.full((8, 4096), 0xA5, np.uint8) if seed is None else
              np.random.default_rng(seed + t).integers(0, 256, (8, 4096), dtype=np.uint8) for t in range(2)]
    desc = CacheDesc(2, [8, 4096], DataType.DT_UINT8, Placement.DEVICE)
    cache = dd.cache_manager.register_blocks_cache(desc, arrays, BlocksCacheKey(dd.cluster_id, model_id))
    return cache, arrays


def _info(cluster_id, port) -> LLMClusterInfo:
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    return info


@pytest.mark.parametrize("backend", ["tcp", None])
def test_tls_link_and_pull_move_the_right_bytes(pki, backend):
    port = _port()
    extra = {"transfer_backend": backend, "enable_remote_cache_accessible": True} if backend else {}
    p = _instance(LLMRole.PROMPT, 1, port, **_files(pki, "prefill"), **extra)
    d = _instance(LLMRole.DECODER, 2, _port() if backend else None, **_files(pki, "decode"), **extra)
    try:
        _src, src = _blocks(p, seed=3)
        cache, dst = _blocks(d)
        assert d.link_clusters([_info(1, port)], 5000) == (S.LLM_SUCCESS, [S.LLM_SUCCESS])
        d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [7, 2], [0, 5])
        for t in range(2):
            assert (dst[t][0] == src[t][7]).all() and (dst[t][5] == src[t][2]).all()
            assert (dst[t][[1, 2, 3, 4, 6, 7]] == 0xA5).all()
        link = d._engine.links.get(1)
        assert isinstance(link.conn.sock, ssl.SSLSocket)  # the control connection is TLS
        if backend == "tcp":
            assert link.route_name == "tcp"
            channel = link.routes(0)[0].channel
            assert all(isinstance(s, ssl.SSLSocket) for s in channel._all)  # and so is the data plane
    finally:
        d.finalize()
        p.finalize()


def test_a_peer_without_tls_or_with_another_ca_is_refused(pki):
    port = _port()
    p = _instance(LLMRole.PROMPT, 1, port, **_files(pki, "prefill"))
    plain = _instance(LLMRole.DECODER, 2)
    stranger = _instance(LLMRole.DECODER, 3, **_files(pki, "stranger", ca="other-ca"))
    try:
        for client in (plain, stranger):
            code, codes = client.link_clusters([_info(1, port)], 2000)
            assert code == S.LLM_LINK_FAILED and codes == [S.LLM_LINK_FAILED]
        assert not p._engine.links.has_links()
    finally:
        for dd in (stranger, plain, p):
            dd.finalize()


def test_a_tls_client_does_not_link_to_a_plain_server(pki):
    port = _port()
    p = _instance(LLMRole.PROMPT, 1, port)
    d = _instance(LLMRole.DECODER, 2, **_files(pki, "decode"))
    try:
        assert d.link_clusters([_info(1, port)], 2000)[0] == S.LLM_LINK_FAILED
    finally:
        d.finalize()
        p.finalize()


def test_tls_options_must_come_together_and_exist(pki, tmp_path):
    files = _files(pki, "prefill")
    for missing in files:
        partial = {k: v for k, v in files.items() if k != missing}
        with pytest.raises(LLMException) as exc:
            _instance(LLMRole.PROMPT, 1, **partial)
        assert exc.value.status_code == S.LLM_PARAM_INVALID and "missing" in str(exc.value)
    with pytest.raises(LLMException) as exc:
        _instance(LLMRole.PROMPT, 1, **dict(files, tls_key_file=str(tmp_path / "nope.key")))
    assert exc.value.status_code == S.LLM_PARAM_INVALID and "nope.key" in str(exc.value)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(LLMException) as exc:
        _instance(LLMRole.PROMPT, 1, **dict(files, tls_cert_file=str(garbage)))
    assert exc.value.status_code == S.LLM_PARAM_INVALID


def test_tls_files_from_the_environment(pki, monkeypatch):
    files = _files(pki, "prefill")
    for key, env in (("tls_cert_file", "LLM_DATADIST_TLS_CERT"), ("tls_key_file", "LLM_DATADIST_TLS_KEY"),
                     ("tls_ca_file", "LLM_DATADIST_TLS_CA")):
        monkeypatch.setenv(env, files[key])
    port = _port()
    p = _instance(LLMRole.PROMPT, 1, port)
    monkeypatch.setenv("LLM_DATADIST_TLS_CERT", os.path.join(pki, "decode.pem"))
    monkeypatch.setenv("LLM_DATADIST_TLS_KEY", os.path.join(pki, "decode.key"))
    d = _instance(LLMRole.DECODER, 2)
    try:
        assert d.link_clusters([_info(1, port)], 5000)[0] == S.LLM_SUCCESS
        assert isinstance(d._engine.links.get(1).conn.sock, ssl.SSLSocket)
    finally:
        d.finalize()
        p.finalize()


def test_plaintext_bytes_to_a_tls_listener_get_nothing_back(pki):
    port = _port()
    p = _instance(LLMRole.PROMPT, 1, port, **_files(pki, "prefill"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"LDD\x01" + b"\x00" * 60)
            sock.settimeout(5)
            data = b""
            try:
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            except (ConnectionResetError, socket.timeout):
                pass
            assert b"LDD" not in data  # no frame of ours leaves before the TLS handshake
    finally:
        p.finalize()
