"""``bench --hosts netns --scale N``: one decode linked to N prefills and one prefill serving N decodes, a host each.

Reports the link set-up time, what each link costs the hub process (resident memory, threads, descriptors:
after linking and after the first transfers over the links), and the aggregate throughput of concurrent
pulls, every pull verified. Results: ``scale.md`` and ``scale.jsonl`` in ``--out``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from llm_datadist_bench.common import MIB, Buffer, block_order, fill_pattern, gbps, record, verify_blocks

if TYPE_CHECKING:
    from llm_datadist import LLMDataDist

__all__ = ["run_scale", "scale_worker"]

PROG = "llm-datadist bench --hosts netns --scale"
LISTEN_PORT = 26000  # every host has its own network namespace: one port for all
BLOCK_BYTES = 256 << 10
PER_PEER_MIB = 32
PASSES = 3
HUB_ID, FIRST_LEAF_ID = 500, 501
CALL_TIMEOUT_S = 300.0


# ----------------------------------------------------------------------------------------------
# The worker (one per host)
# ----------------------------------------------------------------------------------------------
def _resources() -> Dict[str, Any]:
    out: Dict[str, Any] = {"fds": len(os.listdir("/proc/self/fd")),
                           "python_threads": sorted(t.name for t in threading.enumerate())}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_kib"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value)
    return out


class _Worker:
    """One LLMDataDist and its caches; the orchestrator drives it message by message."""

    def __init__(self) -> None:
        self._dd: Optional[LLMDataDist] = None
        self.cluster_id = 0
        self.ip = ""
        self.buffers: Dict[int, Buffer] = {}
        self.caches: Dict[int, Any] = {}
        self.interpreter = _resources()  # before any instance

    def init(self, role: str, cluster_id: int, ip: str, listen: bool, timeout_ms: int) -> Dict[str, int]:
        from llm_datadist import LLMConfig, LLMDataDist, LLMRole

        config = LLMConfig()
        config.enable_cache_manager = True
        config.sync_kv_timeout = timeout_ms
        if listen:
            config.listen_ip_info = f"{ip}:{LISTEN_PORT}"
        dd = self._dd = LLMDataDist(LLMRole.PROMPT if role == "prefill" else LLMRole.DECODER, cluster_id)
        self.cluster_id = cluster_id
        dd.init(config.generate_options())
        self.ip = ip
        return _resources()

    def resources(self) -> Dict[str, int]:
        """Resident memory (KiB), threads and open descriptors of this process now."""
        return _resources()

    @property
    def dd(self) -> LLMDataDist:
        if self._dd is None:
            raise RuntimeError("the worker got a request before init")
        return self._dd

    def register(self, model_id: int, blocks: int, block_bytes: int, salt: Optional[int]) -> Dict[str, int]:
        from llm_datadist import BlocksCacheKey, CacheDesc, DataType, Placement

        buf = Buffer(blocks * block_bytes)
        if salt is not None:
            fill_pattern(buf.array, salt)
        desc = CacheDesc(1, [blocks, block_bytes], DataType.DT_UINT8, Placement.DEVICE)
        key = BlocksCacheKey(self.cluster_id, model_id)
        self.caches[model_id] = self.dd.cache_manager.register_blocks_cache(desc, [buf.addr], key)
        self.buffers[model_id] = buf
        return _resources()

    def link(self, targets: Sequence[Tuple[str, int]]) -> Dict[str, Any]:
        """One link_clusters call to every (ip, cluster id) in ``targets``."""
        from llm_datadist import LLMClusterInfo

        infos = []
        for ip, cluster_id in targets:
            info = LLMClusterInfo()
            info.remote_cluster_id = cluster_id
            info.append_local_ip_info(self.ip, 0)
            info.append_remote_ip_info(ip, LISTEN_PORT)
            infos.append(info)
        start = time.perf_counter()
        code, codes = self.dd.link_clusters(infos, 30000)
        elapsed = time.perf_counter() - start
        if int(code) != 0:
            raise RuntimeError(f"link_clusters failed: {code.name} {[c.name for c in codes]}")
        return {"seconds": elapsed, **_resources()}

    def _pull(self, spec: Tuple[int, int, int, List[int], List[int]]) -> Tuple[float, float]:
        from llm_datadist import BlocksCacheKey

        cluster_id, model_id, local_model, src, dst = spec
        start = time.monotonic()
        self.dd.cache_manager.pull_blocks(BlocksCacheKey(cluster_id, model_id), self.caches[local_model], src, dst)
        return start, time.monotonic()

    def pulls(self, specs: Sequence[tuple], salts: Sequence[int]) -> Dict[str, Any]:
        """The pulls of ``specs`` at once, one thread each; their (start, end) times, then verified."""
        times: List[Optional[Tuple[float, float]]] = [None] * len(specs)
        errors: List[BaseException] = []
        gate = threading.Barrier(len(specs))

        def run(i: int) -> None:
            try:
                gate.wait()
                times[i] = self._pull(specs[i])
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,), name=f"scale-pull-{i}") for i in range(len(specs))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        for spec, salt in zip(specs, salts):
            problem = verify_blocks(self.buffers[spec[2]].array, BLOCK_BYTES, np.array(spec[3]), np.array(spec[4]),
                                    salt)
            if problem:
                raise RuntimeError(f"pull from cluster {spec[0]} moved the wrong bytes: {problem}")
        return {"times": times, **_resources()}

    def finalize(self) -> Dict[str, Any]:
        """Finalize, then the resources once the joined threads have left the kernel's count (up to 2 s)."""
        self.dd.finalize()
        for buf in self.buffers.values():
            buf.close()
        self.buffers.clear()
        deadline = time.monotonic() + 2.0
        now = _resources()
        while now["threads"] > self.interpreter["threads"] and time.monotonic() < deadline:
            time.sleep(0.01)
            now = _resources()
        return now


