"""Shared helpers of the examples: run the roles as processes, a control channel, instances, KV tensors, checks."""
from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import sys
import time
import traceback
import uuid
from multiprocessing.connection import Connection
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from llm_datadist import (DataType, LLMClusterInfo, LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode,
                          RegisterMemStatus)

LOCALHOST = "127.0.0.1"
ROLE_TIMEOUT_S = 60.0  # a whole example run; every wait inside is shorter
MESSAGE_TIMEOUT_S = 30.0
INIT_ATTEMPTS = 5  # a probed free port may be taken by another process before we bind it
LINK_TIMEOUT_MS = 5000


class Mismatch(AssertionError):
    """The receiving side found other bytes than the sending side wrote."""


# ---- command line and processes ------------------------------------------------------------------
def parse_args(description: str, extra: Optional[Callable[[argparse.ArgumentParser], None]] = None):
    """The common options: ``--torch`` (torch CPU tensors instead of numpy arrays)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--torch", action="store_true", help="use torch CPU tensors instead of numpy arrays")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.torch:
        try:
            import torch  # noqa: F401 - only checks that it is there
        except ImportError:
            parser.error("--torch needs torch installed")
    return args


class Channel:
    """The control channel between two roles (the official samples use torch.distributed barriers)."""

    def __init__(self, conn: Connection, peer: str) -> None:
        self._conn = conn
        self.peer = peer

    def send(self, tag: str, value: Any = None) -> None:
        self._conn.send((tag, value))

    def recv(self, tag: str, timeout: float = MESSAGE_TIMEOUT_S) -> Any:
        """Wait for the message ``tag`` from the peer and return its value."""
        if not self._conn.poll(timeout):
            raise TimeoutError(f"no {tag!r} from {self.peer} within {timeout} s")
        got, value = self._conn.recv()
        if got != tag:
            raise RuntimeError(f"expected {tag!r} from {self.peer}, got {got!r}")
        return value

    def barrier(self, tag: str) -> None:
        """Both sides reach ``tag`` before either goes on."""
        self.send(tag)
        self.recv(tag)


def _role_main(name: str, fn: Callable, channels: List[Channel], args: Any, settings: Dict[str, Any]) -> None:
    SETTINGS.update(settings)
    try:
        fn(channels if len(channels) != 1 else channels[0], args)
    except BaseException:  # noqa: BLE001 - report any failure through the exit code
        print(f"[{name}] FAILED", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.exit(1)
    print(f"[{name}] done", flush=True)


def run_roles(example: str, hub: Tuple[str, Callable], others: Sequence[Tuple[str, Callable]], args: Any) -> int:
    """Start every role in its own (spawned) process and wait for all of them.

    The hub gets a list of channels, one per other role (or the channel itself when there is one other role);
    every other role gets its channel to the hub. Each role function is called as ``fn(channel(s), args)``.

    Returns:
        The exit code of the example: 0 when every role succeeded, 1 otherwise.
    """
    ctx = multiprocessing.get_context("spawn")
    settings = {"torch": bool(getattr(args, "torch", False)), "run_id": uuid.uuid4().hex[:10]}
    hub_ends, processes = [], []
    for name, fn in others:
        mine, theirs = ctx.Pipe()
        hub_ends.append(Channel(mine, name))
        processes.append(ctx.Process(target=_role_main, args=(name, fn, [Channel(theirs, hub[0])], args, settings),
                                     name=name))
    processes.insert(0, ctx.Process(target=_role_main, args=(hub[0], hub[1], hub_ends, args, settings), name=hub[0]))
    for process in processes:
        process.start()
    deadline = time.monotonic() + ROLE_TIMEOUT_S
    failed = False
    pending = list(processes)
    while pending and time.monotonic() < deadline:
        for process in list(pending):
            process.join(0.05)
            if process.exitcode is not None:
                pending.remove(process)
                failed = failed or process.exitcode != 0
        if failed:
            break
    for process in pending:  # a failed peer, or the deadline: stop the rest
        process.terminate()
        process.join(5)
        failed = True
    print(f"{example}: {'FAILED' if failed else 'OK, every byte checked'}", flush=True)
    return 1 if failed else 0


#: Settings of the run, copied into every role process (torch or numpy, a run id for unique names).
SETTINGS: Dict[str, Any] = {"torch": False, "run_id": "local"}


# ---- instances ----------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port of the loopback address that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def init_datadist(role: LLMRole, cluster_id: Union[int, Callable[[int], int]], listen: bool = False,
                  **config: Any) -> Tuple[LLMDataDist, int]:
    """An initialized instance; with ``listen`` it listens on a free port (retried if another process takes it).

    Args:
        role: the role label.
        cluster_id: the instance's cluster id, or a function of the listen port that gives it.
        listen: whether it is a link server (``listen_ip_info``).
        **config: LLMConfig attributes (``enable_cache_manager=True`` unless given).

    Returns:
        ``(instance, listen port or 0)``.
    """
    last: Optional[LLMException] = None
    for _ in range(INIT_ATTEMPTS if listen else 1):
        llm_config = LLMConfig()
        llm_config.device_id = 0
        settings = {"enable_cache_manager": True, **config}
        for name, value in settings.items():
            setattr(llm_config, name, value)
        port = free_port() if listen else 0
        if listen:
            llm_config.listen_ip_info = f"{LOCALHOST}:{port}"
        datadist = LLMDataDist(role, cluster_id(port) if callable(cluster_id) else cluster_id)
        try:
            datadist.init(llm_config.generate_options())
            return datadist, port
        except LLMException as exc:
            last = exc
            if "in use" not in str(exc):
                raise
    raise RuntimeError(f"no free listen port after {INIT_ATTEMPTS} attempts: {last}")


def ip_port_id(ip: str, port: int) -> int:
    """A cluster id made of an IPv4 address and a port, ``ip << 16 | port`` (as the official xPyD sample)."""
    return int.from_bytes(socket.inet_aton(ip), "big") << 16 | port


def cluster(remote_cluster_id: int, remote_port: int, local_port: int = 0) -> LLMClusterInfo:
    """The LLMClusterInfo of a listening peer on this host."""
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_cluster_id
    info.append_local_ip_info(LOCALHOST, local_port)
    info.append_remote_ip_info(LOCALHOST, remote_port)
    return info


def expect_success(what: str, result: Tuple[LLMStatusCode, List[LLMStatusCode]],
                   also: Sequence[LLMStatusCode] = ()) -> None:
    """Raise unless ``link_clusters``/``unlink_clusters`` succeeded for every cluster (or returned ``also``)."""
    accepted = (LLMStatusCode.LLM_SUCCESS, *also)
    status, per_cluster = result
    if status not in accepted or any(code not in accepted for code in per_cluster):
        raise RuntimeError(f"{what} failed: {status}, {per_cluster}")


def rank_table(num_ranks: int) -> str:
    """A one-server rank table whose ranks all live on this host (each process is one "device")."""
    devices = [{"device_id": str(rank), "device_ip": LOCALHOST, "rank_id": str(rank)} for rank in range(num_ranks)]
    return json.dumps({"server_count": "1", "status": "completed", "version": "1.2",
                       "server_list": [{"device": devices, "server_id": LOCALHOST}]})


def comm_name(base: str) -> str:
    """A comm domain name unique to this run, so that concurrent runs on one host never meet."""
    return f"{base}-{SETTINGS['run_id']}"


def link_comm_with(ch: Channel, datadist: LLMDataDist, cluster_rank_info: Dict[int, int], names_it: bool) -> int:
    """Both sides of a pair call this at about the same time: one names the domain and tells the other, then
    each links the domain of the two clusters (ranks in ``cluster_rank_info``) and waits until it is OK."""
    if names_it:
        name = comm_name("link")
        ch.send("comm name", name)
    else:
        name = ch.recv("comm name")
    return link_comm(datadist, name, cluster_rank_info, rank_table(len(cluster_rank_info)))


def link_comm(datadist: LLMDataDist, name: str, cluster_rank_info: Dict[int, int], table: str,
              timeout_s: float = 30.0) -> int:
    """``link`` a comm domain and poll ``query_register_mem_status`` until OK; returns the comm id."""
    comm_id = datadist.link(name, cluster_rank_info, table)
    deadline = time.monotonic() + timeout_s
    while True:
        status = datadist.query_register_mem_status(comm_id)
        if status == RegisterMemStatus.OK:
            return comm_id
        if status == RegisterMemStatus.FAILED or time.monotonic() > deadline:
            raise RuntimeError(f"comm domain {name} did not link: {status}")
        time.sleep(0.01)


# ---- KV tensors ---------------------------------------------------------------------------------
def pattern(seed: int, shape: Sequence[int], dtype: Any = np.float16) -> np.ndarray:
    """Deterministic content: the same seed gives the same bytes in every process."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.random.default_rng(seed).integers(1, 256, nbytes, dtype=np.uint8)  # never 0: 0 means "untouched"
    return raw.view(dtype).reshape(tuple(shape))


