"""Conformance suite run against every available transport (loopback in-process; others two-process)."""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import List, Optional

import numpy as np
import pytest

from conftest import ALL, LOCAL_BYTES, PARAMS, PEER_BYTES, TESTED, Setup, ctx
from waiting import NEVER_HANGS_S, wait_until
from llm_datadist import LLMStatusCode
from llm_datadist._transport import available_transports, transport_class
from llm_datadist._transport.base import (
    ConnectFailed,
    CopyPlan,
    PeerInfo,
    RemoteRejected,
    StaleMemory,
    TransferTimeout,
    TransportClosed,
)

SENTINEL = 0xA5
SERVER_CHECKED = [n for n in TESTED if n != "process_vm"]  # a serving side or a range table refuses bad ranges
TWO_PROCESS = [n for n in TESTED if n != "loopback"]
SAME_HOST = [n for n in TESTED if n in ("process_vm", "shm", "nixl")]  # routes that prove identity by nonce
TCP = [n for n in TESTED if n == "tcp"]
SHM = [n for n in TESTED if n == "shm"]


def _case_one_byte(rng):
    return np.array([7]), np.array([PEER_BYTES - 1]), np.array([1])


def _case_16k_x4096(rng):
    bs, n = 16384, 4096
    local = rng.permutation(LOCAL_BYTES // bs)[:n] * bs
    remote = rng.permutation(PEER_BYTES // bs)[:n] * bs
    return local, remote, np.full(n, bs)


def _case_1m(rng):
    bs = 1 << 20
    local = rng.permutation(LOCAL_BYTES // bs)[:8] * bs
    remote = rng.permutation(PEER_BYTES // bs)[:8] * bs
    return local, remote, np.full(8, bs)


def _case_unaligned(rng):
    n = 300
    sizes = rng.integers(1, 20000, n)
    sizes[17] = 0  # a zero-byte op is legal and moves nothing
    gaps = rng.integers(1, 999, n)
    local = np.cumsum(gaps + sizes) - sizes + 3
    order = rng.permutation(n)  # disjoint remote slots, visited in a shuffled order
    remote = np.empty(n, dtype=np.int64)
    remote[order] = np.cumsum(rng.integers(1, 5000, n) + sizes[order]) - sizes[order] + 11
    return local, remote, sizes


CASES = {"1byte": _case_one_byte, "16k_x4096": _case_16k_x4096, "1m": _case_1m, "unaligned": _case_unaligned}


def _dest_mask(nbytes, offs, sizes):
    mask = np.zeros(nbytes, dtype=bool)
    for off, n in zip(np.asarray(offs).tolist(), np.asarray(sizes).tolist()):
        mask[off:off + n] = True
    return mask


def _check_copied(dst, dst_offs, src, src_offs, sizes):
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes == sizes[0]).all() and not (dst_offs % sizes[0]).any() \
            and not (src_offs % sizes[0]).any():
        bs = int(sizes[0])
        got = dst[:dst.size // bs * bs].reshape(-1, bs)[np.asarray(dst_offs) // bs]
        want = src[:src.size // bs * bs].reshape(-1, bs)[np.asarray(src_offs) // bs]
        if not np.array_equal(got, want):
            np.testing.assert_array_equal(got, want)
        return
    for d, s, n in zip(np.asarray(dst_offs).tolist(), np.asarray(src_offs).tolist(), sizes.tolist()):
        if not np.array_equal(dst[d:d + n], src[s:s + n]):
            np.testing.assert_array_equal(dst[d:d + n], src[s:s + n])


@pytest.mark.parametrize("case", list(CASES))
def test_read_scattered(setup: Setup, case):
    rng = np.random.default_rng(42)
    local, remote, sizes = CASES[case](rng)
    setup.local[:] = SENTINEL
    setup.transport.read(setup.channel, setup.plan(local, remote, sizes), setup.deadline())
    _check_copied(setup.local, local, setup.expected(), remote, sizes)
    changed = setup.local != SENTINEL
    changed[_dest_mask(LOCAL_BYTES, local, sizes)] = False
    assert not changed.any(), "bytes outside the destinations changed"


@pytest.mark.parametrize("case", list(CASES))
def test_write_scattered_then_read_back(setup: Setup, case):
    rng = np.random.default_rng(7)
    local, remote, sizes = CASES[case](rng)  # every case's remote ranges are disjoint
    payload = np.zeros(LOCAL_BYTES, dtype=np.uint8)
    used = int(np.max(np.asarray(local) + np.asarray(sizes)))
    payload[:used] = rng.integers(0, 256, used, dtype=np.uint8)
    setup.local[:] = payload
    try:
        setup.transport.write(setup.channel, setup.plan(local, remote, sizes), setup.deadline())
        setup.local[:] = 0
        whole = setup.plan([0], [0], [PEER_BYTES])
        setup.transport.read(setup.channel, whole, setup.deadline())
        after = setup.local[:PEER_BYTES].copy()
        _check_copied(after, remote, payload, local, sizes)
        changed = after != setup.expected()
        changed[_dest_mask(PEER_BYTES, remote, sizes)] = False
        assert not changed.any(), "bytes outside the written ranges changed"
    finally:
        setup.peer.command("reset")


def _case_few_scattered(rng):
    """40 ranges of 0-20000 bytes, apart on both sides (nothing merges): a small request of many pieces."""
    n = 40
    sizes = rng.integers(1, 20000, n)
    sizes[5] = 0
    local = np.cumsum(sizes + rng.integers(1, 999, n)) - sizes
    remote = rng.permutation(PEER_BYTES // 32768)[:n] * 32768 + rng.integers(0, 8192, n)
    return local, remote, sizes


def _case_few_large(rng):
    """Three 1.5 MiB ranges: few ops, but enough bytes that a same-host copy splits them across threads."""
    bs = 3 << 19
    local = rng.permutation(LOCAL_BYTES // bs)[:3] * bs
    remote = rng.permutation(PEER_BYTES // bs)[:3] * bs
    return local, remote, np.full(3, bs)


FEW = {"scattered": _case_few_scattered, "large": _case_few_large, "one_byte": _case_one_byte}


@pytest.mark.parametrize("case", list(FEW))
def test_a_plan_of_ints_and_the_same_plan_of_arrays_move_the_same_bytes(setup: Setup, case):
    """The plan alone knows how it holds its ops: every transport reads and writes the same bytes for both."""
    rng = np.random.default_rng(23)
    local, remote, sizes = FEW[case](rng)
    images = {}
    for ints in (True, False):
        setup.local[:] = SENTINEL
        setup.transport.read(setup.channel, setup.plan(local, remote, sizes, ints=ints), setup.deadline())
        images[ints] = setup.local.copy()
    _check_copied(images[True], local, setup.expected(), remote, sizes)
    assert np.array_equal(images[True], images[False]), "a plan of ints read other bytes than one of arrays"
    payload = rng.integers(0, 256, LOCAL_BYTES, dtype=np.uint8)
    peers = {}
    try:
        for ints in (True, False):
            setup.peer.command("reset")
            setup.local[:] = payload
            setup.transport.write(setup.channel, setup.plan(local, remote, sizes, ints=ints), setup.deadline())
            setup.transport.read(setup.channel, setup.plan([0], [0], [PEER_BYTES]), setup.deadline())
            peers[ints] = setup.local[:PEER_BYTES].copy()
    finally:
        setup.peer.command("reset")
    _check_copied(peers[True], remote, payload, local, sizes)
    assert np.array_equal(peers[True], peers[False]), "a plan of ints wrote other bytes than one of arrays"


def test_empty_plan_is_a_no_op(setup: Setup):
    empty = setup.plan([], [], [])
    setup.local[:] = SENTINEL
    setup.transport.read(setup.channel, empty, setup.deadline())
    assert (setup.local == SENTINEL).all(), "an empty read changed local bytes"
    setup.local[:] = 0x5A  # what a write that moves anything would put on the peer
    setup.transport.write(setup.channel, empty, setup.deadline())
    assert (setup.local == 0x5A).all()
    setup.transport.read(setup.channel, setup.plan([0], [0], [PEER_BYTES]), setup.deadline())
    np.testing.assert_array_equal(setup.local[:PEER_BYTES], setup.expected())  # an empty write changed the peer
    assert (setup.local[PEER_BYTES:] == 0x5A).all()


def _outside_ranges(setup: Setup):
    """Remote ranges a serving side must refuse, and whether the refusal is server-side."""
    if setup.name == "process_vm":  # one-sided: only unmapped or absurd addresses can be refused
        return [setup.raw_plan([setup.local.ctypes.data], [0], [16]),
                setup.raw_plan([setup.local.ctypes.data], [(1 << 45) + 4096], [16])]
    return [setup.plan([0], [PEER_BYTES - 10], [11]),
            setup.plan([0], [PEER_BYTES], [1]),
            setup.raw_plan([setup.local.ctypes.data], [setup.addr - 1], [2])]


def test_rejects_ranges_outside_registered_memory(setup: Setup):
    for plan in _outside_ranges(setup):
        for op in (setup.transport.read, setup.transport.write):
            with pytest.raises(RemoteRejected):
                op(setup.channel, plan, setup.deadline())
    rng = np.random.default_rng(3)
    local, remote, sizes = _case_16k_x4096(rng)
    setup.local[:] = SENTINEL
    setup.transport.read(setup.channel, setup.plan(local, remote, sizes), setup.deadline())  # still usable
    _check_copied(setup.local, local, setup.expected(), remote, sizes)


@pytest.mark.parametrize("setup", SERVER_CHECKED, indirect=True)
def test_one_bad_range_among_thousands_is_rejected(setup: Setup):
    local, remote, sizes = _case_16k_x4096(np.random.default_rng(5))
    remote = remote.copy()
    remote[2000] = PEER_BYTES  # one op just past the end
    setup.local[:] = SENTINEL
    for op in (setup.transport.read, setup.transport.write):
        with pytest.raises(RemoteRejected):
            op(setup.channel, setup.plan(local, remote, sizes), setup.deadline())
    assert (setup.local == SENTINEL).all()  # refused before any byte moved
    setup.transport.read(setup.channel, setup.plan([0], [0], [4096]), setup.deadline())
    np.testing.assert_array_equal(setup.local[:4096], setup.expected()[:4096])


def test_deadline_already_passed(setup: Setup):
    local, remote, sizes = _case_16k_x4096(np.random.default_rng(1))
    for op in (setup.transport.read, setup.transport.write):
        with pytest.raises(TransferTimeout):
            op(setup.channel, setup.plan(local, remote, sizes), time.monotonic() - 1.0)


def test_concurrent_reads_from_8_threads(setup: Setup):
    bs, per_thread = 16384, 256
    local_all, remote_all, _ = _case_16k_x4096(np.random.default_rng(11))
    errors = []
    setup.local[:] = SENTINEL

    def worker(k: int) -> None:
        sl = slice(k * per_thread, (k + 1) * per_thread)
        plan = setup.plan(local_all[sl], remote_all[sl], np.full(per_thread, bs))
        try:
            for _ in range(4):
                setup.transport.read(setup.channel, plan, setup.deadline())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    n = 8 * per_thread
    _check_copied(setup.local, local_all[:n], setup.expected(), remote_all[:n], np.full(n, bs))


def test_connect_with_a_bad_descriptor_fails(setup: Setup):
    for desc in (b"", b"garbage-descriptor", b"\0" * 64):
        bad = PeerInfo(cluster_id=3, host_id=setup.peer_info.host_id, pid=setup.peer.pid,
                       address="127.0.0.1", descriptor=desc)
        with pytest.raises(ConnectFailed):
            setup.transport.connect(bad, time.monotonic() + 2)


def test_disconnect_and_close_twice(fresh: Setup):
    t, ch = fresh.transport, fresh.channel
    plan = fresh.plan([0], [0], [4096])
    t.read(ch, plan, fresh.deadline())
    t.disconnect(ch)
    t.disconnect(ch)
    with pytest.raises((TransportClosed, ConnectFailed)):
        t.read(ch, plan, fresh.deadline())
    fresh.channel = fresh.connect()
    t.read(fresh.channel, plan, fresh.deadline())
    t.close()
    t.close()
    with pytest.raises(TransportClosed):
        t.read(fresh.channel, plan, fresh.deadline())
    with pytest.raises(ConnectFailed):
        t.connect(fresh.peer_info, fresh.deadline())


@pytest.mark.parametrize("fresh", TWO_PROCESS, indirect=True)
def test_stopped_peer(fresh: Setup):
    s = fresh
    plan = s.plan([0], [0], [8 << 20])
    s.peer.signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        if s.one_sided:  # nothing runs on the serving side: the copy completes anyway
            s.transport.read(s.channel, plan, start + 5)
            np.testing.assert_array_equal(s.local[:8 << 20], s.expected()[:8 << 20])
        else:
            for op in (s.transport.read, s.transport.write):
                start = time.monotonic()
                with pytest.raises(TransferTimeout):
                    op(s.channel, plan, start + 0.5)
                assert time.monotonic() - start < 3.0  # gives up at its 0.5 s deadline, never hangs
    finally:
        s.peer.signal(signal.SIGCONT)
    s.transport.read(s.channel, plan, s.deadline())  # usable again once the peer runs


@pytest.mark.parametrize("fresh", TWO_PROCESS, indirect=True)
def test_peer_killed_mid_transfer(fresh: Setup):
    """A dead peer: reads fail (or, where our mapping keeps its memory, return only its bytes); none hangs."""
    s = fresh
    local, remote, sizes = _case_16k_x4096(np.random.default_rng(2))
    plan = s.plan(local, remote, sizes)
    outcome = []
    stop, first_read = threading.Event(), threading.Event()
    finished = [0]  # reads that returned, each with the right bytes

    def reader() -> None:
        try:
            while not stop.is_set():
                s.local[:] = SENTINEL
                s.transport.read(s.channel, plan, time.monotonic() + NEVER_HANGS_S)
                _check_copied(s.local, local, s.expected(), remote, sizes)  # never other bytes
                finished[0] += 1
                first_read.set()
            outcome.append("no error")
        except (TransportClosed, TransferTimeout) as exc:
            outcome.append(exc)
        except Exception as exc:  # noqa: BLE001 - wrong exception type or wrong bytes
            outcome.append(repr(exc))
        first_read.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert first_read.wait(NEVER_HANGS_S)
    s.peer.kill()  # returns once the process is gone
    finished_at_kill = finished[0]
    # a read that began after the kill has ended: it failed, or (shm) it returned the dead peer's bytes
    assert wait_until(lambda: bool(outcome) or finished[0] >= finished_at_kill + 2, 3 * NEVER_HANGS_S)
    stop.set()
    thread.join(2 * NEVER_HANGS_S)
    assert not thread.is_alive()
    if s.name == "shm":  # the dead peer's segments stay mapped here: the link's closed connection ends the route
        assert outcome and (outcome[0] == "no error" or isinstance(outcome[0], (TransportClosed, TransferTimeout))), \
            outcome
        return
    assert outcome and isinstance(outcome[0], (TransportClosed, TransferTimeout)), outcome
    with pytest.raises((TransportClosed, ConnectFailed)):
        s.transport.read(s.channel, s.plan([0], [0], [16]), s.deadline(2.0))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("name", PARAMS)
def test_nothing_leaks_after_close(name):
    Setup(name).close()  # warm up imports and lazily created helpers
    threads, fds = threading.active_count(), _open_fds()
    for _ in range(2):
        pair = Setup(name)
        pair.transport.read(pair.channel, pair.plan([0], [0], [1 << 20]), pair.deadline())
        pair.close()
    assert wait_until(lambda: threading.active_count() <= threads)
    assert _open_fds() <= fds


_PVM_SYSCALLS = {"x86_64": (310, 311, 0xC000003E), "aarch64": (270, 271, 0xC00000B7)}  # readv, writev, audit arch


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _pvm_reads(pid: int, addr: int, nbytes: int) -> Optional[bytes]:
    """``nbytes`` at ``addr`` of process ``pid`` read with process_vm_readv called directly, None if refused."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    buf = ctypes.create_string_buffer(nbytes)
    local, remote = _IoVec(ctypes.addressof(buf), nbytes), _IoVec(addr, nbytes)
    got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    return buf.raw if got == nbytes else None


def _pvm_works_on_self() -> bool:
    marker = ctypes.create_string_buffer(b"pvm-probe-" + os.urandom(6))
    return _pvm_reads(os.getpid(), ctypes.addressof(marker), 16) == marker.raw[:16]


def _pvm_works_on_a_child() -> bool:
    code = ("import ctypes, os, sys; b = ctypes.create_string_buffer(b'child-marker-16b');"
            "print(ctypes.addressof(b), flush=True); sys.stdin.read()")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        addr = int(child.stdout.readline())
        return _pvm_reads(child.pid, addr, 16) == b"child-marker-16b"
    finally:
        child.stdin.close()
        child.wait(30)


def _memfd_segment_works() -> bool:
    """A memfd segment that another mapping of its /proc/self/fd path sees: what the shm transport shares."""
    if not hasattr(os, "memfd_create"):
        return False
    try:
        fd = os.memfd_create("conformance-probe")
    except OSError:
        return False
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        first = mmap.mmap(fd, mmap.PAGESIZE)
        first[:5] = b"probe"
        with open(f"/proc/self/fd/{fd}", "r+b") as again:
            second = mmap.mmap(again.fileno(), mmap.PAGESIZE)
            seen = second[:5]
            second.close()
        first.close()
        return seen == b"probe"
    except OSError:
        return False
    finally:
        os.close(fd)


def _nixl_installed() -> bool:
    """NIXL's package and a backend distribution that ships the UCX plugin (read from installed metadata)."""
    import importlib.metadata
    import importlib.util

    if sys.version_info < (3, 10) or importlib.util.find_spec("nixl") is None:
        return False
    for dist in importlib.metadata.distributions():
        if (dist.metadata["Name"] or "").lower().replace("_", "-") in ("nixl-cu12", "nixl-cu13", "nixl-rocm") and \
                any(os.path.basename(str(f)).startswith("libplugin_UCX") for f in dist.files or ()):
            return True
    return False


def _expected_transports() -> List[str]:
    """The transports this machine permits, from probes of the machine itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # tcp needs a loopback socket
    pvm = _pvm_works_on_self()
    if _pvm_works_on_a_child():
        assert pvm, "process_vm_readv works on a child and not on this process"
    permitted = {"loopback": True, "process_vm": pvm, "shm": _memfd_segment_works(), "tcp": True,
                 "nixl": _nixl_installed()}
    return [name for name in ALL if permitted[name]]


def test_available_transports_are_what_this_machine_permits():
    from llm_datadist._transport import transport_names, transport_report, unavailable_reason

    expected = _expected_transports()
    assert available_transports() == expected
    assert set(transport_names()) == set(ALL)
    for name, reason in transport_report():
        assert isinstance(reason, str) and (reason == "") == (name in expected), (name, reason)
        cls = transport_class(name)
        assert cls.name == name and cls.caps.memory_kinds and cls.available() == (name in expected)
    with pytest.raises(KeyError):
        transport_class("no-such-transport")
    with pytest.raises(KeyError):
        unavailable_reason("no-such-transport")


def _init_status(backend: str) -> LLMStatusCode:
    from llm_datadist import LLMConfig, LLMDataDist, LLMException, LLMRole

    from ports import free_port

    cfg = LLMConfig()
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = True
    cfg.listen_ip_info = f"127.0.0.1:{free_port()}"
    cfg.transfer_backend = backend
    dd = LLMDataDist(LLMRole.PROMPT, 9)
    try:
        dd.init(cfg.generate_options())
    except LLMException as exc:
        return exc.status_code
    dd.finalize()
    return LLMStatusCode.LLM_SUCCESS


def test_forcing_a_transport_this_process_lacks_fails_init(monkeypatch):
    monkeypatch.setitem(sys.modules, "nixl", None)  # the package can no longer be found
    assert "nixl" not in available_transports()
    assert _init_status("nixl") == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert _init_status("tcp,nixl") == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert _init_status("no-such-transport") == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert _init_status("tcp") == LLMStatusCode.LLM_SUCCESS


_SECCOMP_CHILD = r"""
import ctypes, json, os, struct, sys
readv, writev, arch = (int(x) for x in sys.argv[1:4])
def insn(code, jt, jf, k):
    return struct.pack("<HBBI", code, jt, jf, k)
LD, JEQ, RET = 0x20, 0x15, 0x06
EPERM_RET, ALLOW = 0x00050000 | 1, 0x7FFF0000
prog = b"".join([insn(LD, 0, 0, 4), insn(JEQ, 0, 4, arch), insn(LD, 0, 0, 0), insn(JEQ, 1, 0, readv),
                 insn(JEQ, 0, 1, writev), insn(RET, 0, 0, EPERM_RET), insn(RET, 0, 0, ALLOW)])
buf = ctypes.create_string_buffer(prog)
class Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) == 0, ctypes.get_errno()  # PR_SET_SECCOMP, FILTER
sys.path.insert(0, sys.argv[4])
import test_conformance as conformance
from llm_datadist._transport import available_transports
statuses = {b: int(conformance._init_status(b)) for b in ("process_vm", "tcp")}
print(json.dumps({"probe": conformance._pvm_works_on_self(), "available": available_transports(),
                  "init": statuses}))
"""


@pytest.mark.skipif(os.uname().machine not in _PVM_SYSCALLS, reason="seccomp filter written for x86_64 and aarch64")
def test_a_process_denied_process_vm_readv_lacks_that_transport_and_cannot_force_it():
    """A seccomp filter refuses process_vm_readv/writev in a child: the library there must agree."""
    readv, writev, arch = _PVM_SYSCALLS[os.uname().machine]
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    env.pop("LLM_DATADIST_TRANSPORT", None)
    out = subprocess.run([sys.executable, "-c", _SECCOMP_CHILD, str(readv), str(writev), str(arch),
                          os.path.dirname(os.path.abspath(__file__))],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    child = json.loads(out.stdout.strip().splitlines()[-1])
    assert child["probe"] is False  # the filter works: the direct call is refused
    assert child["available"] == [n for n in _expected_transports() if n != "process_vm"]
    assert child["init"] == {"process_vm": int(LLMStatusCode.LLM_FEATURE_NOT_ENABLED),
                             "tcp": int(LLMStatusCode.LLM_SUCCESS)}


def test_stale_guard_fails_reads_and_writes_and_a_live_one_still_works(fresh: Setup):
    """The owner released the cache (its generation changed): nothing may report success over it."""
    info = fresh.add(1 << 20)  # a second region with its own guard
    plan = fresh.plan([0], [4096], [8192], guard=info["guard"], base=info["addr"])
    fresh.local[:] = SENTINEL
    fresh.transport.read(fresh.channel, plan, fresh.deadline())
    from peer_server import pattern as peer_pattern

    np.testing.assert_array_equal(fresh.local[:8192], peer_pattern(info["nbytes"], info["seed"])[4096:4096 + 8192])
    fresh.peer.command("invalidate", "1")
    fresh.local[:] = SENTINEL
    for op in (fresh.transport.read, fresh.transport.write):
        with pytest.raises(StaleMemory):
            op(fresh.channel, plan, fresh.deadline())
    fresh.transport.read(fresh.channel, fresh.plan([0], [0], [4096]), fresh.deadline())  # the other still works
    np.testing.assert_array_equal(fresh.local[:4096], fresh.expected()[:4096])


@pytest.mark.parametrize("fresh", SAME_HOST, indirect=True)
def test_a_wrong_instance_nonce_is_refused_at_connect(fresh: Setup):
    """A one-sided route must prove the peer's identity (another pid namespace, a reused pid, another agent)."""
    import dataclasses

    impostor = dataclasses.replace(fresh.peer_info, nonce=b"\x01" * 16)
    with pytest.raises(ConnectFailed):
        fresh.transport.connect(impostor, fresh.deadline(3))


# ---- transport-specific checks -------------------------------------------------------------------

def _raw_connection(s: Setup) -> socket.socket:
    port = struct.unpack("<4sH", s.peer_info.descriptor)[1]
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(4096)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


@pytest.mark.parametrize("setup", TCP, indirect=True)
def test_tcp_wrong_token_and_malformed_frames_close_only_that_connection(setup: Setup):
    from llm_datadist._transport import tcp_wire as tcp

    token = setup.peer_info.credential
    cases = [
        tcp.header(tcp.OP_HELLO, nbytes=32) + b"x" * 32,  # wrong token
        b"\xff" * 64,  # garbage
        tcp.header(tcp.OP_HELLO, nbytes=32) + token + b"\x00" * 40,  # bad magic after hello
        tcp.header(tcp.OP_HELLO, nbytes=32) + token + tcp.header(tcp.OP_READ, count=tcp.MAX_OPS + 1),
        tcp.header(tcp.OP_HELLO, nbytes=32) + token + tcp.header(tcp.OP_READ, guards=tcp.MAX_GUARDS + 1),
        tcp.header(tcp.OP_HELLO, nbytes=32) + token + tcp.header(9),  # unknown op
    ]
    for frame in cases:
        sock = _raw_connection(setup)
        sock.sendall(frame)
        assert _closed_by_peer(sock)
    import dataclasses

    for credential in (b"", b"y" * 32):
        with pytest.raises(ConnectFailed):
            setup.transport.connect(dataclasses.replace(setup.peer_info, credential=credential),
                                    time.monotonic() + 3)
    setup.transport.read(setup.channel, setup.plan([0], [0], [4096]), setup.deadline())
    np.testing.assert_array_equal(setup.local[:4096], setup.expected()[:4096])


@pytest.mark.parametrize("setup", TCP, indirect=True)
def test_tcp_guard_table_is_never_served(setup: Setup):
    table = setup.raw_plan([setup.local.ctypes.data], [setup.guard.addr], [8])
    with pytest.raises(RemoteRejected):
        setup.transport.read(setup.channel, table, setup.deadline())


@pytest.mark.parametrize("fresh", TCP, indirect=True)
def test_tcp_revoked_token_closes_its_connections_and_refuses_new_ones(fresh: Setup):
    plan = fresh.plan([0], [0], [4096])
    fresh.transport.read(fresh.channel, plan, fresh.deadline())
    fresh.peer.command("revoke")
    with pytest.raises((TransportClosed, RemoteRejected)):
        fresh.transport.read(fresh.channel, plan, fresh.deadline(5))
    with pytest.raises(ConnectFailed):
        fresh.connect()


@pytest.mark.parametrize("setup", TCP, indirect=True)
def test_tcp_idle_unauthenticated_sockets_do_not_block_a_link(setup: Setup):
    """Hundreds of sockets that never say hello cost no thread and do not keep a real client out."""
    idle = [_raw_connection(setup) for _ in range(300)]
    try:
        channel = setup.connect()
        setup.transport.read(channel, setup.plan([0], [0], [4096]), setup.deadline())
        np.testing.assert_array_equal(setup.local[:4096], setup.expected()[:4096])
        setup.transport.disconnect(channel)
    finally:
        for sock in idle:
            sock.close()


@pytest.mark.parametrize("setup", SHM, indirect=True)
def test_shm_covers_only_shared_ranges_and_learns_late_regions(setup: Setup):
    t, ch = setup.transport, setup.channel
    assert t.covers(ch, setup.plan([0], [0], [PEER_BYTES]))
    assert not t.covers(ch, setup.plan([0], [0], [PEER_BYTES + 1]))
    info = setup.add(1 << 20)  # registered after we connected, learned from the next cache table
    late = setup.plan([0], [100], [5000], guard=info["guard"], base=info["addr"])
    assert t.covers(ch, late)
    t.read(ch, late, setup.deadline())
    from peer_server import pattern

    np.testing.assert_array_equal(setup.local[:5000], pattern(info["nbytes"], info["seed"])[100:5100])


@pytest.mark.parametrize("name", [n for n in ("loopback", "process_vm") if n in TESTED])
def test_in_process_peer_closed_is_transport_closed(name):
    from peer_server import Peer

    server = Peer(name, 4096)
    client = transport_class(name)(ctx())
    info = server.hello()
    dst = np.zeros(4096, dtype=np.uint8)
    from llm_datadist._transport.base import Guard

    peer = PeerInfo(5, "h", os.getpid(), "127.0.0.1", bytes.fromhex(info["local_info"]),
                    nonce=bytes.fromhex(info["nonce"]))
    channel = client.connect(peer, time.monotonic() + 5)
    plan = CopyPlan([dst.ctypes.data], [info["addr"]], [4096], guards=(Guard(*info["guard"]),))
    client.read(channel, plan, time.monotonic() + 5)
    assert (dst == server.segments[0].array).all()
    server.transport.close()
    if name == "loopback":
        with pytest.raises(TransportClosed):
            client.read(channel, plan, time.monotonic() + 5)
        with pytest.raises(ConnectFailed):
            client.connect(peer, time.monotonic() + 5)
    server.close()
    client.close()


def test_same_machine_compares_boot_ids_and_sizes_tcp_streams():
    from llm_datadist._transport import tcp
    from llm_datadist._transport.base import same_machine

    assert same_machine("prefill/1b2c", "decode-container/1b2c")  # containers of one machine: one boot id
    assert not same_machine("host/1b2c", "host/9f8e")  # same hostname, another kernel
    assert not same_machine("a/no-boot-id", "b/no-boot-id") and not same_machine("", "")
    assert 1 <= tcp.streams_per_transfer(True) <= tcp.streams_per_transfer(False)


@pytest.mark.parametrize("setup", TCP, indirect=True)
def test_tcp_spreads_a_large_transfer_over_the_channels_streams(setup: Setup):
    rng = np.random.default_rng(3)
    local, remote, sizes = CASES["16k_x4096"](rng)  # 64 MiB: room for three streams of at least 2 MiB
    channel = setup.channel
    before = channel.streams
    channel.streams = 3
    try:
        setup.local[:] = SENTINEL
        setup.transport.read(channel, setup.plan(local, remote, sizes), setup.deadline())
        _check_copied(setup.local, local, setup.expected(), remote, sizes)
        assert len(channel._all) >= 3, "the transfer did not open its extra streams"
        payload = rng.integers(0, 256, LOCAL_BYTES, dtype=np.uint8)
        setup.local[:] = payload
        setup.transport.write(channel, setup.plan(local, remote, sizes), setup.deadline())
        setup.local[:] = 0
        setup.transport.read(channel, setup.plan([0], [0], [PEER_BYTES]), setup.deadline())
        _check_copied(setup.local[:PEER_BYTES].copy(), remote, payload, local, sizes)
    finally:
        channel.streams = before
        setup.peer.command("reset")