def scale_worker(parent, job: Any) -> None:
    """Child entry: answer the orchestrator's (method, args) messages until ("exit",)."""
    del job  # the orchestrator sends its instructions as messages
    worker = _Worker()
    parent.send(("ok", worker.interpreter))
    while True:
        msg = parent.recv()
        if msg[0] == "exit":
            parent.send(("ok", {}))
            return
        try:
            parent.send(("ok", getattr(worker, msg[0])(*msg[1:])))
        except Exception as exc:  # noqa: BLE001 - the orchestrator reports it
            parent.send(("error", f"{msg[0]}: {type(exc).__name__}: {exc}"))


# ----------------------------------------------------------------------------------------------
# The orchestrator
# ----------------------------------------------------------------------------------------------
class _Peers:
    """The workers of one phase: host 0 is the hub, hosts 1..N the leaves."""

    def __init__(self, hosts, count: int) -> None:
        from llm_datadist_bench.netns_procs import start_child

        self.hosts = hosts
        self.procs, self.conns = [], []
        for index in range(count + 1):
            proc, conn = start_child(hosts, index, "scale", {"index": index})
            self.procs.append(proc)
            self.conns.append(conn)
        self.baseline = [self.reply(i) for i in range(count + 1)]  # the interpreter before any instance

    def reply(self, index: int) -> Any:
        conn = self.conns[index]
        if not conn.poll(CALL_TIMEOUT_S):
            raise RuntimeError(f"host {index} did not answer within {CALL_TIMEOUT_S:.0f} s")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"host {index}: {value}")
        return value

    def ask(self, index: int, *msg: Any) -> Any:
        self.conns[index].send(msg)
        return self.reply(index)

    def ask_all(self, indices: Sequence[int], make_msg) -> List[Any]:
        """Send to every index first, then collect (the workers run at the same time)."""
        for i in indices:
            self.conns[i].send(make_msg(i))
        return [self.reply(i) for i in indices]

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit",))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(10.0)
            proc.kill()
        for conn in self.conns:
            conn.close()


def _plan(leaf: int, blocks: int, seed: int) -> Tuple[List[int], List[int]]:
    """Leaf ``leaf``'s pull: every block, in a scattered order of its own (source and destination permutations)."""
    src, dst = block_order(blocks, seed + leaf)
    return src.tolist(), dst.tolist()


def _aggregate(times: Sequence[Tuple[float, float]], nbytes: int) -> float:
    return gbps(nbytes, max(t[1] for t in times) - min(t[0] for t in times))


def _per_link(after: Dict[str, int], before: Dict[str, int], links: int) -> Dict[str, float]:
    return {k: (after[k] - before[k]) / links for k in ("rss_kib", "threads", "fds")}


