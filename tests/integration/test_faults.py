"""Failure cases between real processes: peer death, stopped peers, restarts, authentication, exit paths."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMException, LLMRole, LLMStatusCode
from tests.integration.conftest import SRC, free_port
from tests.integration.test_two_process import BB, cluster, expected_blocks, local_blocks, local_dd
from waiting import NEVER_HANGS_S, wait_until

BIG_BLOCKS = 512  # 4 tensors x 512 blocks x 64 KiB = 128 MiB per full pull


def start_prefill(spawn_peer, cluster_id, port, env=None, seed=5, num_blocks=16, block_bytes=BB, config=None):
    peer = spawn_peer(env)
    cfg = {"enable_cache_manager": True, "listen_ip_info": f"127.0.0.1:{port}", "sync_kv_timeout": 3000}
    cfg.update(config or {})
    peer.call("init", role=1, cluster_id=cluster_id, config=cfg)
    peer.call("register", name="kv", num_tensors=4, num_blocks=num_blocks, block_bytes=block_bytes, seed=seed,
              model_id=0)
    return peer


def _forced(name: str):
    """The transport ``name`` as a parameter, skipped where that optional subsystem (nixl) is missing."""
    from llm_datadist._transport import unavailable_reason

    from subsystems import skip_if_missing

    return pytest.param(name, marks=skip_if_missing(name, unavailable_reason(name)))


@pytest.mark.parametrize("transport", ["tcp", "process_vm", _forced("nixl")])
def test_peer_killed_mid_pull_then_force_unlink_and_relink(spawn_peer, transport, monkeypatch):
    monkeypatch.setenv("LLM_DATADIST_TRANSPORT", transport)
    env = {"LLM_DATADIST_TRANSPORT": transport}
    port = free_port()
    peer = start_prefill(spawn_peer, 81, port, env, num_blocks=BIG_BLOCKS, block_bytes=64 << 10)
    dd = local_dd(82, sync_kv_timeout=3000)
    try:
        arrays = [np.zeros((BIG_BLOCKS, 64 << 10), np.uint8) for _ in range(4)]
        from llm_datadist import CacheDesc, DataType, Placement

        cache = dd.cache_manager.register_blocks_cache(CacheDesc(4, [BIG_BLOCKS, 64 << 10], DataType.DT_UINT8,
                                                                 Placement.DEVICE), [a.ctypes.data for a in arrays])
        assert dd.link_clusters([cluster(81, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        blocks = list(range(BIG_BLOCKS))
        failures = []
        pulling = threading.Event()

        def pull_until_failure():
            end = time.monotonic() + 20
            while time.monotonic() < end:
                started = time.monotonic()
                try:
                    dd.cache_manager.pull_blocks(BlocksCacheKey(81, 0), cache, blocks, blocks[::-1])
                except LLMException as exc:
                    failures.append((exc, time.monotonic() - started))
                    return
                pulling.set()  # one pull went through; the next one is on its way

        worker = threading.Thread(target=pull_until_failure)
        worker.start()
        assert pulling.wait(NEVER_HANGS_S), "no pull succeeded before the kill"
        peer.kill()  # while the worker pulls back to back
        worker.join(15)
        assert not worker.is_alive(), "pull hung after the peer died"
        assert failures, "no pull failed after the peer was killed"
        exc, took = failures[0]
        assert took < 5 * 3.0  # bounded by the 3 s sync_kv_timeout: it never hangs
        assert exc.status_code in (LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_TIMEOUT,
                                   LLMStatusCode.LLM_NOT_YET_LINK)
        # the survivor cleans up and links again to a new process with the same cluster id
        assert dd.unlink_clusters([cluster(81, port)], 3000, force=True)[0] == LLMStatusCode.LLM_SUCCESS
        start_prefill(spawn_peer, 81, port, env, seed=6)
        assert dd.link_clusters([cluster(81, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        small, small_arrays = local_blocks(dd, model_id=1, nt=4)
        dd.cache_manager.pull_blocks(BlocksCacheKey(81, 0), small, [3], [4])
        assert np.array_equal(small_arrays[2][4], expected_blocks(6, nt=4)[2][3])
    finally:
        dd.finalize()


def _wait_stopped(pid: int) -> None:
    """SIGSTOP takes effect asynchronously: wait until the kernel reports the process stopped."""

    def stopped() -> bool:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"

    assert wait_until(stopped), f"process {pid} did not stop"


def test_stopped_peer_times_out_within_sync_kv_timeout(spawn_peer, monkeypatch):
    """Over tcp the stopped owner must serve the bytes: LLM_TIMEOUT. (process_vm is one-sided: it still works.)"""
    monkeypatch.setenv("LLM_DATADIST_TRANSPORT", "tcp")
    port = free_port()
    peer = start_prefill(spawn_peer, 91, port, env={"LLM_DATADIST_TRANSPORT": "tcp"})
    dd = local_dd(92, sync_kv_timeout=500)
    try:
        cache, _arrays = local_blocks(dd, nt=4)
        assert dd.link_clusters([cluster(91, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        dd.cache_manager.pull_blocks(BlocksCacheKey(91, 0), cache, [0], [0])
        peer.stop()
        _wait_stopped(peer.pid)
        try:
            started = time.monotonic()
            with pytest.raises(LLMException) as err:
                dd.cache_manager.pull_blocks(BlocksCacheKey(91, 0), cache, [1], [1])
            assert err.value.status_code == LLMStatusCode.LLM_TIMEOUT
            assert time.monotonic() - started < 5 * 0.5  # bounded by the 500 ms sync_kv_timeout
        finally:
            peer.cont()
        dd.cache_manager.pull_blocks(BlocksCacheKey(91, 0), cache, [2], [2])  # the link recovers
    finally:
        dd.finalize()


def test_client_restart_relinks_with_same_cluster_id(spawn_peer):
    """The server keeps a stale link when a client dies; the restarted client's link replaces it."""
    port = free_port()
    dd = local_dd(101, role=LLMRole.PROMPT, listen_ip_info=f"127.0.0.1:{port}")
    try:
        cache, arrays = local_blocks(dd)
        for t, array in enumerate(arrays):
            array[:] = expected_blocks(31)[t]
        first = spawn_peer()
        first.call("init", role=2, cluster_id=102, config={"enable_cache_manager": True})
        first.call("register", name="dst", num_tensors=6, num_blocks=16, block_bytes=BB, seed=None, model_id=0)
        assert first.call("link_clusters", clusters=[{"cluster_id": 101, "port": port, "ip": "127.0.0.1"}])["code"] == 0
        first.kill()
        second = spawn_peer()
        second.call("init", role=2, cluster_id=102, config={"enable_cache_manager": True})
        second.call("register", name="dst", num_tensors=6, num_blocks=16, block_bytes=BB, seed=None, model_id=0)
        reply = second.call("link_clusters", clusters=[{"cluster_id": 101, "port": port, "ip": "127.0.0.1"}])
        assert reply["code"] == 0
        second.call("pull_blocks", name="dst", cluster_id=101, model_id=0, src_blocks=[5], dst_blocks=[6])
        got = second.call("digest", name="dst")["tensors"]
        assert np.array_equal(np.frombuffer(bytes.fromhex(got[1]), np.uint8).reshape(16, BB)[6], arrays[1][5])
        # and the server reaches the new client
        dd.cache_manager.pull_blocks(BlocksCacheKey(102, 0), cache, [6], [7])
        assert np.array_equal(arrays[1][7], arrays[1][5])
    finally:
        dd.finalize()


