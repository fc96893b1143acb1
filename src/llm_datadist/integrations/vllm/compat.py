"""Whether a prefill and a decode can exchange KV at all: the fingerprint each sends at first contact, compared field
by field so a mismatch names what differs and both values.

A decode worker says ``Hello`` with its fingerprint once per link to a prefill worker (after ``link_clusters``, before
its first claim or push hand-off); the prefill answers with its own. Both sides compare: the decode fails the
request's load with the differing fields named (vLLM's ``kv_load_failure_policy`` applies), and the prefill refuses
that link's claims and hand-offs with the same text. The answer is kept with the link: a new link (the prefill
restarted) is checked again.

Only facts of the model and of the cache format are compared; what differs legitimately between tensor-parallel
sizes (a rank's KV heads, its block bytes) is not, and ``tp_size`` travels as information only. Per-rank shapes are
still checked per transfer (``messages.Geometry`` in every claim).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, List, Optional

from llm_datadist.integrations.vllm import messages as msg

__all__ = ["COMPARED", "IncompatiblePeer", "fingerprint_of", "mismatches", "describe"]

# every field of the fingerprint but tp_size, in the order a message names them
COMPARED = tuple(name for name in msg.Fingerprint.__struct_fields__ if name != "tp_size")
# keys of a Hugging Face config that differ between copies of one model (paths, library versions)
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                                   "_attn_implementation_autoset", "_attn_implementation_internal"})


class IncompatiblePeer(ConnectionError):
    """The prefill and the decode disagree on what makes their KV caches exchangeable."""


def mismatches(decode: msg.Fingerprint, prefill: msg.Fingerprint) -> List[str]:
    """``"field: prefill X, decode Y"`` for every compared field that differs (empty: compatible)."""
    out = []
    for name in COMPARED:
        theirs, mine = getattr(prefill, name), getattr(decode, name)
        if mine != theirs:
            out.append(f"{name}: prefill {theirs!r}, decode {mine!r}")
    return out


def describe(differences: List[str], decode: msg.Fingerprint, prefill: msg.Fingerprint) -> str:
    """The failure text of a mismatch (the same on both sides): what differs, then what to do."""
    hint = ""
    if any(d.startswith("model:") for d in differences) and decode.model_config == prefill.model_config:
        hint = " (the same configuration under another name: give both the same --served-model-name)"
    return (f"the KV caches of the prefill (TP {prefill.tp_size}) and the decode (TP {decode.tp_size}) are not "
            f"compatible: {'; '.join(differences)}{hint}")


def _text(value: Any) -> str:
    return str(value).replace("torch.", "")


def config_hash(hf_config: Any) -> str:
    """A hash of a Hugging Face config's content, without paths and library versions (16 hex digits)."""
    try:
        content: Dict[str, Any] = dict(hf_config.to_dict())
    except (AttributeError, TypeError):
        content = {"repr": repr(hf_config)}
    for key in _VOLATILE_CONFIG_KEYS:
        content.pop(key, None)
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _groups(kv_cache_config: Any) -> tuple:
    """(description of the KV cache groups, layers in them)."""
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    parts, layers = [], 0
    for group in groups:
        spec = group.kv_cache_spec
        facts = []
        for name in ("sliding_window", "attention_chunk_size"):
            value = getattr(spec, name, None)
            if value:
                facts.append(f"{name}={value}")
        facts.append(f"layers={len(group.layer_names)}")
        parts.append(f"{type(spec).__name__}({', '.join(facts)})")
        layers += len(group.layer_names)
    return " + ".join(parts), layers


def _served_name(model_config: Any) -> str:
    name = getattr(model_config, "served_model_name", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if name else None
    return str(name or getattr(model_config, "model", "") or "")


def fingerprint_of(vllm_config: Any, kv_cache_config: Any = None) -> msg.Fingerprint:
    """This worker's fingerprint, from vLLM's configuration (and the KV cache config it was started with)."""
    import vllm

    model = vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = _text(model.dtype)
    cache_dtype = str(getattr(cache, "cache_dtype", "auto") or "auto")
    groups, group_layers = _groups(kv_cache_config)
    if getattr(model, "use_mla", False):
        kv_heads = 1
    else:
        kv_heads = int(model.get_total_num_kv_heads())
    layout: Optional[str] = getattr(kv_cache_config, "kv_cache_layout", None) or getattr(cache, "kv_cache_layout",
                                                                                          None)
    return msg.Fingerprint(
        model=_served_name(model), model_config=config_hash(model.hf_config), dtype=dtype,
        kv_cache_dtype=dtype if cache_dtype == "auto" else cache_dtype, block_size=int(cache.block_size),
        layers=group_layers or int(model.get_total_num_hidden_layers()), kv_heads=kv_heads,
        head_size=int(model.get_head_size()), kv_cache_layout=str(layout or "unknown"), kv_cache_groups=groups,
        vllm_version=".".join(str(vllm.__version__).split(".")[:2]), protocol=msg.SCHEMA_VERSION,
        tp_size=int(vllm_config.parallel_config.tensor_parallel_size))
