"""The ``demo`` command: a prefill and a decode process stream model-shaped paged KV caches and verify every byte."""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Dict, Tuple

import numpy as np

from llm_datadist.cli.demo_worker import CacheShape, DemoConfig, DemoError, child_main
from llm_datadist.cli.instance import LOCALHOST
from llm_datadist.cli.ipc import child_messages
from llm_datadist.cli.progress import Progress, format_duration

__all__ = ["PRESETS", "Preset", "add_arguments", "build_config", "run", "summary"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model deployment as real serving engines size it (per TP rank)."""

    title: str
    layers: int
    caches: Tuple[CacheShape, ...]


PRESETS: Dict[str, Preset] = {
    "qwen2.5-1.5b": Preset("DeepSeek-R1-Distill-Qwen-1.5B (Qwen2.5-1.5B), TP1", 28,
                           (CacheShape("kv", 56, 2, 128, "fp16"),)),
    "qwen2.5-vl-7b": Preset("Qwen2.5-VL-7B, TP1", 28, (CacheShape("kv", 56, 4, 128, "bf16"),)),
    "qwen3-30b-a3b": Preset("Qwen3-30B-A3B, TP2", 48, (CacheShape("kv", 96, 2, 128, "bf16"),)),
    "qwen3-235b-a22b": Preset("Qwen3-235B-A22B, DP2xTP16", 94, (CacheShape("kv", 188, 1, 128, "bf16"),)),
    "deepseek-r1": Preset("DeepSeek-R1 (MLA), per rank", 61,
                          (CacheShape("k_normed", 61, 1, 512, "bf16"), CacheShape("k_pe", 61, 1, 64, "bf16"))),
    "deepseek-v3.2": Preset("DeepSeek-V3.2 (MLA + sparse index), per rank", 61,
                            (CacheShape("k_normed", 61, 1, 512, "bf16"), CacheShape("k_pe", 61, 1, 64, "bf16"),
                             CacheShape("k_idx", 61, 1, 128, "bf16"))),
}
ALIASES = {"deepseek-r1-distill-qwen-1.5b": "qwen2.5-1.5b", "qwen2.5-7b-vl": "qwen2.5-vl-7b",
           "qwen3-235b": "qwen3-235b-a22b", "qwen3-30b": "qwen3-30b-a3b"}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    names = ", ".join(sorted(PRESETS))
    parser.add_argument("--model", default="qwen2.5-1.5b", help=f"model preset: {names} (default %(default)s)")
    parser.add_argument("--list-models", action="store_true", help="print the model presets and exit")
    parser.add_argument("--requests", type=int, default=50, help="requests to stream (default %(default)s)")
    parser.add_argument("--tokens-per-request", type=int, default=4096, help="prompt tokens (default %(default)s)")
    parser.add_argument("--block-size", type=int, default=128, help="tokens per block (default %(default)s)")
    parser.add_argument("--num-blocks", type=int, default=0,
                        help="blocks per cache on each side (default: 2.5x a request on prefill, 1.5x on decode)")
    parser.add_argument("--link-style", choices=("clusters", "ranktable"), default="clusters",
                        help="link_clusters to a listening prefill, or rank-table link() on both sides")
    parser.add_argument("--transport", default=None,
                        help="force a data plane (LLMConfig.transfer_backend), e.g. process_vm, shm, tcp; "
                             "env LLM_DATADIST_TRANSPORT also works")
    parser.add_argument("--placement", choices=("device", "host"), default="device",
                        help="Placement of the registered caches (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="a short run: 5 requests of 1024 tokens")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of block choice and data pattern")
    parser.add_argument("--inject-corruption", action="store_true",
                        help="flip one byte on the prefill side after writing (the demo must fail)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", "-v", action="store_true", help="library INFO logs (routes, links)")


def _resolve_model(name: str) -> str:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise DemoError(f"unknown model {name!r}; choose one of: {', '.join(sorted(PRESETS))}")
    return key


def _rank_table() -> str:
    devices = [{"device_id": str(r), "device_ip": LOCALHOST, "rank_id": str(r)} for r in (0, 1)]
    table = {"version": "1.0", "server_count": "1", "status": "completed",
             "server_list": [{"server_id": LOCALHOST, "device": devices}]}
    return json.dumps(table)


def build_config(args: argparse.Namespace) -> DemoConfig:
    """Validate the options into a DemoConfig (raises DemoError)."""
    model = _resolve_model(args.model)
    requests, tokens = (5, 1024) if args.quick else (args.requests, args.tokens_per_request)
    if requests <= 0 or tokens <= 0 or args.block_size <= 0 or args.timeout <= 0:
        raise DemoError("--requests, --tokens-per-request, --block-size and --timeout must be > 0")
    if args.block_size % 4:
        raise DemoError("--block-size must be a multiple of 4 (blocks are verified as 8-byte words)")
    per_request = -(-tokens // args.block_size)
    if args.num_blocks and args.num_blocks < per_request:
        raise DemoError(f"--num-blocks {args.num_blocks} is smaller than one request ({per_request} blocks)")
    p_blocks = args.num_blocks or per_request * 5 // 2
    d_blocks = args.num_blocks or per_request * 3 // 2
    base = 1000 + (os.getpid() % 100000) * 2
    transport = args.transport or None
    return DemoConfig(
        model=model, caches=PRESETS[model].caches, block_size=args.block_size, blocks_per_request=per_request,
        requests=requests, prefill_blocks=p_blocks, decode_blocks=d_blocks, link_style=args.link_style,
        transport=transport, prefill_id=base, decode_id=base + 1, comm_name=f"demo_pd_comm_{base}_{base + 1}",
        rank_table=_rank_table(), timeout_s=float(args.timeout), sync_timeout_ms=30000,
        corrupt_request=requests // 2 if args.inject_corruption else -1, seed=args.seed,
        host_placement=args.placement == "host", verbose=bool(args.verbose))


def _list_models() -> None:
    print(f"{'preset':18} {'layers':>6} {'caches x tensors':>18} {'KiB/block/tensor':>17}  deployment")
    for name, preset in PRESETS.items():
        shapes = " + ".join(str(c.num_tensors) for c in preset.caches)
        kib = " + ".join(str(c.block_bytes(128) // 1024) for c in preset.caches)
        print(f"{name:18} {preset.layers:>6} {len(preset.caches):>3} x {shapes:>12} {kib:>17}  {preset.title}")


# ---------------------------------------------------------------------------------------------------------------
# The parent: start both, follow progress, stop everything on any failure, print the summary
# ---------------------------------------------------------------------------------------------------------------
def _start(cfg: DemoConfig):
    ctx = multiprocessing.get_context("spawn")
    p_peer, d_peer = ctx.Pipe()
    p_parent, p_child = ctx.Pipe(duplex=False)
    d_parent, d_child = ctx.Pipe(duplex=False)
    procs = {role: ctx.Process(target=child_main, args=(role, cfg, peer, child), name=f"demo-{role}")
             for role, peer, child in (("prefill", p_peer, p_child), ("decode", d_peer, d_child))}
    try:
        for proc in procs.values():
            proc.daemon = True  # never outlives the parent
            proc.start()
    except BaseException:
        _stop({role: proc for role, proc in procs.items() if proc.pid is not None}, grace=0.0)
        raise
    for conn in (p_peer, d_peer, p_child, d_child):
        conn.close()  # only the children hold these ends now: a dead child gives EOF
    return procs, {"prefill": p_parent, "decode": d_parent}


def _stop(procs: Dict[str, Any], grace: float) -> None:
    end = time.monotonic() + grace
    for proc in procs.values():
        proc.join(max(0.0, end - time.monotonic()))
    for proc in procs.values():
        if proc.is_alive():
            proc.terminate()
            proc.join(2.0)
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)


def _supervise(cfg: DemoConfig, procs, conns, progress: Progress) -> Dict[str, Any]:
    """Collect both processes' reports; raises DemoError on an error, an early exit or the timeout."""
    results: Dict[str, Any] = {}
    done: set = set()
    moved, pull_s = 0, 0.0
    timeout_text = lambda: f"timed out after {cfg.timeout_s:.0f} s ({progress.count}/{cfg.requests} requests)"  # noqa: E731
    for role, msg in child_messages(conns, procs, time.monotonic() + cfg.timeout_s + 10.0, done, DemoError,
                                    timeout_text):
        if msg[0] == "error":
            raise DemoError(_first_cause(conns, role, f"{msg[1]} process: {msg[2]}"))
        if msg[0] == "progress":
            moved, pull_s = moved + cfg.request_bytes, pull_s + msg[1]
            progress.update(1, note=f"{_gbps(moved, pull_s):.2f} GB/s")
        else:
            results[role] = msg[1]
            done.add(role)
    return results


def _first_cause(conns, role: str, message: str) -> str:
    """When one process only reports that the other one failed, that other one's own error is the news."""
    if "process failed" not in message and "went away" not in message:
        return message
    for other, conn in conns.items():
        if other == role:
            continue
        try:
            while conn.poll(2.0):
                msg = conn.recv()
                if msg[0] == "error":
                    return f"{msg[1]} process: {msg[2]}"
        except (EOFError, OSError):
            pass
    return message


def _gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else 0.0


def _fmt_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if nbytes < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    return ""


def summary(cfg: DemoConfig, results: Dict[str, Any], wall_s: float) -> str:
    """The final report (one string, several lines)."""
    dec, pre = results["decode"], results["prefill"]
    lat = np.array(dec["latencies"]) * 1e3
    total = cfg.request_bytes * len(lat)
    pieces = cfg.blocks_per_request * sum(c.num_tensors for c in cfg.caches)
    kib = " + ".join(f"{c.num_tensors} x {c.block_bytes(cfg.block_size) // 1024} KiB" for c in cfg.caches)
    preset = PRESETS[cfg.model]
    overlap = cfg.prefill_blocks >= 2 * cfg.blocks_per_request
    link = "link_clusters" if cfg.link_style == "clusters" else "rank-table link + query_register_mem_status"
    lines = [
        f"llm-datadist demo: {cfg.model} ({preset.title}), {preset.layers} layers, {kib} per block",
        f"  requests     : {len(lat)} x {cfg.blocks_per_request * cfg.block_size} tokens = {cfg.blocks_per_request} "
        f"blocks = {_fmt_bytes(cfg.request_bytes)} each ({pieces} pieces in {len(cfg.caches)} pull_blocks call"
        f"{'s' if len(cfg.caches) > 1 else ''})",
        f"  bytes moved  : {_fmt_bytes(total)} ({total:,} B)",
        f"  throughput   : {_gbps(total, lat.sum() / 1e3):.2f} GB/s (bytes / total pull time {lat.sum() / 1e3:.2f} s"
        f"{'; prefill writes the next requests meanwhile' if overlap else ''})",
        f"  pull latency : p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms "
        f"(min {lat.min():.1f}, max {lat.max():.1f})",
        f"  transport    : {dec['route']} ({link}, 127.0.0.1, linked in {dec['link_s'] * 1e3:.0f} ms)",
        f"  timings      : prefill writes {pre['write_s']:.2f} s, decode verifies {dec['verify_s']:.2f} s, "
        f"stream {dec['stream_s']:.2f} s, total {format_duration(wall_s)}",
        f"  verified     : all bytes OK ({total:,} bytes compared; no writes outside the destination blocks)",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success, 1 on any failure (mismatch, link error, timeout), 2 on bad options."""
    if args.list_models:
        _list_models()
        return 0
    try:
        cfg = build_config(args)
    except DemoError as exc:
        print(f"llm-datadist demo: error: {exc}", file=sys.stderr)
        return 2
    transport = cfg.transport or os.environ.get("LLM_DATADIST_TRANSPORT") or "auto"
    print(f"llm-datadist demo: {cfg.model}, {cfg.requests} requests of {_fmt_bytes(cfg.request_bytes)}, "
          f"{cfg.link_style} link, transport {transport}", file=sys.stderr)
    start = time.monotonic()
    progress = Progress(cfg.requests, label="pulling", enabled=not args.no_progress)
    procs, conns = _start(cfg)
    progress.update(0, note="starting prefill and decode")
    try:
        results = _supervise(cfg, procs, conns, progress)
    except DemoError as exc:
        progress.close()
        print(f"llm-datadist demo: FAILED: {exc}", file=sys.stderr)
        _stop(procs, grace=1.0)
        return 1
    except KeyboardInterrupt:
        progress.close()
        _stop(procs, grace=0.0)
        return 130
    progress.close()
    _stop(procs, grace=10.0)
    print(summary(cfg, results, time.monotonic() - start))
    return 0
