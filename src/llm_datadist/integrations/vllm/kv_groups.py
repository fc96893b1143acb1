"""The KV cache groups of a model: which ones the connector can move, and which blocks of each a decode needs.

vLLM puts layers with the same kind of KV cache into one group with its own block table (``KVCacheConfig.
kv_cache_groups``); a hybrid model (sliding-window layers next to full-attention layers, as in Gemma 2/3 or
gpt-oss) has several. All groups draw their blocks from one block pool, and their layers' tensors overlay each
other (the i-th layer of every group shares one tensor): a block id belongs to one group at a time. The connector
therefore registers each distinct tensor once (``block_layout.layout_of``) and moves, for every group, the block
pairs of that group: a block of a tensor is exactly the data of the group that owns the block.

What a group needs moved:
  full attention (including MLA's latent cache): every block of the prompt.
  sliding window: vLLM frees the blocks that fell out of the window (their place in the block table becomes the
  null block 0). The decode's next token attends to the last ``window`` tokens only, so only the prompt's last
  ``ceil(window / block_size) + 1`` blocks are moved, and null blocks on either side are skipped.

Anything else (Mamba or linear-attention state, cross-attention caches of encoder-decoder models, chunked local
attention, attention sinks, compressed states, groups of another block size) is refused at start-up with
``UnsupportedKVCache``, naming the layer and the kind, rather than moved wrongly.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["NULL_BLOCK", "SUPPORTED", "UnsupportedKVCache", "group_windows", "split_groups", "flatten_groups",
           "grouped_block_pairs"]

NULL_BLOCK = 0  # vLLM's null block: the block table's placeholder for a block a sliding window freed
SUPPORTED = "full attention (MHA/GQA/MQA, also as MLA's latent cache) and sliding-window attention"

# spec class name -> what it is, for the refusals (checked along the class's MRO, most specific first)
_UNSUPPORTED_KINDS = {
    "MambaSpec": "Mamba / linear-attention / short-convolution state",
    "CrossAttentionSpec": "cross-attention cache of an encoder-decoder model",
    "EncoderOnlyAttentionSpec": "encoder-only attention",
    "ChunkedLocalAttentionSpec": "chunked local attention",
    "SinkFullAttentionSpec": "full attention with attention sinks",
    "SlidingWindowMLASpec": "sliding-window MLA (DeepSeek-V4)",
    "RSWASpec": "reference sliding-window attention",
    "CircularBufferSpec": "circular-buffer state",
    "HiddenStateCacheSpec": "hidden-state cache",
}
_FULL = ("FullAttentionSpec", "MLAAttentionSpec")
_WINDOWED = ("SlidingWindowSpec",)


class UnsupportedKVCache(ValueError):
    """A KV cache the connector can not move (named in the message, with what is supported)."""


def _kind(spec: Any) -> str:
    for cls in type(spec).__mro__:
        if cls.__name__ in _UNSUPPORTED_KINDS:
            return _UNSUPPORTED_KINDS[cls.__name__]
    return type(spec).__name__


def _refuse(layers: Sequence[str], what: str) -> UnsupportedKVCache:
    shown = ", ".join(list(layers)[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    return UnsupportedKVCache(f"the llm_datadist connector can not transfer the KV cache of layer(s) {shown}: "
                              f"{what}. Supported: {SUPPORTED}, in KV cache groups of one block size")


def _window_of(spec: Any, layers: Sequence[str], block_size: int) -> int:
    """Blocks a decode needs from the end of the prompt (0: all of them), or ``UnsupportedKVCache``."""
    name = type(spec).__name__
    if name == "UniformTypeKVCacheSpecs":  # one group of layers with different specs of one kind
        windows = {_window_of(inner, [layer], block_size) for layer, inner in spec.kv_cache_specs.items()}
        if len(windows) != 1:
            raise _refuse(layers, "one KV cache group whose layers have different sliding windows")
        return windows.pop()
    if name not in _FULL + _WINDOWED:
        raise _refuse(layers, _kind(spec))
    if int(getattr(spec, "block_size", block_size)) != block_size:
        raise _refuse(layers, f"a KV cache group of block size {spec.block_size}, not the cache's {block_size}")
    if getattr(spec, "tokens_per_state", 1) != 1:
        raise _refuse(layers, f"compressed KV states ({spec.tokens_per_state} tokens per state)")
    if name in _WINDOWED:
        return math.ceil(int(spec.sliding_window) / block_size) + 1
    return 0  # full attention; a sliding-window layer vLLM allocates as full attention (no hybrid allocator) too


def group_windows(kv_cache_config: Any, block_size: int) -> Tuple[int, ...]:
    """Per KV cache group, the blocks a decode needs from the end of a prompt (0: every block).

    Raises:
        UnsupportedKVCache: a group the connector can not move, or no KV cache at all.
    """
    groups = list(getattr(kv_cache_config, "kv_cache_groups", None) or ())
    if not groups:
        raise UnsupportedKVCache("the llm_datadist connector found no KV cache groups (an attention-free model has "
                                 f"no KV cache to transfer). Supported: {SUPPORTED}")
    windows = []
    for group in groups:
        if not getattr(group, "enable_kv_transfer", True):
            raise _refuse(group.layer_names, "a KV cache group vLLM marks as not transferable")
        windows.append(_window_of(group.kv_cache_spec, group.layer_names, block_size))
    return tuple(windows)


def split_groups(block_ids: Sequence[int], sizes: Sequence[int]) -> List[Sequence[int]]:
    """Per-group lists of a flat concatenation (``sizes`` empty: one group).

    Raises:
        ValueError: the sizes do not add up to the list.
    """
    if not sizes:
        return [block_ids]
    if sum(sizes) != len(block_ids) or any(size < 0 for size in sizes):
        raise ValueError(f"group sizes {list(sizes)} do not match {len(block_ids)} block ids")
    out, start = [], 0
    for size in sizes:
        out.append(block_ids[start:start + size])
        start += size
    return out


def grouped_block_pairs(remote_ids: Sequence[int], local_ids: Sequence[int], num_tokens: int, block_size: int,
                        first_block: int = 0, remote_sizes: Sequence[int] = (), local_sizes: Sequence[int] = (),
                        windows: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
    """Source and destination blocks of the first ``num_tokens`` tokens, group by group.

    Each side's block ids are one flat list: the per-group block tables (each starting at the prompt's first
    block) one after the other, ``*_sizes`` long (empty: one group). Group ``g`` moves the block pairs of positions
    ``first_block`` (blocks the decode already has) up to the prompt's last block; with a window of ``windows[g]``
    blocks only the last ``windows[g]`` positions, without null blocks.

    Raises:
        ValueError: a side has fewer blocks than the tokens need, or the two sides have different groups.
    """
    remote_groups, local_groups = split_groups(remote_ids, remote_sizes), split_groups(local_ids, local_sizes)
    wins = tuple(windows) if windows else (0,) * len(local_groups)
    if not len(remote_groups) == len(local_groups) == len(wins):
        raise ValueError(f"the prefill sent {len(remote_groups)} KV cache groups, the decode has "
                         f"{len(local_groups)} (and {len(wins)} configured)")
    needed = math.ceil(num_tokens / block_size) if num_tokens > 0 else 0
    src: List[int] = []
    dst: List[int] = []
    for group, (remote, local, window) in enumerate(zip(remote_groups, local_groups, wins)):
        if len(remote) < needed or len(local) < needed:
            raise ValueError(f"{num_tokens} tokens need {needed} blocks of {block_size}, but the prefill has "
                             f"{len(remote)} and the decode {len(local)}"
                             + (f" in KV cache group {group}" if len(wins) > 1 else ""))
        start = min(max(first_block, 0), needed)
        if window:
            start = max(start, needed - window)
        for position in range(start, needed):
            s, d = int(remote[position]), int(local[position])
            if window and (s == NULL_BLOCK or d == NULL_BLOCK):
                continue  # freed by the window on one side: out of the window on both
            src.append(s)
            dst.append(d)
    return src, dst


def flatten_groups(groups: Sequence[Sequence[int]], needed: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """(the first ``needed`` block ids of every group one after the other, their counts per group); one group:
    (its first ``needed`` ids, ())."""
    parts = [tuple(int(b) for b in group[:needed]) for group in groups]
    if len(parts) == 1:
        return parts[0], ()
    return tuple(b for part in parts for b in part), tuple(len(part) for part in parts)
