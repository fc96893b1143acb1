"""A host where one process may not read another (Yama, capabilities): the same-host fast path is refused at
connect, the link falls back to tcp with the reason and the fix logged once, and the bytes are right."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from llm_datadist._transport import ptrace
from tests.integration.conftest import free_port
from tests.integration.peer_proc import pattern

NT, NB, BB = 2, 8, 4096
# without CAP_SYS_PTRACE a root process may not read a process that holds more capabilities than it does:
# the kernel's rule for "another user's" process, which is what Yama's ptrace_scope 1 does to siblings
RESTRICTED = ("setpriv", "--bounding-set=-sys_ptrace", "--inh-caps=-sys_ptrace")
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None or os.geteuid() != 0,
                                   reason="needs root and setpriv to drop CAP_SYS_PTRACE from one peer")


@needs_setpriv
def test_a_peer_that_may_not_read_falls_back_to_tcp_and_says_why(spawn_peer):
    port = free_port()
    prefill = spawn_peer()
    prefill.call("init", role=1, cluster_id=71, config={"enable_cache_manager": True,
                                                        "listen_ip_info": f"127.0.0.1:{port}"})
    prefill.call("register", name="kv", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=3, model_id=0)
    log = tempfile.TemporaryFile(mode="w+")
    decode = spawn_peer(env={"LLM_DATADIST_LOG_LEVEL": "INFO"}, prefix=RESTRICTED, stderr=log)
    decode.call("init", role=2, cluster_id=72, config={"enable_cache_manager": True})
    decode.call("register", name="dst", num_tensors=NT, num_blocks=NB, block_bytes=BB, seed=None, model_id=1)
    assert decode.call("link_clusters", clusters=[{"cluster_id": 71, "ip": "127.0.0.1", "port": port}])["code"] == 0
    decode.call("pull_blocks", name="dst", cluster_id=71, model_id=0, src_blocks=[6, 1], dst_blocks=[0, 7])
    tensors = decode.call("digest", name="dst")["tensors"]
    got = [np.frombuffer(bytes.fromhex(t), np.uint8).reshape(NB, BB) for t in tensors]
    for t in range(NT):
        src = pattern(3, t, NB * BB).reshape(NB, BB)
        assert np.array_equal(got[t][0], src[6]) and np.array_equal(got[t][7], src[1])
    decode.close()
    log.seek(0)
    text = log.read()
    assert "routes over tcp" in text
    assert "process_vm_readv of pid" in text and "not permitted" in text and "fix:" in text


def test_the_yama_grant_is_given_only_under_scope_1(monkeypatch, tmp_path, caplog):
    calls = []
    monkeypatch.setattr(ptrace, "_prctl", lambda option, arg: calls.append((option, arg)) or 0)
    monkeypatch.setattr(ptrace, "_granted", False)
    scope = tmp_path / "ptrace_scope"
    for value, granted in (("0", False), ("2", False), ("1", True)):
        scope.write_text(value)
        assert ptrace.grant_same_user_peers(ptrace.yama_scope(str(scope))) is granted
    assert calls == [(ptrace.PR_SET_PTRACER, ptrace.PR_SET_PTRACER_ANY)]
    assert ptrace.grant_same_user_peers(1) is True and len(calls) == 1  # once per process
    monkeypatch.setattr(ptrace, "_granted", False)
    monkeypatch.setenv("LLM_DATADIST_PTRACE_GRANT", "0")
    assert ptrace.grant_same_user_peers(1) is False and len(calls) == 1
    assert ptrace.yama_scope(str(tmp_path / "absent")) is None
    for value, words in ((2, "administrator"), (1, "LLM_DATADIST_PTRACE_GRANT"), (None, "CAP_SYS_PTRACE")):
        assert words in ptrace.refusal_hint(value)


def test_doctor_says_what_a_sibling_process_may_do():
    out = subprocess.run(["llm-datadist", "doctor"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PATH=os.pathsep.join([os.path.dirname(os.sys.executable),
                                                                   os.environ.get("PATH", "")]))).stdout
    line = next(text for text in out.splitlines() if text.strip().startswith("process_vm"))
    assert "a sibling" in line and ("permitted" in line)

