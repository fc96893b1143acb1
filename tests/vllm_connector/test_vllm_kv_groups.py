"""KV cache groups (hybrid models), shared tensors, MLA layouts, and the start-up refusal of caches the connector can
not move, with the configuration objects vLLM 0.32 passes (marked torch: .ci/run runs them with the Python of
.venv-vllm, which has vLLM and its torch; elsewhere they skip, naming what is missing)."""
from __future__ import annotations

import types

import numpy as np
import pytest

import subsystems

pytestmark = pytest.mark.torch
torch = subsystems.importorskip("torch", "torch", "torch is not installed (these tests build vLLM's spec objects)")
kv_interface = subsystems.importorskip("vllm.v1.kv_cache_interface", "vllm", "vLLM is not installed in this Python")

from llm_datadist.integrations.vllm.block_layout import layout_of  # noqa: E402
from llm_datadist.integrations.vllm.kv_groups import (UnsupportedKVCache, flatten_groups,  # noqa: E402
                                                      group_windows, grouped_block_pairs)
from fake_tensor import FakeTensor  # noqa: E402

BLOCK = 32
_ATTN = dict(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)


def _config(*groups):
    """A KVCacheConfig with one group per (spec, layer names)."""
    return kv_interface.KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[
        kv_interface.KVCacheGroupSpec(list(layers), spec) for spec, layers in groups])


def _full():
    return kv_interface.FullAttentionSpec(**_ATTN)


def _sliding(window: int = 48):
    return kv_interface.SlidingWindowSpec(sliding_window=window, **_ATTN)


# -- which groups move, and how much of them ---------------------------------------------------------------------
def test_windows_of_full_sliding_and_mla_groups():
    assert group_windows(_config((_full(), ["l1", "l3"])), BLOCK) == (0,)
    assert group_windows(_config((_sliding(48), ["l0", "l2"]), (_full(), ["l1", "l3"])), BLOCK) == (3, 0)
    assert group_windows(_config((_sliding(64), ["l0"])), BLOCK) == (3,)  # a window may start inside a block
    mla = kv_interface.MLAAttentionSpec(block_size=16, num_kv_heads=1, head_size=576, dtype=torch.float32)
    assert group_windows(_config((mla, ["l0", "l1"])), 16) == (0,)
    # without the hybrid allocator vLLM allocates sliding-window layers as full attention: every block moves
    promoted = kv_interface.FullAttentionSpec(sliding_window=48, **_ATTN)
    assert group_windows(_config((promoted, ["l0", "l1"])), BLOCK) == (0,)


@pytest.mark.parametrize("spec, kind", [
    (lambda: kv_interface.MambaSpec(block_size=BLOCK, shapes=((4, 8),), dtypes=(torch.float32,)),
     "Mamba / linear-attention"),
    (lambda: kv_interface.CrossAttentionSpec(**_ATTN), "cross-attention cache of an encoder-decoder model"),
    (lambda: kv_interface.ChunkedLocalAttentionSpec(attention_chunk_size=64, **_ATTN), "chunked local attention"),
    (lambda: kv_interface.SinkFullAttentionSpec(sink_len=4, **_ATTN), "attention sinks"),
], ids=["mamba", "cross-attention", "chunked-local", "sinks"])
def test_unsupported_caches_are_refused_by_layer_and_kind(spec, kind):
    config = _config((_full(), ["model.layers.0.self_attn.attn"]), (spec(), ["model.layers.1.mixer"]))
    with pytest.raises(UnsupportedKVCache, match=r"layer\(s\) model\.layers\.1\.mixer: .*" + kind.split(" ")[0]) as err:
        group_windows(config, BLOCK)
    assert "Supported: full attention" in str(err.value) and "sliding-window attention" in str(err.value)


def test_no_groups_or_another_block_size_is_refused():
    with pytest.raises(UnsupportedKVCache, match="attention-free"):
        group_windows(_config(), BLOCK)
    with pytest.raises(UnsupportedKVCache, match="block size 32, not the cache's 16"):
        group_windows(_config((_full(), ["l0"])), 16)


