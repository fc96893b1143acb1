"""Time to first token of a vLLM decode with the KV pulled or pushed through LLMDataDistConnector versus
recomputing the prompt, the connector's KV bytes/s against ``llm-datadist bench`` for the same block size, and
how fast a prefill frees the blocks of a decode that dies. Every figure comes from one run on this machine.

    python benchmarks/vllm_connector_bench.py --out benchmarks/results/vllm_connector.md

vLLM runs in subprocesses with the vLLM venv's Python (``.venv-vllm``, see ``.ci/setup_vllm.sh``) through the
offline driver of the end-to-end tests; the model is a random Llama built locally (no download).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests", "vllm_connector"))

from vllm_harness import EXAMPLE, run_fake_decode, start_instances, vllm_env  # noqa: E402

MODELS = {  # name: (layers, hidden, heads, kv heads)
    "tiny": (2, 128, 4, 2),
    "small": (4, 512, 8, 4),
}


def build_model(python: str, name: str, out: str) -> None:
    layers, hidden, heads, kv_heads = MODELS[name]
    subprocess.run([python, os.path.join(EXAMPLE, "tiny_model.py"), out, "--layers", str(layers), "--hidden",
                    str(hidden), "--heads", str(heads), "--kv-heads", str(kv_heads)], check=True, env=vllm_env(),
                   capture_output=True, timeout=600)


def prompt(length: int, rng: random.Random) -> List[int]:
    return [rng.randrange(1, 500) for _ in range(length)]


def one_round(cluster, length: int, rng: random.Random) -> Dict[str, float]:
    """One prompt per mode: recompute on the decode, pull, push (decode ready first)."""
    pre, dec = cluster["prefill"], cluster["decode"]
    out: Dict[str, float] = {}
    out["recompute_ttft_s"] = dec.call("generate", prompts=[prompt(length, rng)], max_tokens=1)["elapsed_s"]

    tokens = prompt(length, rng)
    began = time.monotonic()
    pre_out = pre.call("generate", prompts=[tokens], max_tokens=1, params=[{"do_remote_decode": True}])
    dec_out = dec.call("generate", prompts=[tokens], max_tokens=1, params=pre_out["kv_transfer_params"])
    out["pull_e2e_s"] = time.monotonic() - began
    out["prefill_s"] = pre_out["elapsed_s"]
    out["pull_ttft_s"] = dec_out["elapsed_s"]
    stat = dec.call("connector_state")["load_stats"][-1]
    out["pull_bytes"], out["pull_job_s"], out["pull_transfer_s"] = stat[2], stat[3], stat[4]

    tokens, tid = prompt(length, rng), uuid.uuid4().hex
    dec.send("generate", prompts=[tokens], max_tokens=1,
             params=[{"do_remote_prefill": True, "transfer_mode": "push", "transfer_id": tid,
                      "remote_endpoints": [pre.endpoint]}])
    deadline = time.monotonic() + 60
    while tid not in pre.call("connector_state")["push_ready"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the decode's push hand-off never reached the prefill")
        time.sleep(0.002)
    began = time.monotonic()
    pre.call("generate", prompts=[tokens], max_tokens=1,
             params=[{"do_remote_decode": True, "transfer_mode": "push", "transfer_id": tid}])
    dec.recv()
    out["push_e2e_s"] = time.monotonic() - began
    return out


def release_latency(cluster, rounds: int, rng: random.Random) -> List[float]:
    """Seconds from killing a decode that claimed blocks to the prefill releasing them."""
    pre = cluster["prefill"]
    values = []
    for _ in range(rounds):
        params = pre.call("generate", prompts=[prompt(300, rng) for _ in range(4)], max_tokens=1,
                          params=[{"do_remote_decode": True}] * 4)["kv_transfer_params"]
        ids = [p["remote_request_id"] for p in params]
        fake = run_fake_decode(pre.endpoint, pre.geometry, ids)
        fake.stdout.readline()
        killed = time.monotonic()
        fake.kill()
        fake.wait(30)
        pre.call("step_until_free")
        log = [e for e in pre.call("connector_state")["release_log"] if e[0] in ids]
        values.append(max(e[2] for e in log) - killed)
    return values


def cpus_of(pid: int) -> str:
    """The CPUs process ``pid``'s main thread may run on (``Cpus_allowed_list``, e.g. ``1`` or ``0-1``)."""
    with open(f"/proc/{pid}/status") as handle:
        return next((line.split(":", 1)[1].strip() for line in handle if line.startswith("Cpus_allowed_list")), "")


