"""``llm-datadist chaos``: a bounded chaos soak of prefill and decode processes moving verified blocks.

Several prefills and decodes run in processes of their own (``chaos_worker``); where network namespaces can be
made, one prefill and one decode run on two simulated hosts (``netns``), so tcp carries their traffic between
"hosts"; one same-host prefill forces the tcp backend too, another allocates its cache from a pool (shm). Every
decode pulls blocks from the prefills it reaches and checks every byte against content it computes itself;
every prefill pushes blocks into the decodes' push inboxes and the decode checks those. Meanwhile two seeded
chaos lanes act: one SIGKILLs and restarts prefills and SIGSTOPs / SIGCONTs decodes, the other re-registers
prefill caches with a new content generation, unlinks decodes from prefills (the next pull links again) and
takes a simulated host's network interface down and up.

What must stay 0: successes with wrong bytes (wrong content, a generation that was not registered while the
call ran, a destination block outside the request written) and hangs (a call that took longer than its own
bound, ``sync_kv_timeout`` for transfers, plus a margin, not counting time its own process spent stopped).
The file descriptors, threads and RSS of a decode that is never killed and of the driver are measured after a
warm-up and at the end, both times with every link of that decode unlinked (the same state), and reported.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ChaosConfig", "add_arguments", "format_report", "run", "run_soak", "schedule"]

PROMPT, DECODER = 1, 2  # LLMRole values, as chaos_worker takes them
STOP_MAX_S = 2.5  # a decode stays stopped up to this long (beyond sync_kv_timeout: pushes into it time out)
KILL_DOWN_MAX_S = 2.0  # a killed prefill is restarted after up to this long
NET_DOWN_MAX_S = 2.0
CONT_LAG_S = 0.05  # after SIGCONT a process may take this long to run again (on a loaded host)
REPLY_SLACK_S = 30.0  # a worker that does not answer a command within its bounds + this is hung
NETNS_PORT = 26000
POOL_THREADS_PER_INSTANCE = 12  # the engine's handler and task pools start at most this many, on demand


@dataclasses.dataclass
class ChaosConfig:
    """What one soak runs; see ``llm-datadist chaos --help``."""

    duration_s: float = 60.0
    seed: Optional[int] = None
    timeout_ms: int = 1000
    margin_s: float = 2.0
    prefills: int = 2
    decodes: int = 2
    netns: str = "auto"  # auto: use simulated hosts where they can be made; off; require
    warmup_s: Optional[float] = None
    chaos_gap_s: float = 1.0
    pace_ms: float = 10.0
    num_tensors: int = 4
    num_blocks: int = 32
    block_bytes: int = 16 << 10
    max_blocks: int = 8
    region_blocks: int = 8
    log_dir: Optional[str] = None
    quiet: bool = False

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(60.0, max(5.0, self.duration_s * 0.2))


class WorkerGone(Exception):
    """The worker process exited (killed) before it answered."""


class WorkerSilent(Exception):
    """The worker did not answer within the bound."""


class Channel:
    """JSON-line requests to one worker process; replies are matched by id (several threads may ask)."""

    def __init__(self, proc: subprocess.Popen, log) -> None:
        self.proc = proc
        self.log = log
        self._lock = threading.Lock()
        self._pending: Dict[int, queue.Queue[Optional[dict]]] = {}
        self._next = 0
        self._gone = False
        self._reader = threading.Thread(target=self._read, name=f"chaos-reader-{proc.pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                box = self._pending.pop(reply.get("id", -1), None)
            if box is not None:
                box.put(reply)
        with self._lock:
            self._gone = True
            boxes, self._pending = list(self._pending.values()), {}
        for box in boxes:
            box.put(None)

    def request(self, op: str, timeout: float, **args: Any) -> dict:
        box: queue.Queue[Optional[dict]] = queue.Queue()
        with self._lock:
            if self._gone:
                raise WorkerGone(op)
            self._next += 1
            request_id = self._next
            self._pending[request_id] = box
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": op, "id": request_id, **args}) + "\n")
                self.proc.stdin.flush()
            except (OSError, ValueError):
                self._pending.pop(request_id, None)
                raise WorkerGone(op) from None
        try:
            reply = box.get(timeout=timeout)
        except queue.Empty:
            with self._lock:
                self._pending.pop(request_id, None)
            raise WorkerSilent(f"{op}: no reply within {timeout:.0f} s") from None
        if reply is None:
            raise WorkerGone(op)
        return reply

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._reader.join(5)
        self.log.close()


@dataclasses.dataclass
class Member:
    """One prefill or decode: where it runs and its current process."""

    name: str
    role: int
    cluster_id: int
    index: int  # among the members of its role (prefills: the push inbox region)
    host: Any = None  # a netns Host, or None for this machine's 127.0.0.1
    transport: Optional[str] = None  # forced backend, or None for the default choice
    pool: bool = False
    port: int = 0
    chan: Optional[Channel] = None
    ready: bool = False
    pid: int = 0  # the worker's pid in this machine's pid namespace
    stops: List[Tuple[float, float]] = dataclasses.field(default_factory=list)
    gen: int = 0

    @property
    def ip(self) -> str:
        return self.host.ip if self.host is not None else "127.0.0.1"

    @property
    def where(self) -> str:
        return "simulated host " + self.host.hostname.split("-")[0] if self.host is not None else "127.0.0.1"

    def describe(self) -> str:
        how = [self.where, "tcp forced" if self.transport else "default transports"]
        if self.pool:
            how.append("pool cache")
        return f"{self.name} ({', '.join(how)})"


# -----------------------------------------------------------------------------------------------------------
# The schedule
# -----------------------------------------------------------------------------------------------------------
SIGNAL_ACTIONS = (("kill", 1.0), ("stop", 1.2))
API_ACTIONS = (("renew", 1.0), ("relink", 1.0), ("net_down", 0.4))


def schedule(seed: int, duration_s: float, gap_s: float, prefills: int, decodes: int,
             netns: bool) -> Dict[str, List[Dict[str, Any]]]:
    """The two lanes of chaos actions, from the seed alone: ``{lane: [{"at", "action", "target", "hold"}]}``."""
    lanes: Dict[str, List[Dict[str, Any]]] = {}
    for lane, actions in (("signals", SIGNAL_ACTIONS), ("api", API_ACTIONS)):
        rng = random.Random(f"{seed}-{lane}")
        chosen = [(a, w) for a, w in actions if a != "net_down" or netns]
        names, weights = [a for a, _ in chosen], [w for _, w in chosen]
        at, events = gap_s * rng.uniform(0.5, 1.5), []
        while at < duration_s:
            action = rng.choices(names, weights)[0]
            count = decodes if action == "stop" else 2 if action == "net_down" else prefills
            target = rng.randrange(count)
            other = rng.randrange(prefills)  # relink: which of the decode's prefills
            limit = {"kill": KILL_DOWN_MAX_S, "stop": STOP_MAX_S, "net_down": NET_DOWN_MAX_S}.get(action, 0.0)
            hold = round(rng.uniform(0.1, limit), 3) if limit else 0.0
            events.append({"at": round(at, 3), "action": action, "target": target, "other": other, "hold": hold})
            at += hold + gap_s * rng.uniform(0.5, 1.5)
        lanes[lane] = events
    return lanes


# -----------------------------------------------------------------------------------------------------------
# The soak
# -----------------------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.seed = cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.lock = threading.Lock()
        self.ops: Dict[str, Dict[str, int]] = {}
        self.wrong: List[str] = []
        self.wrong_count = 0
        self.hangs: List[str] = []
        self.hang_count = 0
        self.stalled = 0
        self.slowest: Dict[str, float] = {}
        self.errors: List[str] = []
        self.examples: Dict[str, str] = {}  # "kind status" -> the first error message seen
        self.by_pair: Dict[str, Dict[str, int]] = {}  # "kind caller-peer" -> {status: count}
        self.exceptions = 0  # library calls that raised something other than LLMException
        self.actions: Dict[str, int] = {}
        self.gens: Dict[Tuple[int, int], List[Optional[float]]] = {}  # (prefill id, gen) -> [from, until]
        self.next_gen: Dict[int, int] = {}
        self.routes: Dict[str, str] = {}
        self.pause = threading.Event()
        self.done = threading.Event()
        self.parked: Dict[str, threading.Event] = {}
        self.resume = threading.Event()
        self.resume.set()
        self.hosts: Any = None
        self.netns_note = ""
        self.prefills: List[Member] = []
        self.decodes: List[Member] = []
        self.log_dir = cfg.log_dir or tempfile.mkdtemp(prefix="llm-datadist-chaos-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.usage: Dict[str, Dict[str, Any]] = {}
        self.verified_pushes = 0
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if not self.cfg.quiet:
            print(text, flush=True)

    # -- members ---------------------------------------------------------------------------------------------
    def _topology(self) -> None:
        cfg = self.cfg
        use_netns = False
        if cfg.netns != "off":
            from llm_datadist.cli.netns import SimulatedHosts, sweep_stale, unavailable_reason

            reason = unavailable_reason()
            if reason is None:
                try:
                    sweep_stale()
                    self.hosts = SimulatedHosts(2).start()
                    use_netns = True
                except Exception as exc:  # noqa: BLE001 - degrade, and say so
                    reason = f"{type(exc).__name__}: {exc}"
            if not use_netns:
                if cfg.netns == "require":
                    raise RuntimeError(f"simulated hosts are unavailable: {reason}")
                self.netns_note = f"simulated hosts unavailable ({reason}): tcp only through the forced backend"
        if use_netns:
            self.netns_note = "simulated hosts: one prefill and one decode on two network namespaces (tcp)"
        for i in range(cfg.prefills):
            self.prefills.append(Member(f"prefill-{11 + i}", PROMPT, 11 + i, i, transport="tcp" if i % 2 else None,
                                        pool=(i == 0)))
        for j in range(cfg.decodes):
            self.decodes.append(Member(f"decode-{21 + j}", DECODER, 21 + j, j))
        if use_netns:
            i, j = len(self.prefills), len(self.decodes)
            self.prefills.append(Member(f"prefill-{11 + i}", PROMPT, 11 + i, i, host=self.hosts[0], port=NETNS_PORT))
            self.decodes.append(Member(f"decode-{21 + j}", DECODER, 21 + j, j, host=self.hosts[1]))

    def reach(self, member: Member) -> List[Member]:
        """The members of the other role this one exchanges blocks with (same network)."""
        others = self.prefills if member.role == DECODER else self.decodes
        return [m for m in others if (m.host is None) == (member.host is None)]

    def _env(self, member: Member) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LLM_DATADIST_TRANSPORT"}
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
        if member.transport:
            env["LLM_DATADIST_TRANSPORT"] = member.transport
        return env

    def _geometry(self) -> Dict[str, int]:
        cfg = self.cfg
        return {"nt": cfg.num_tensors, "nb": cfg.num_blocks, "bb": cfg.block_bytes, "dst_nb": cfg.num_blocks,
                "inbox_nb": cfg.region_blocks * len(self.prefills)}

    def _spawn(self, member: Member) -> Channel:
        log = open(os.path.join(self.log_dir, f"{member.name}.log"), "a")
        argv = [sys.executable, "-m", "llm_datadist.cli.chaos_worker"]
        popen_args: Dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                          env=self._env(member))
        if member.host is not None:
            proc = self.hosts.popen(member.host, argv, **popen_args)
        else:
            proc = subprocess.Popen(argv, **popen_args)
        return Channel(proc, log)

    def start_member(self, member: Member, attempts: int = 6) -> bool:
        """Start (or restart) the member's process and instance; prefills register their next generation."""
        for attempt in range(attempts):
            chan = self._spawn(member)
            try:
                if member.role == PROMPT and member.host is None and (attempt or not member.port):
                    member.port = _free_port()  # a restart keeps its port unless it was taken meanwhile
                listen = f"{member.ip}:{member.port}" if member.role == PROMPT else None
                reply = chan.request("init", 60.0, role=member.role, cluster_id=member.cluster_id,
                                     timeout_ms=self.cfg.timeout_ms, geometry=self._geometry(), listen=listen,
                                     pool_bytes=(2 * self.cfg.num_tensors * self.cfg.num_blocks
                                                 * self.cfg.block_bytes + (1 << 20)) if member.pool else 0,
                                     remote_accessible=True)
                if not reply.get("ok"):
                    raise WorkerGone(f"init: {reply.get('status')} {reply.get('error', '')}")
                member.pid = _worker_pid(chan.proc)
                if member.host is not None and member.pid == chan.proc.pid:
                    raise WorkerGone("the worker process on the simulated host was not found (signals would miss it)")
                member.chan = chan
                if member.role == PROMPT:
                    member.gen = 0
                    self.renew(member, first=True)
                member.ready = member.role == DECODER or member.gen > 0
                if member.ready:
                    return True
            except (WorkerGone, WorkerSilent) as exc:
                self._note_error(f"{member.name} start (attempt {attempt + 1}): {exc}", counted=False)
            _terminate(chan)
            member.chan = None
            time.sleep(0.5)
        self._note_error(f"{member.name} could not be started")
        return False

    # -- accounting --------------------------------------------------------------------------------------------
    def _note_error(self, text: str, counted: bool = True) -> None:
        with self.lock:
            if counted:
                self.errors.append(text)
        self.say(f"  ! {text}")

    def account(self, caller: Member, records: Sequence[dict], peer: Optional[Member] = None) -> None:
        margin = self.cfg.margin_s
        with self.lock:
            for rec in records:
                kind, status = rec["kind"], rec["status"]
                row = self.ops.setdefault(kind, {"total": 0})
                row["total"] += 1
                row[status] = row.get(status, 0) + 1
                pair = self.by_pair.setdefault(f"{kind} {caller.name}-{peer.name if peer else '?'}", {})
                pair[status] = pair.get(status, 0) + 1
                if status.startswith("EXCEPTION"):
                    self.exceptions += 1
                if rec.get("error") and f"{kind} {status}" not in self.examples:
                    self.examples[f"{kind} {status}"] = f"{caller.name} -> {peer.name if peer else '?'}: {rec['error']}"
                took = rec["t1"] - rec["t0"]
                # time its own process spent stopped (+ CONT_LAG_S, the wake-up) is not the library's
                stopped = sum(max(0.0, min(rec["t1"], b + CONT_LAG_S) - max(rec["t0"], a)) for a, b in caller.stops)
                if any(rec["t0"] < b and rec["t1"] > a for a, b in caller.stops):
                    self.stalled += 1
                effective = took - stopped
                self.slowest[kind] = max(self.slowest.get(kind, 0.0), effective)
                if effective > rec["bound"] + margin:
                    self.hang_count += 1
                    if len(self.hangs) < 50:
                        self.hangs.append(f"{caller.name} {kind} -> {peer.name if peer else '?'}: {effective:.2f} s "
                                          f"(bound {rec['bound']:.1f} s + {margin:.1f} s), {status}")
                if rec.get("wrong"):
                    self._wrong(f"{caller.name} {kind} from {peer.name if peer else '?'}: {rec['wrong']}")

    def _wrong(self, text: str) -> None:  # with self.lock held
        self.wrong_count += 1
        if len(self.wrong) < 50:
            self.wrong.append(text)
        if not self.cfg.quiet:
            print(f"  !! WRONG BYTES: {text}", flush=True)

    def _action(self, name: str) -> None:
        with self.lock:
            self.actions[name] = self.actions.get(name, 0) + 1

    # -- generations --------------------------------------------------------------------------------------------
    def renew(self, member: Member, first: bool = False) -> None:
        """Register (first) or re-register the prefill's cache with its next content generation."""
        gen = self.next_gen.get(member.cluster_id, 0) + 1
        self.next_gen[member.cluster_id] = gen
        assert member.chan is not None
        began = time.monotonic()
        with self.lock:
            self.gens[(member.cluster_id, gen)] = [began, None]
        reply = member.chan.request("register" if first else "renew", 60.0, gen=gen)
        ended = time.monotonic()
        if not reply.get("ok"):
            raise WorkerGone(f"renew: {reply.get('error')}")
        self.account(member, reply["records"])
        old, now = member.gen, int(reply["gen"])
        with self.lock:
            if old and now != old:  # the old generation was released and garbled before the reply
                self.gens[(member.cluster_id, old)][1] = ended
            if now != gen:
                self.gens[(member.cluster_id, gen)][1] = ended
        member.gen = now

    def _check_generation(self, decode: Member, prefill: Member, gen: int, rec: dict) -> None:
        with self.lock:
            span = self.gens.get((prefill.cluster_id, gen))
            if span is None:
                self._wrong(f"{decode.name} pull from {prefill.name}: generation {gen} was never registered")
            elif rec["t1"] < (span[0] or 0.0) or (span[1] is not None and rec["t0"] > span[1]):
                self._wrong(f"{decode.name} pull from {prefill.name}: generation {gen} was not registered while "
                            f"the pull ran (registered {span}, pull {rec['t0']:.3f}..{rec['t1']:.3f})")

    def _end_generations(self, member: Member, when: float) -> None:
        with self.lock:
            for (cid, _gen), span in self.gens.items():
                if cid == member.cluster_id and span[1] is None:
                    span[1] = when
        member.gen = 0

    # -- the loops ---------------------------------------------------------------------------------------------
    def _park(self, name: str) -> None:
        if self.pause.is_set():
            self.parked[name].set()
            self.resume.wait()
            self.parked[name].clear()

    def pull_loop(self, decode: Member) -> None:
        rng = random.Random(f"{self.seed}-{decode.name}")
        cfg = self.cfg
        peers = self.reach(decode)
        while not self.done.is_set():
            self._park(decode.name)
            if self.done.is_set() or not peers:
                break
            prefill = rng.choice(peers)
            k = rng.randint(1, cfg.max_blocks)
            src, dst = rng.sample(range(cfg.num_blocks), k), rng.sample(range(cfg.num_blocks), k)
            if not prefill.ready or decode.chan is None:
                time.sleep(0.05)
                continue
            try:
                reply = decode.chan.request("pull", self._reply_bound(), cid=prefill.cluster_id, ip=prefill.ip,
                                            port=prefill.port, src=src, dst=dst,
                                            local_ip=decode.host.ip if decode.host is not None else None)
            except (WorkerGone, WorkerSilent) as exc:
                self._lost(decode, "pull", exc)
                continue
            if not reply.get("ok"):
                self._note_error(f"{decode.name} pull: {reply.get('error')}\n{reply.get('tb', '')}")
                continue
            self.account(decode, reply["records"], prefill)
            if "gen" in reply and not reply["records"][-1].get("wrong"):
                self._check_generation(decode, prefill, int(reply["gen"]), reply["records"][-1])
            time.sleep(cfg.pace_ms / 1000.0)

    def push_loop(self, prefill: Member) -> None:
        rng = random.Random(f"{self.seed}-{prefill.name}")
        cfg = self.cfg
        peers = self.reach(prefill)
        base = prefill.index * cfg.region_blocks
        while not self.done.is_set():
            self._park(prefill.name)
            if self.done.is_set() or not peers:
                break
            decode = rng.choice(peers)
            k = rng.randint(1, min(cfg.max_blocks, cfg.region_blocks))
            src = rng.sample(range(cfg.num_blocks), k)
            dst = [base + b for b in rng.sample(range(cfg.region_blocks), k)]
            chan = prefill.chan
            if not prefill.ready or chan is None or decode.chan is None:
                time.sleep(0.05)
                continue
            try:
                reply = chan.request("push", self._reply_bound(), decode_id=decode.cluster_id, src=src, dst=dst)
            except (WorkerGone, WorkerSilent) as exc:
                if isinstance(exc, WorkerSilent):
                    self._lost(prefill, "push", exc)
                continue  # killed by the chaos lane: it restarts the prefill
            if not reply.get("ok"):
                self._note_error(f"{prefill.name} push: {reply.get('error')}\n{reply.get('tb', '')}")
                continue
            self.account(prefill, reply["records"], decode)
            if reply["records"] and reply["records"][-1]["status"] == "LLM_SUCCESS":
                try:  # the decode checks its inbox (it may be stopped: wait for it)
                    check = decode.chan.request("verify_inbox", self._reply_bound() + STOP_MAX_S,
                                                owner=prefill.cluster_id, gen=int(reply["gen"]), src=src, dst=dst)
                except (WorkerGone, WorkerSilent) as exc:
                    self._lost(decode, "verify_inbox", exc)
                    continue
                with self.lock:
                    self.verified_pushes += 1
                    if check.get("wrong"):
                        self._wrong(f"{prefill.name} push into {decode.name}: {check['wrong']}")
            time.sleep(cfg.pace_ms / 1000.0)

    def _reply_bound(self) -> float:
        return REPLY_SLACK_S + 3 * (self.cfg.timeout_ms / 1000.0 + 2.0)

    def _lost(self, member: Member, op: str, exc: Exception) -> None:
        if isinstance(exc, WorkerSilent):
            with self.lock:
                self.hang_count += 1
                self.hangs.append(f"{member.name} did not answer {op}: {exc}")
        elif member.role == DECODER and not self.done.is_set():
            self._note_error(f"{member.name} exited during {op} (decodes are never killed)")
            time.sleep(0.5)

    # -- chaos ------------------------------------------------------------------------------------------------
    def chaos_lane(self, lane: str, events: List[Dict[str, Any]], start: float) -> None:
        for event in events:
            while not self.done.is_set():
                self._park(f"chaos-{lane}")
                wait = start + event["at"] + self.paused_s - time.monotonic()
                if wait <= 0:
                    break
                self.done.wait(min(wait, 0.2))
            if self.done.is_set():
                break
            try:
                self._act(event)
            except (WorkerGone, WorkerSilent) as exc:
                self._note_error(f"chaos {event['action']}: {exc}", counted=isinstance(exc, WorkerSilent))
        self.parked[f"chaos-{lane}"].set()

    paused_s = 0.0  # time spent measuring, added to the schedule

    def _act(self, event: Dict[str, Any]) -> None:
        action, hold = event["action"], event["hold"]
        if action == "kill":
            prefill = self.prefills[event["target"] % len(self.prefills)]
            if not prefill.ready or prefill.chan is None:
                self._action("skipped")
                return
            prefill.ready = False
            chan = prefill.chan
            chan.proc.send_signal(signal.SIGKILL)
            chan.proc.wait(10)
            _wait_gone(prefill.pid)
            self._end_generations(prefill, time.monotonic())
            self._action("kill")
            prefill.chan = None
            _terminate(chan)
            time.sleep(hold)
            if self.start_member(prefill):
                self._action("restart")
        elif action == "stop":
            decode = self.decodes[event["target"] % len(self.decodes)]
            began = time.monotonic()
            decode.stops.append((began, float("inf")))
            os.kill(decode.pid, signal.SIGSTOP)
            self._action("stop")
            time.sleep(hold)
            os.kill(decode.pid, signal.SIGCONT)
            decode.stops[-1] = (began, time.monotonic())
            del decode.stops[:-64]  # older stops end long before any call still being accounted
        elif action == "renew":
            prefill = self.prefills[event["target"] % len(self.prefills)]
            if not prefill.ready or prefill.chan is None:
                self._action("skipped")
                return
            self.renew(prefill)
            self._action("renew")
        elif action == "relink":
            prefill = self.prefills[event["other"] % len(self.prefills)]
            decodes = self.reach(prefill)
            decode = decodes[event["target"] % len(decodes)] if decodes else None
            if decode is None or decode.chan is None:
                self._action("skipped")
                return
            reply = decode.chan.request("unlink", self._reply_bound() + STOP_MAX_S, cid=prefill.cluster_id)
            self.account(decode, reply.get("records", []), prefill)
            self._action("relink" if reply.get("records") else "skipped")
        elif action == "net_down":
            host = self.hosts[event["target"] % 2]
            self.hosts.link_down(host)
            self._action("net_down")
            try:
                time.sleep(hold)
            finally:
                self.hosts.link_up(host)

    # -- measuring ----------------------------------------------------------------------------------------------
    def quiesce_and_measure(self, label: str, baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Park every loop and lane, unlink every decode, let the long-lived decode settle, measure it and us."""
        began = time.monotonic()
        self.pause.set()
        self.resume.clear()
        names = list(self.parked)
        for name in names:
            if not self.parked[name].wait(120):
                self._note_error(f"{name} did not park within 120 s")
        for decode in self.decodes:
            if decode.chan is not None:
                try:
                    routes = decode.chan.request("routes", 30.0)["routes"]
                    for cid, route in routes.items():
                        if route:
                            self.routes[f"{decode.name} -> prefill-{cid}"] = route
                    reply = decode.chan.request("unlink_all", 60.0)
                    self.account(decode, reply.get("records", []))
                except (WorkerGone, WorkerSilent) as exc:
                    self._note_error(f"{decode.name} quiesce: {exc}")
        for prefill in self.prefills:
            if prefill.chan is not None:
                try:
                    for cid, route in prefill.chan.request("routes", 30.0)["routes"].items():
                        if route:
                            self.routes[f"{prefill.name} -> decode-{cid} (push)"] = route
                except (WorkerGone, WorkerSilent):
                    pass
        long_lived = self.decodes[0]
        measured: Dict[str, Any] = {"decode": self._settled(long_lived, baseline["decode"] if baseline else None),
                    "driver": self._settled(None, baseline["driver"] if baseline else None)}
        measured["at_s"] = round(time.monotonic() - self.started, 1)
        self.paused_s += time.monotonic() - began
        self.say(f"  [{label}] {long_lived.name}: {_usage_text(measured['decode'])}; driver: "
                 f"{_usage_text(measured['driver'])}")
        return measured

    def _settled(self, member: Optional[Member], baseline: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """Usage once two readings 0.5 s apart agree (at most 15 s), or once it is back at the baseline."""
        def read() -> Dict[str, Any]:
            if member is None:
                from llm_datadist.cli.chaos_worker import own_usage  # the worker's probe (imports numpy)

                return own_usage()
            assert member.chan is not None
            return member.chan.request("usage", 30.0)

        last = read()
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = read()
            keys = ("fds", "os_threads", "pool_threads")
            if baseline is not None and all(now[k] <= baseline[k] for k in keys[:1]) and \
                    now["os_threads"] - now["pool_threads"] <= baseline["os_threads"] - baseline["pool_threads"]:
                return _clean(now)
            if baseline is None and all(now[k] == last[k] for k in keys):
                return _clean(now)
            last = now
        return _clean(last)

    # -- the run -----------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.started = time.monotonic()
        try:
            self._topology()
            self.say(f"chaos soak: {cfg.duration_s:.0f} s, seed {self.seed}, sync_kv_timeout {cfg.timeout_ms} ms, "
                     f"hang bound: each call's own bound + {cfg.margin_s:.1f} s")
            self.say(f"  {self.netns_note}")
            for member in self.prefills + self.decodes:
                if not self.start_member(member):
                    raise RuntimeError(f"{member.name} could not be started (logs in {self.log_dir})")
                self.say(f"  started {member.describe()}")
            lanes = schedule(self.seed, cfg.duration_s, cfg.chaos_gap_s, len(self.prefills), len(self.decodes),
                             self.hosts is not None)
            self.say("  schedule: " + ", ".join(f"{lane} {len(ev)} actions" for lane, ev in lanes.items()) +
                     "; first: " + "; ".join(f"{e['at']:.1f} s {e['action']} #{e['target']}"
                                             for e in lanes["signals"][:2] + lanes["api"][:2]))
            threads = []
            for member in self.decodes:
                threads.append(threading.Thread(target=self.pull_loop, args=(member,), name=f"pulls-{member.name}"))
            for member in self.prefills:
                threads.append(threading.Thread(target=self.push_loop, args=(member,), name=f"pushes-{member.name}"))
            begin = time.monotonic()
            for lane, events in lanes.items():
                threads.append(threading.Thread(target=self.chaos_lane, args=(lane, events, begin),
                                                name=f"chaos-{lane}"))
            for t in threads:
                self.parked[t.name.replace("pulls-", "").replace("pushes-", "")] = threading.Event()
                t.daemon = True
                t.start()
            self.done.wait(cfg.warmup)
            warm = self.quiesce_and_measure("after warm-up")
            self.pause.clear()
            self.resume.set()
            end = begin + cfg.duration_s + self.paused_s
            while time.monotonic() < end and not self.done.is_set():
                time.sleep(min(1.0, end - time.monotonic()) if end > time.monotonic() else 0)
                end = begin + cfg.duration_s + self.paused_s
            final = self.quiesce_and_measure("end", warm)
            self.done.set()
            self.resume.set()
            for t in threads:
                t.join(self._reply_bound())
            self.usage = {"warm": warm, "end": final}
        finally:
            self.done.set()
            self.resume.set()
            self._shutdown()
        return self.report()

    def _shutdown(self) -> None:
        for member in self.prefills + self.decodes:
            chan, member.chan = member.chan, None
            if chan is None:
                continue
            try:
                os.kill(member.pid, signal.SIGCONT)
            except OSError:
                pass
            try:
                chan.request("exit", 15.0)
            except (WorkerGone, WorkerSilent):
                pass
            _terminate(chan)
        if self.hosts is not None:
            self.hosts.close()

    def report(self) -> Dict[str, Any]:
        cfg = self.cfg
        growth = {}
        if self.usage:
            for who in ("decode", "driver"):
                warm, end = self.usage["warm"][who], self.usage["end"][who]
                growth[who] = {k: end[k] - warm[k] for k in warm}
        return {
            "seed": self.seed, "duration_s": cfg.duration_s, "warmup_s": cfg.warmup, "timeout_ms": cfg.timeout_ms,
            "margin_s": cfg.margin_s, "netns": self.netns_note,
            "members": [m.describe() for m in self.prefills + self.decodes],
            "long_lived": self.decodes[0].name if self.decodes else None,
            "operations": self.ops, "operations_total": sum(r["total"] for r in self.ops.values()),
            "verified_pushes": self.verified_pushes, "actions": self.actions,
            "wrong_byte_successes": self.wrong_count, "wrong": self.wrong,
            "hangs": self.hang_count, "hang_details": self.hangs, "stalled_by_own_stop": self.stalled,
            "slowest_s": {k: round(v, 3) for k, v in self.slowest.items()},
            "errors": self.errors, "failure_examples": self.examples, "routes": self.routes, "usage": self.usage,
            "growth_after_warmup": growth, "unexpected_exceptions": self.exceptions, "by_pair": self.by_pair,
            "log_dir": self.log_dir,
        }


# -----------------------------------------------------------------------------------------------------------
# Helpers
# -----------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_pid(proc: subprocess.Popen) -> int:
    """The pid (here) of the python worker: the process itself, or in a simulated host the descendant of
    ``ip netns exec`` / ``unshare`` that runs ``chaos_worker``."""
    todo, seen = [proc.pid], 0
    while todo and seen < 50:
        pid = todo.pop(0)
        seen += 1
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[1:3] == [b"-m", b"llm_datadist.cli.chaos_worker"]:
                    return pid  # python -m ... itself (unshare's command line names the module too)
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return proc.pid


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return
        except OSError:
            return
        time.sleep(0.01)


def _terminate(chan: Channel) -> None:
    if chan.proc.poll() is None:
        chan.proc.kill()
        try:
            chan.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
    chan.close()


def _clean(usage: Dict[str, Any]) -> Dict[str, Any]:
    return {k: usage[k] for k in ("fds", "os_threads", "pool_threads", "rss_kib")}


def _usage_text(u: Dict[str, Any]) -> str:
    return f"{u['fds']} fds, {u['os_threads']} threads ({u['pool_threads']} pool), {u['rss_kib'] / 1024:.1f} MiB RSS"


def format_report(rep: Dict[str, Any]) -> str:
    """The printed table."""
    lines = [f"chaos soak: {rep['duration_s']:.0f} s (warm-up {rep['warmup_s']:.0f} s), seed {rep['seed']}, "
             f"sync_kv_timeout {rep['timeout_ms']} ms, hang margin {rep['margin_s']:.1f} s",
             f"  {rep['netns']}", "  members: " + "; ".join(rep["members"]), ""]
    statuses = sorted({s for row in rep["operations"].values() for s in row if s not in ("total", "LLM_SUCCESS")})
    head = f"  {'operation':<11}{'total':>8}{'success':>9}  failures by status"
    lines += [head, "  " + "-" * (len(head) + 20)]
    for kind in ("pull", "push", "link", "unlink", "register", "unregister"):
        row = rep["operations"].get(kind, {"total": 0})
        fails = ", ".join(f"{s} {row[s]}" for s in statuses if row.get(s))
        lines.append(f"  {kind:<11}{row['total']:>8}{row.get('LLM_SUCCESS', 0):>9}  {fails or '-'}")
    lines.append(f"  {'all':<11}{rep['operations_total']:>8}")
    lines.append("")
    lines.append("  chaos actions: " + ", ".join(f"{k} {v}" for k, v in sorted(rep["actions"].items())))
    lines.append(f"  verified pushes (checked by the decode): {rep['verified_pushes']}")
    lines.append("  routes: " + ("; ".join(f"{k}: {v}" for k, v in sorted(rep["routes"].items())) or "-"))
    lines.append("  slowest call (s, own stops excluded): " +
                 ", ".join(f"{k} {v:.2f}" for k, v in sorted(rep["slowest_s"].items())))
    lines.append(f"  calls that overlapped their own process's SIGSTOP: {rep['stalled_by_own_stop']}")
    lines.append("")
    lines.append(f"  SUCCESSES WITH WRONG BYTES: {rep['wrong_byte_successes']}")
    for text in rep["wrong"][:10]:
        lines.append(f"    {text}")
    lines.append(f"  HANGS (beyond bound + margin): {rep['hangs']}")
    for text in rep["hang_details"][:10]:
        lines.append(f"    {text}")
    lines.append(f"  library calls that raised something other than LLMException: {rep['unexpected_exceptions']}")
    lines.append(f"  errors (worker failures, processes that did not start): {len(rep['errors'])}")
    for text in rep["errors"][:10]:
        lines.append(f"    {text.splitlines()[0] if text else text}")
    if rep["usage"]:
        lines.append("")
        for who, label in (("decode", f"long-lived decode {rep['long_lived']}"), ("driver", "driver")):
            warm, end, grow = rep["usage"]["warm"][who], rep["usage"]["end"][who], rep["growth_after_warmup"][who]
            lines.append(f"  {label}: after warm-up {_usage_text(warm)}; end {_usage_text(end)}; growth "
                         f"{grow['fds']:+d} fds, {grow['os_threads']:+d} threads ({grow['pool_threads']:+d} pool), "
                         f"{grow['rss_kib'] / 1024:+.1f} MiB RSS")
    return "\n".join(lines)


def verdict(rep: Dict[str, Any]) -> List[str]:
    """What failed (empty when the soak passed): the figures that must be 0, and growth after warm-up."""
    bad = []
    if rep["wrong_byte_successes"]:
        bad.append(f"{rep['wrong_byte_successes']} successes with wrong bytes")
    if rep["hangs"]:
        bad.append(f"{rep['hangs']} hangs")
    if rep["errors"]:
        bad.append(f"{len(rep['errors'])} errors")
    if rep["unexpected_exceptions"]:
        bad.append(f"{rep['unexpected_exceptions']} library calls raised something other than LLMException")
    for who, grow in rep.get("growth_after_warmup", {}).items():
        if grow["fds"] > 0 or grow["os_threads"] - grow["pool_threads"] > 0:
            bad.append(f"{who}: {grow['fds']:+d} fds, {grow['os_threads'] - grow['pool_threads']:+d} threads "
                       f"(not counting pool workers) after warm-up")
    return bad


def run_soak(cfg: ChaosConfig) -> Dict[str, Any]:
    """Run one soak; returns the report (a JSON-able dict)."""
    return Soak(cfg).run()


# -----------------------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of chaos (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the schedule and the loops (default: random)")
    parser.add_argument("--timeout-ms", type=int, default=1000, help="sync_kv_timeout of every instance")
    parser.add_argument("--margin", type=float, default=2.0,
                        help="seconds a call may exceed its own bound before it counts as a hang (default 2)")
    parser.add_argument("--prefills", type=int, default=2, help="prefills on 127.0.0.1 (every second forces tcp)")
    parser.add_argument("--decodes", type=int, default=2, help="decodes on 127.0.0.1 (the first is never killed)")
    parser.add_argument("--netns", choices=("auto", "off", "require"), default="auto",
                        help="one more prefill and decode on two simulated hosts (needs root)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before the baseline is measured")
    parser.add_argument("--gap", type=float, default=1.0, help="mean seconds between chaos actions of a lane")
    parser.add_argument("--json", default=None, help="write the report as JSON to this path")
    parser.add_argument("--log-dir", default=None, help="the workers' logs (default: a new temporary directory)")


def run(args: argparse.Namespace) -> int:
    cfg = ChaosConfig(duration_s=args.duration, seed=args.seed, timeout_ms=args.timeout_ms, margin_s=args.margin,
                      prefills=max(1, args.prefills), decodes=max(1, args.decodes), netns=args.netns,
                      warmup_s=args.warmup, chaos_gap_s=args.gap, log_dir=args.log_dir)
    rep = run_soak(cfg)
    rep["machine"] = (f"{platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs, "
                      f"Python {platform.python_version()}")
    print()
    print(format_report(rep))
    bad = verdict(rep)
    print(f"\n  verdict: {'PASS' if not bad else 'FAIL: ' + '; '.join(bad)}  (worker logs: {rep['log_dir']})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1, sort_keys=True)
    return 0 if not bad else 1