def _fan_in(hosts, n: int, blocks: int, args: argparse.Namespace) -> Dict[str, Any]:
    """The hub is a decode pulling from N prefills at once."""
    peers = _Peers(hosts, n)
    try:
        timeout_ms = int(args.timeout * 1000)
        leaves = range(1, n + 1)
        peers.ask_all(leaves, lambda i: ("init", "prefill", FIRST_LEAF_ID + i - 1, hosts[i].ip, True, timeout_ms))
        peers.ask_all(leaves, lambda i: ("register", 0, blocks, BLOCK_BYTES, i))
        peers.ask(0, "init", "decode", HUB_ID, hosts[0].ip, False, timeout_ms)
        for i in leaves:
            peers.ask(0, "register", i, blocks, BLOCK_BYTES, None)
        before = peers.ask(0, "resources")  # the hub ready, nothing linked
        linked = peers.ask(0, "link", [(hosts[i].ip, FIRST_LEAF_ID + i - 1) for i in leaves])
        specs = [(FIRST_LEAF_ID + i - 1, 0, i) + _plan(i, blocks, args.seed) for i in leaves]
        walls: List[float] = []
        after_transfer: Dict[str, Any] = {}
        for _ in range(args.warmup + PASSES):
            result = peers.ask(0, "pulls", specs, list(leaves))
            walls.append(_aggregate(result["times"], n * blocks * BLOCK_BYTES))
            after_transfer = after_transfer or result
        final = peers.ask(0, "finalize")
        for i in leaves:
            peers.ask(i, "finalize")
        return dict(phase="fan-in", hub="decode", links=n, link_all_ms=linked["seconds"] * 1e3,
                    per_link_after_link=_per_link(linked, before, n),
                    per_link_after_transfer=_per_link(after_transfer, before, n),
                    aggregate_samples_gbps=walls[args.warmup:], hub_before=before, hub_linked=linked,
                    hub_after_transfer={k: v for k, v in after_transfer.items() if k != "times"},
                    hub_after_finalize=final, hub_interpreter=peers.baseline[0])
    finally:
        peers.close()


def _fan_out(hosts, n: int, blocks: int, args: argparse.Namespace) -> Dict[str, Any]:
    """The hub is a prefill serving N decodes, each pulling at the same time."""
    peers = _Peers(hosts, n)
    try:
        timeout_ms = int(args.timeout * 1000)
        leaves = range(1, n + 1)
        peers.ask(0, "init", "prefill", HUB_ID, hosts[0].ip, True, timeout_ms)
        peers.ask(0, "register", 0, blocks, BLOCK_BYTES, 0)
        before = peers.ask(0, "resources")
        peers.ask_all(leaves, lambda i: ("init", "decode", FIRST_LEAF_ID + i - 1, hosts[i].ip, False, timeout_ms))
        peers.ask_all(leaves, lambda i: ("register", 0, blocks, BLOCK_BYTES, None))
        link_ms = []
        for i in leaves:  # one at a time: the set-up time of each link and the hub's growth
            link_ms.append(peers.ask(i, "link", [(hosts[0].ip, HUB_ID)])["seconds"] * 1e3)
        hub_after_links = peers.ask(0, "resources")
        specs = {i: (HUB_ID, 0, 0) + _plan(i, blocks, args.seed) for i in leaves}
        walls = []
        hub_after_transfer: Dict[str, Any] = {}
        for _ in range(args.warmup + PASSES):
            results = peers.ask_all(leaves, lambda i: ("pulls", [specs[i]], [0]))
            walls.append(_aggregate([r["times"][0] for r in results], n * blocks * BLOCK_BYTES))
            hub_after_transfer = hub_after_transfer or peers.ask(0, "resources")
        for i in leaves:
            peers.ask(i, "finalize")
        final = peers.ask(0, "finalize")
        return dict(phase="fan-out", hub="prefill", links=n, link_samples_ms=link_ms,
                    per_link_after_link=_per_link(hub_after_links, before, n),
                    per_link_after_transfer=_per_link(hub_after_transfer, before, n),
                    aggregate_samples_gbps=walls[args.warmup:], hub_before=before, hub_linked=hub_after_links,
                    hub_after_transfer=hub_after_transfer, hub_after_finalize=final,
                    hub_interpreter=peers.baseline[0])
    finally:
        peers.close()