def test_relink_to_linked_cluster_reports_already_link(spawn_peer):
    port = free_port()
    start_prefill(spawn_peer, 111, port)
    dd = local_dd(112)
    try:
        assert dd.link_clusters([cluster(111, port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        assert dd.link_clusters([cluster(111, port)], 5000) == (LLMStatusCode.LLM_ALREADY_LINK,
                                                                 [LLMStatusCode.LLM_ALREADY_LINK])
        assert dd.link_clusters([cluster(999, port)], 5000)[0] == LLMStatusCode.LLM_LINK_FAILED
        cache, arrays = local_blocks(dd, nt=4)  # the wrong id must not have broken the good link
        dd.cache_manager.pull_blocks(BlocksCacheKey(111, 0), cache, [2], [3])
        assert np.array_equal(arrays[1][3], expected_blocks(5, nt=4)[1][2])
        code, codes = dd.link_clusters([cluster(555, free_port())], 500)
        assert code == LLMStatusCode.LLM_LINK_FAILED and codes == [LLMStatusCode.LLM_LINK_FAILED]
    finally:
        dd.finalize()


def test_link_without_remote_cluster_id_learns_it(spawn_peer):
    """SGLang forks: no remote_cluster_id and no local ip; the id comes from the handshake."""
    port = free_port()
    start_prefill(spawn_peer, 121, port, seed=44)
    dd = local_dd(122)
    try:
        cache, arrays = local_blocks(dd, nt=4)
        from llm_datadist import LLMClusterInfo

        info = LLMClusterInfo()
        info.append_remote_ip_info("127.0.0.1", port)
        assert dd.link_clusters([info], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        dd.cache_manager.pull_blocks(BlocksCacheKey(121, 0), cache, [9], [1])
        assert np.array_equal(arrays[3][1], expected_blocks(44, nt=4)[3][9])
    finally:
        dd.finalize()


@pytest.mark.parametrize("client_secret,ok", [("s3cret", True), ("wrong", False), (None, False)])
def test_shared_secret_authentication(spawn_peer, client_secret, ok, monkeypatch):
    monkeypatch.delenv("LLM_DATADIST_LINK_SECRET", raising=False)
    port = free_port()
    start_prefill(spawn_peer, 131, port, config={"link_secret": "s3cret"})
    extra = {"link_secret": client_secret} if client_secret else {}
    dd = local_dd(132, **extra)
    try:
        code, _ = dd.link_clusters([cluster(131, port)], 3000)
        assert (code == LLMStatusCode.LLM_SUCCESS) is ok
        if not ok:
            assert code == LLMStatusCode.LLM_LINK_FAILED
    finally:
        dd.finalize()


def test_process_exits_without_finalize_or_unlink(tmp_path):
    """Clients that never call finalize: daemon threads only; atexit cleans up; the process exits promptly."""
    port = free_port()
    script = tmp_path / "noexit.py"
    script.write_text(textwrap.dedent(f"""
        import numpy as np
        from llm_datadist import *
        def dd(role, cid, **kw):
            c = LLMConfig(); c.enable_cache_manager = True
            for k, v in kw.items(): setattr(c, k, v)
            d = LLMDataDist(role, cid); d.init(c.generate_options()); return d
        p = dd(LLMRole.PROMPT, 1, listen_ip_info="127.0.0.1:{port}")
        d = dd(LLMRole.DECODER, 2)
        a = [np.ones((4, 64), np.uint8)]; b = [np.zeros((4, 64), np.uint8)]
        desc = CacheDesc(1, [4, 64], DataType.DT_UINT8)
        p.cache_manager.register_blocks_cache(desc, [a[0].ctypes.data], BlocksCacheKey(1, 0))
        c = d.cache_manager.register_blocks_cache(desc, [b[0].ctypes.data], BlocksCacheKey(2, 0))
        i = LLMClusterInfo(); i.remote_cluster_id = 1; i.append_local_ip_info("127.0.0.1", 0)
        i.append_remote_ip_info("127.0.0.1", {port})
        assert d.link_clusters([i])[0] == LLMStatusCode.LLM_SUCCESS
        d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), c, [0], [1])
        assert b[0][1].all()
        print("done", flush=True)
    """))
    env = dict(os.environ, PYTHONPATH=SRC)
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "done" in result.stdout
    assert time.monotonic() - started < 15  # it exits promptly (about 2 s), never hangs