def test_connector_refuses_at_construction():
    """vLLM builds the connector with its KVCacheConfig on both roles: an unsupported cache fails start-up there."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from llm_datadist.integrations.vllm import LLMDataDistConnector

    vllm_config = types.SimpleNamespace(
        kv_transfer_config=types.SimpleNamespace(kv_connector_extra_config={}, is_kv_producer=True,
                                                 is_kv_consumer=False),
        cache_config=types.SimpleNamespace(block_size=BLOCK),
        parallel_config=types.SimpleNamespace(tensor_parallel_size=1))
    mamba = kv_interface.MambaSpec(block_size=BLOCK, shapes=((4, 8),), dtypes=(torch.float32,))
    with pytest.raises(UnsupportedKVCache, match=r"model\.layers\.0\.linear_attn: Mamba"):
        LLMDataDistConnector(vllm_config, KVConnectorRole.SCHEDULER,
                             _config((mamba, ["model.layers.0.linear_attn"]), (_full(), ["model.layers.1.attn"])))


# -- block pairs group by group ---------------------------------------------------------------------------------
def test_grouped_pairs_full_and_sliding_window():
    # 200 tokens = 7 blocks; group 0 a 48-token window (3 blocks from the end), group 1 full attention.
    prefill = [0, 0, 0, 0, 21, 22, 23] + [31, 32, 33, 34, 35, 36, 37]  # positions 0-3 freed by the window: null
    decode = [0, 0, 0, 0, 41, 42, 43] + [51, 52, 53, 54, 55, 56, 57, 58]  # the decode's full group has a spare
    src, dst = grouped_block_pairs(prefill, decode, 200, BLOCK, 0, (7, 7), (7, 8), (3, 0))
    assert (src, dst) == ([21, 22, 23, 31, 32, 33, 34, 35, 36, 37], [41, 42, 43, 51, 52, 53, 54, 55, 56, 57])
    # a null at the window's first position (its tokens all fell out) is skipped on either side
    src, dst = grouped_block_pairs([5, 0, 7, 8], [1, 2, 3, 4], 128, BLOCK, windows=(3,))
    assert (src, dst) == ([7, 8], [3, 4])
    # a local prefix hit of 5 blocks: only the last 2 blocks move in both groups
    src, dst = grouped_block_pairs(prefill, decode, 200, BLOCK, 5, (7, 7), (7, 8), (3, 0))
    assert (src, dst) == ([22, 23, 36, 37], [42, 43, 56, 57])
    # one group without a window: the single-group pairs
    assert grouped_block_pairs([7, 3, 9], [0, 1, 2, 5], 70, BLOCK) == ([7, 3, 9], [0, 1, 2])


def test_grouped_pairs_refuse_mismatched_groups():
    with pytest.raises(ValueError, match="prefill sent 2 KV cache groups, the decode has 1"):
        grouped_block_pairs([1, 2], [3], 10, BLOCK, 0, (1, 1), (), (0,))
    with pytest.raises(ValueError, match="in KV cache group 1"):
        grouped_block_pairs([1, 2, 3], [4, 5, 6, 7], 40, BLOCK, 0, (2, 1), (2, 2), (0, 0))


def test_flatten_groups():
    assert flatten_groups(([1, 2, 3],), 2) == ((1, 2), ())
    assert flatten_groups(([0, 4, 5], [6, 7, 8, 9]), 3) == ((0, 4, 5, 6, 7, 8), (3, 3))


# -- layouts vLLM's CPU backend gives ------------------------------------------------------------------------------
def test_layout_of_groups_sharing_tensors_registers_each_once():
    """vLLM overlays the groups of a hybrid model: layer i of every group views tensor i (as with the 4-layer
    sliding/full model: layers 0 and 1 share one tensor, layers 2 and 3 the other)."""
    shared = np.zeros((2, 64, 2, BLOCK, 64), np.float32)
    caches = {f"l{i}": FakeTensor(shared[i // 2]) for i in range(4)}
    layout = layout_of(caches, 64, heads=2)
    assert (layout.num_regions, len(layout.layer_names), layout.heads) == (2, 4, 2)
    assert layout.region_addrs == (shared[0].ctypes.data, shared[1].ctypes.data)
    assert [layout.writers(r) for r in range(2)] == [(0, 1), (2, 3)]
    plain = layout_of({f"l{i}": FakeTensor(shared[i]) for i in range(2)}, 64, heads=2)
    assert plain.region_layers == () and [plain.writers(r) for r in range(2)] == [(0,), (1,)]


def test_layout_of_refuses_partly_overlapping_tensors():
    base = np.zeros((3 * 64 * 16,), np.float32)
    with pytest.raises(ValueError, match="overlap without being the same memory"):
        layout_of({"a": FakeTensor(base[:64 * 16].reshape(64, 16)),
                   "b": FakeTensor(base[16:65 * 16].reshape(64, 16))}, 64)


def test_layout_of_mla_latent_cache():
    """vLLM's CPU MLA layout: one latent per token, no K/V split and no head dimension ([blocks, 16, 576])."""
    latent = np.zeros((2, 64, 16, 576), np.float32)
    layout = layout_of({"l0": FakeTensor(latent[0]), "l1": FakeTensor(latent[1])}, 64, heads=1)
    assert (layout.num_regions, layout.regions_per_layer, layout.heads) == (2, 1, 1)
    assert layout.block_nbytes == 16 * 576 * 4
