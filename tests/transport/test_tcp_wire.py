"""The tcp transport's small-frame helpers over a real socket pair: partial moves, timeouts, a closed peer."""
from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from llm_datadist._transport import tcp_wire as wire
from llm_datadist._transport.base import TransferTimeout, TransportClosed


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    for sock in (a, b):
        wire.tune(sock)
    yield a, b
    a.close()
    b.close()


def _timeout_after(sock, seconds, budget):
    """A stall callback as the transport's: re-arms the socket timeouts, raises once ``budget`` calls are used."""
    calls = []

    def stall():
        calls.append(1)
        if len(calls) > budget:
            raise TransferTimeout("deadline passed")
        wire.set_timeouts(sock, seconds)

    return stall, calls


def test_bytes_larger_than_the_socket_buffers_arrive_whole(pair):
    a, b = pair
    data = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    got = []
    reader = threading.Thread(target=lambda: got.append(wire.recv_bytes(b, len(data), lambda: None)))
    reader.start()
    wire.send_bytes(a, data, lambda: None)
    reader.join(10)
    assert got == [data]


def test_a_frame_sent_in_pieces_is_received_whole_and_the_waits_are_stalls(pair):
    a, b = pair
    wire.set_timeouts(b, 0.05)
    stall, calls = _timeout_after(b, 0.05, budget=1000)
    frame = wire.header(wire.OP_READ, wire.ST_OK, 3, 48, 1)
    sender = threading.Timer(0.2, lambda: (a.sendall(frame[:5]), threading.Timer(0.2, lambda: a.sendall(frame[5:]))
                                           .start()))
    sender.start()
    assert wire.parse_header(wire.recv_bytes(b, wire.HDR.size, stall)) == (wire.OP_READ, wire.ST_OK, 3, 1, 48)
    sender.join()
    assert calls, "waiting for the pieces went through the stall callback"


def test_a_silent_peer_ends_in_the_deadline_error(pair):
    _a, b = pair
    wire.set_timeouts(b, 0.02)
    stall, _ = _timeout_after(b, 0.02, budget=3)
    with pytest.raises(TransferTimeout):
        wire.recv_bytes(b, 16, stall)


def test_a_closed_peer_is_transport_closed(pair):
    a, b = pair
    a.sendall(b"abc")
    a.close()
    with pytest.raises(TransportClosed):
        wire.recv_bytes(b, 16, lambda: None)
    with pytest.raises(TransportClosed):
        for _ in range(100):  # the first sends may still land in the buffer of the closed socket
            wire.send_bytes(b, b"x" * 65536, lambda: None)


def test_ranges_as_ints_move_both_ways(pair):
    a, b = pair
    rng = np.random.default_rng(9)
    src = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    pieces = [(0, 100), (4096, 1 << 20), (2 << 20, 5), (3 << 20 - 7, 7)]  # one larger than a 1 MiB window
    sizes = [n for _, n in pieces]
    out = [src.ctypes.data + off for off, _ in pieces]
    into = [dst.ctypes.data + off for off, _ in pieces]
    reader = threading.Thread(target=wire.recv, args=(b, into, sizes, lambda: None))
    reader.start()
    wire.send(a, out, sizes, lambda: None)
    reader.join(10)
    for off, n in pieces:
        assert dst[off:off + n].tobytes() == src[off:off + n].tobytes()
    assert not dst[100:4096].any() and not dst[(1 << 20) + 4096:2 << 20].any()