def _markdown(results: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# llm-datadist bench --hosts netns --scale {meta['links']}, {meta['date']}", "",
             "; ".join(f"{k}: {meta[k]}" for k in ("host", "cpu", "python", "library", "mtu", "per_peer_mib",
                                                    "block", "passes", "wall_s") if k in meta), "",
             "| hub | links | link set-up (ms) | hub RSS per link (KiB): linked / after transfers | "
             "hub threads per link: linked / after transfers | hub descriptors per link: linked / after transfers | "
             "aggregate pull GB/s, median (min-max) | hub threads after finalize (before the instance) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "link_all_ms" in r:
            setup = f"{r['link_all_ms']:.1f} (one link_clusters call for all)"
        else:
            ms = sorted(r["link_samples_ms"])
            setup = f"{statistics.median(ms):.1f} p50, {ms[-1]:.1f} max (one call per decode)"
        a, t = r["per_link_after_link"], r["per_link_after_transfer"]
        agg = r["aggregate_samples_gbps"]
        lines.append(f"| {r['hub']} ({r['phase']}) | {r['links']} | {setup} | "
                     f"{a['rss_kib']:.0f} / {t['rss_kib']:.0f} | "
                     f"{a['threads']:.2f} / {t['threads']:.2f} | {a['fds']:.2f} / {t['fds']:.2f} | "
                     f"{statistics.median(agg):.2f} ({min(agg):.2f}-{max(agg):.2f}) | "
                     f"{r['hub_after_finalize']['threads']} ({r['hub_interpreter']['threads']}) |")
    lines += ["", "- **fan-in**: the hub (a decode) links to every prefill with one `link_clusters` call, then pulls "
                  f"all {meta['per_peer_mib']} MiB of each prefill at once, one thread per link "
                  "(scattered 256 KiB blocks, one `pull_blocks` call each, verified)",
              "- **fan-out**: every decode links to the hub (a prefill) in turn, then all decodes pull the hub's "
              f"{meta['per_peer_mib']} MiB at the same time (verified); the set-up time is each decode's call",
              "- **per link**: the hub's growth from ready-but-unlinked to linked (and after the first transfers, "
              "which open the data connections), divided by the number of links; RSS includes the "
              "allocator's slack; threads are the process's (`/proc/self/status`)",
              "- **aggregate**: all bytes of one round of concurrent pulls over the time from the first start to "
              "the last end (`CLOCK_MONOTONIC`, shared by the hosts); one host per peer, a bridge between them, "
              "all on this machine's cores"]
    return "\n".join(lines)


def run_scale(args: argparse.Namespace) -> int:
    """Both phases with ``args.scale`` peers; writes scale.md and scale.jsonl to ``args.out``."""
    from llm_datadist_bench.run_meta import run_meta
    from llm_datadist_bench.report import write_jsonl
    from llm_datadist.cli.netns import SimulatedHosts

    n = int(args.scale)
    if not 1 <= n <= 64:
        print(f"{PROG}: --scale takes 1..64 peers, not {n}", file=sys.stderr)
        return 2
    per_peer = min(args.total_mib or PER_PEER_MIB, PER_PEER_MIB) * MIB
    blocks = per_peer // BLOCK_BYTES
    args.warmup = 1 if args.warmup is None else args.warmup
    start = time.monotonic()
    out: List[Dict[str, Any]] = []
    with SimulatedHosts(n + 1, mtu=args.mtu) as hosts:
        for phase in (_fan_in, _fan_out):
            print(f"{PROG}: {phase.__name__[1:]} with {n} peers", file=sys.stderr)
            try:
                out.append(phase(hosts, n, blocks, args))
            except (RuntimeError, OSError, EOFError) as exc:
                out.append({"phase": phase.__name__[1:], "error": str(exc)})
    meta = dict(run_meta(args, {"sizes": [BLOCK_BYTES], "total": per_peer, "passes": PASSES, "warmup": args.warmup,
                                  "directions": ["pull"], "transports": ["auto"]}),
                links=n, per_peer_mib=per_peer // MIB, block="256K", passes=PASSES, mtu=args.mtu or 1500,
                wall_s=round(time.monotonic() - start, 1))
    good = [r for r in out if "error" not in r]
    text = _markdown(good, meta) + "".join(f"\n- **{r['phase']} failed**: {r['error']}" for r in out if "error" in r)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "scale.md"), "w") as f:
        f.write(text + "\n")
    write_jsonl(os.path.join(args.out, "scale.jsonl"), [record("meta", "scale", **meta)] +
                [record("scale", r["phase"], **{k: v for k, v in r.items() if k != "phase"}) for r in out])
    print(text)
    return 0 if len(good) == len(out) else 1