def kv_tensors(num_tensors: int, shape: Sequence[int], seed: Optional[int] = None,
               dtype: Any = np.float16) -> List[Any]:
    """``num_tensors`` KV tensors (numpy arrays, or torch CPU tensors with ``--torch``), patterned by ``seed``
    (tensor t gets seed ``seed + t``) or zero when ``seed`` is None."""
    arrays = [pattern(seed + t, shape, dtype) if seed is not None else np.zeros(tuple(shape), dtype)
              for t in range(num_tensors)]
    if not SETTINGS["torch"]:
        return arrays
    import torch

    return [torch.from_numpy(array) for array in arrays]


DATA_TYPE = DataType.DT_FLOAT16  # the dtype of kv_tensors() by default (numpy float16, torch.float16)


def rows(tensor: Any) -> np.ndarray:
    """The bytes of a tensor as one row per block (or batch slot): row i is dim-0 index i."""
    array = tensor.numpy() if hasattr(tensor, "numpy") and not isinstance(tensor, np.ndarray) else tensor
    return np.ascontiguousarray(array).view(np.uint8).reshape(array.shape[0], -1)


def check_rows(what: str, actual: Any, actual_rows: Sequence[int], expected: np.ndarray,
               expected_rows: Sequence[int]) -> None:
    """Raise Mismatch unless ``actual``'s rows equal ``expected``'s rows, pairwise, byte for byte."""
    got, want = rows(actual), rows(expected)
    for a, e in zip(actual_rows, expected_rows):
        if got[a].tobytes() != want[e].tobytes():
            raise Mismatch(f"{what}: row {a} differs from the expected row {e}")


def check_untouched(what: str, actual: Any, untouched_rows: Sequence[int]) -> None:
    """Raise Mismatch unless the given rows are still all zero (nothing was written there)."""
    got = rows(actual)
    for row in untouched_rows:
        if got[row].any():
            raise Mismatch(f"{what}: row {row} was written but should not have been")