def library_bench(block_nbytes: int, out_dir: str, owner_cpus: str = "", initiator_cpus: str = "") -> Dict[str, float]:
    """``llm-datadist bench`` (transport auto) for one block size, its owner and initiator bound to the given CPUs
    (the prefill's and the decode's), else unbound: median GB/s per direction."""
    size = f"{block_nbytes // 1024}K"
    binding = (["--owner-cpus", owner_cpus] if owner_cpus else []) + \
        (["--initiator-cpus", initiator_cpus] if initiator_cpus else [])
    subprocess.run([sys.executable, "-m", "llm_datadist", "bench", "--sizes", size, "--transports", "auto",
                    "--total-mib", "64", "--passes", "5", "--out", out_dir, "--no-progress"] + binding, check=True,
                   capture_output=True, timeout=900, env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "src")))
    medians: Dict[str, float] = {}
    with open(os.path.join(out_dir, "results.jsonl")) as handle:
        for line in handle:
            row = json.loads(line)
            if row.get("kind") != "bandwidth":
                continue
            if row.get("mechanism") == "auto":
                medians[row["direction"]] = row["median_gbps"]
            elif row.get("mechanism") == "memcpy.c_1t":
                medians["memcpy"] = row["median_gbps"]
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="128,512,1024,2048,4096")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--python", default=os.environ.get("LLM_DATADIST_VLLM_PYTHON")
                        or os.path.join(REPO, ".venv-vllm", "bin", "python"))
    parser.add_argument("--out", default=None, help="markdown file to write (default: print)")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    work = tempfile.mkdtemp(prefix="vllm-connector-bench-")
    model = os.path.join(work, "model")
    build_model(args.python, args.model, model)
    spec = {"num_blocks": 600, "max_model_len": max(lengths) + 64}
    cores = os.cpu_count() or 1
    envs = {"prefill": {"VLLM_CPU_OMP_THREADS_BIND": "0"},  # one core each, as if on two hosts
            "decode": {"VLLM_CPU_OMP_THREADS_BIND": str(min(1, cores - 1))}}
    cluster = start_instances(args.python, model, work, {
        "prefill": {"role": "kv_producer", "extra": {}, **spec},
        "decode": {"role": "kv_consumer", "extra": {}, **spec}}, envs)
    rng = random.Random(11)
    binding = {name: cpus_of(instance.proc.pid) for name, instance in cluster.items()}
    try:
        for length in (lengths[0], lengths[-1]):
            one_round(cluster, length, rng)  # warm-up: links, kernels, allocator
        rows = {length: [one_round(cluster, length, rng) for _ in range(args.reps)] for length in lengths}
        releases = release_latency(cluster, 5, rng)
    finally:
        for instance in cluster.values():
            instance.close()
    layers, hidden, heads, kv_heads = MODELS[args.model]
    block_nbytes = kv_heads * 32 * 2 * (hidden // heads) * 4
    library = {"bound": library_bench(block_nbytes, os.path.join(work, "bench-bound"), binding["prefill"],
                                      binding["decode"]),
               "unbound": library_bench(block_nbytes, os.path.join(work, "bench"))}
    report = render(args, rows, releases, library, block_nbytes, layers, binding)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(report)
    print(report)


def _med(rows: List[Dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def render(args, rows, releases, library, block_nbytes: int, layers: int, binding: Dict[str, str]) -> str:
    layers_, hidden, heads, kv_heads = MODELS[args.model]
    lines = [
        "# vLLM connector: time to first token, KV throughput, block release",
        "",
        f"Model: random Llama, {layers_} layers, hidden {hidden}, {heads} heads, {kv_heads} KV heads, float32, "
        f"block 32 tokens ({block_nbytes // 1024} KiB per layer and block); vLLM {vllm_version(args.python)} (CPU), "
        f"offline engine, one process per instance, prefill and decode on one {os.cpu_count()}-core host, "
        "the prefill's compute bound to core 0 and the decode's to core 1 (VLLM_CPU_OMP_THREADS_BIND; the "
        f"processes' own CPU sets: prefill {binding['prefill']}, decode {binding['decode']}); "
        f"median of {args.reps} prompts per length (random tokens, no prefix caching).",
        "",
        "TTFT on the decode (ms): `recompute` = the decode computes the whole prompt itself; `pull` = its KV was "
        "pulled from the prefill (claim + one pull_blocks of every layer + release, then the last token). "
        "End to end (ms): prefill + transfer + first decode token, seen from the caller; `push` = the decode is "
        "ready first and the prefill pushes each layer during its forward.",
        "",
        "| prompt tokens | KV MiB | decode TTFT recompute | decode TTFT pull | ×speed-up | prefill alone | "
        "e2e pull | e2e push | push/pull | pull_blocks GB/s | claim-to-release GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for length, rs in rows.items():
        rec, pull = _med(rs, "recompute_ttft_s"), _med(rs, "pull_ttft_s")
        e2e_pull, e2e_push = _med(rs, "pull_e2e_s"), _med(rs, "push_e2e_s")
        gbps = statistics.median(r["pull_bytes"] / r["pull_transfer_s"] / 1e9 for r in rs)
        job_gbps = statistics.median(r["pull_bytes"] / r["pull_job_s"] / 1e9 for r in rs)
        mib = _med(rs, "pull_bytes") / (1 << 20)
        lines.append(f"| {length} | {mib:.1f} | {rec * 1e3:.1f} | {pull * 1e3:.1f} | ×{rec / pull:.1f} | "
                     f"{_med(rs, 'prefill_s') * 1e3:.1f} | {e2e_pull * 1e3:.1f} | {e2e_push * 1e3:.1f} | "
                     f"×{e2e_push / e2e_pull:.2f} | {gbps:.2f} | {job_gbps:.2f} |")
    big = rows[max(rows)]
    conn = statistics.median(r["pull_bytes"] / r["pull_transfer_s"] / 1e9 for r in big)
    job = statistics.median(r["pull_bytes"] / r["pull_job_s"] / 1e9 for r in big)
    bound, unbound = library["bound"], library["unbound"]
    lib_pull, free_pull = bound.get("pull", float("nan")), unbound.get("pull", float("nan"))
    lines += [
        "",
        f"Connector KV throughput at {max(rows)} tokens: {conn:.2f} GB/s inside its pull_blocks call ({job:.2f} GB/s "
        f"from claim to release, control round trips included) against `llm-datadist bench --sizes "
        f"{block_nbytes // 1024}K --transports auto --total-mib 64` right after it, its owner bound to the "
        f"prefill's CPUs ({binding['prefill']}) and its initiator to the decode's ({binding['decode']}): pull "
        f"{lib_pull:.2f} GB/s, push {bound.get('push', float('nan')):.2f} GB/s, single-thread memcpy of the same "
        f"blocks {bound.get('memcpy', float('nan')):.2f} GB/s → connector/library pull ×{conn / lib_pull:.2f}. "
        f"The same bench unbound: pull {free_pull:.2f} GB/s (connector/unbound library ×{conn / free_pull:.2f}).",
        "",
        f"Block release after a decode that claimed 4 requests is killed (SIGKILL), 5 runs: median "
        f"{statistics.median(releases) * 1e3:.1f} ms, max {max(releases) * 1e3:.1f} ms (the lease, 30 s by "
        "default, only covers decodes that never claim).",
        "",
    ]
    return "\n".join(lines)


def vllm_version(python: str) -> str:
    out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True,
                         env=vllm_env(), timeout=300)
    return out.stdout.strip() or "?"


if __name__ == "__main__":
    main()
