"""register_cache / register_blocks_cache with the tensors themselves (numpy arrays, torch tensors where installed)
instead of addresses: contiguity, dtype, byte size and memory kind checked against the CacheDesc with
LLMException(LLM_PARAM_INVALID) naming the tensor index; ints unchanged; the bytes moved are the tensors' bytes."""
from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import numpy as np
import pytest

from llm_datadist import (BlocksCacheKey, CacheDesc, CacheKey, DataType, LLMClusterInfo, LLMConfig, LLMDataDist,
                          LLMException, LLMRole, LLMStatusCode, Placement)
from subsystems import importorskip

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")


def _arrays(n, shape, dtype=np.float16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(np.prod(shape)) * np.dtype(dtype).itemsize, dtype=np.uint8)
            .view(dtype).reshape(shape) for _ in range(n)]


def _refused(exc_info, *fragments):
    assert exc_info.value.status_code == PARAM_INVALID
    for fragment in fragments:
        assert fragment in str(exc_info.value), (fragment, str(exc_info.value))


@pytest.fixture
def cm(make_dd):
    return make_dd(LLMRole.PROMPT, 1).cache_manager


# ---- accepted forms -----------------------------------------------------------------------------
@pytest.mark.parametrize("blocks", [False, True])
def test_arrays_register_like_their_addresses(cm, blocks):
    arrays = _arrays(3, (4, 8))
    desc = CacheDesc(3, [4, 8], DataType.DT_FLOAT16, Placement.DEVICE)
    if blocks:
        cache = cm.register_blocks_cache(desc, arrays, BlocksCacheKey(1, 0))
    else:
        cache = cm.register_cache(desc, arrays, [CacheKey(1, 7)])
    assert cache.tensor_addrs == [a.ctypes.data for a in arrays]
    assert all(type(addr) is int for addr in cache.tensor_addrs)
    assert cache.is_blocks_cache is blocks
    # ints keep working unchanged next to it
    again = _arrays(3, (4, 8))
    int_cache = cm.register_cache(CacheDesc(3, [4, 8], DataType.DT_FLOAT16), [a.ctypes.data for a in again])
    assert int_cache.tensor_addrs == [a.ctypes.data for a in again]
    cm.unregister_cache(int_cache.cache_id)


@pytest.mark.parametrize("np_dtype, data_type", [
    (np.float16, DataType.DT_FLOAT16), (np.float32, DataType.DT_FLOAT), (np.float64, DataType.DT_DOUBLE),
    (np.int8, DataType.DT_INT8), (np.int16, DataType.DT_INT16), (np.int32, DataType.DT_INT32),
    (np.int64, DataType.DT_INT64), (np.uint8, DataType.DT_UINT8), (np.uint16, DataType.DT_UINT16),
    (np.uint32, DataType.DT_UINT32), (np.uint64, DataType.DT_UINT64), (np.bool_, DataType.DT_BOOL),
    (np.uint16, DataType.DT_BF16),  # numpy has no bfloat16: its bits are held in uint16
])
def test_every_numpy_dtype_maps_to_its_data_type(cm, np_dtype, data_type):
    arrays = [np.zeros((2, 4), np_dtype)]
    cache = cm.register_blocks_cache(CacheDesc(1, [2, 4], data_type, Placement.HOST), arrays)
    assert cache.tensor_addrs == [arrays[0].ctypes.data]


def test_a_contiguous_slice_of_a_larger_buffer_is_accepted(cm):
    big = np.zeros((16, 8), np.float32)
    cache = cm.register_blocks_cache(CacheDesc(1, [4, 8], DataType.DT_FLOAT), [big[4:8]])
    assert cache.tensor_addrs == [big[4:8].ctypes.data]


# ---- refused forms ------------------------------------------------------------------------------
def test_non_contiguous_tensor_is_refused_by_index(cm):
    base = _arrays(2, (4, 16))
    arrays = [base[0][:, :8], base[1][:, ::2]]  # 4x8 each, neither contiguous
    arrays[0] = np.ascontiguousarray(arrays[0])
    with pytest.raises(LLMException) as exc:
        cm.register_blocks_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), arrays)
    _refused(exc, "tensor 1", "not contiguous")
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [16, 4], DataType.DT_FLOAT16), [base[0].T])
    _refused(exc, "tensor 0", "not contiguous")


def test_dtype_mismatch_is_refused(cm):
    arrays = [np.zeros((4, 8), np.float16), np.zeros((4, 4), np.float32)]  # same bytes, other dtype
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), arrays)
    _refused(exc, "tensor 1", "float32", "DT_FLOAT16")
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [4, 8], DataType.DT_UINT16), [np.zeros((4, 8), np.int16)])
    _refused(exc, "tensor 0", "int16", "DT_UINT16")
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [2], DataType.DT_STRING), [np.zeros(2, np.complex128)])
    _refused(exc, "tensor 0", "complex128")


@pytest.mark.parametrize("rows", [3, 5])
def test_byte_size_other_than_the_desc_is_refused(cm, rows):
    arrays = [np.zeros((4, 8), np.float16), np.zeros((rows, 8), np.float16)]
    with pytest.raises(LLMException) as exc:
        cm.register_blocks_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), arrays)
    _refused(exc, "tensor 1", f"{rows * 16} bytes", "64 bytes per tensor")


def test_mixing_ints_and_tensors_is_refused(cm):
    arrays = _arrays(2, (4, 8))
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), [arrays[0].ctypes.data, arrays[1]])
    _refused(exc, "mixes", "element 0 is an int", "element 1")


def test_wrong_types_and_counts(cm):
    arrays = _arrays(2, (4, 8))
    desc = CacheDesc(2, [4, 8], DataType.DT_FLOAT16)
    with pytest.raises(TypeError, match="inner type only support"):
        cm.register_cache(desc, [arrays[0], "x"])
    with pytest.raises(TypeError, match=r"addrs only support \['list'\]"):
        cm.register_blocks_cache(desc, tuple(arrays))
    with pytest.raises(LLMException) as exc:
        cm.register_blocks_cache(desc, arrays[:1])
    _refused(exc, "1 tensors", "num_tensors 2")


def test_read_only_and_foreign_byte_order_arrays_are_refused(cm):
    frozen = np.frombuffer(bytes(64), np.float16).reshape(4, 8)
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [4, 8], DataType.DT_FLOAT16), [frozen])
    _refused(exc, "tensor 0", "read-only")
    swapped = np.zeros((4, 8), np.dtype(np.float16).newbyteorder())
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [4, 8], DataType.DT_FLOAT16), [swapped])
    _refused(exc, "tensor 0", "byte order")


def test_registered_tensors_stay_alive_until_unregistered(cm):
    array = np.zeros((4, 8), np.float16)
    ref = weakref.ref(array)
    cache = cm.register_blocks_cache(CacheDesc(1, [4, 8], DataType.DT_FLOAT16), [array])
    del array
    gc.collect()
    assert ref() is not None  # the registration holds it: its memory can not be freed under a peer
    cm.unregister_cache(cache.cache_id)
    gc.collect()
    assert ref() is None


# ---- bytes moved between peers ------------------------------------------------------------------
def test_pulls_between_tensor_registered_caches_move_the_tensor_bytes(make_pair):
    pair = make_pair(ra=False)
    src = _arrays(4, (6, 32), np.float16, seed=5)
    dst = [np.zeros((5, 32), np.float16) for _ in range(4)]
    pair.p_cm.register_blocks_cache(CacheDesc(4, [6, 32], DataType.DT_FLOAT16), src, BlocksCacheKey(1, 0))
    dst_cache = pair.d_cm.register_blocks_cache(CacheDesc(4, [5, 32], DataType.DT_FLOAT16), dst)
    pair.d_cm.pull_blocks(BlocksCacheKey(1, 0), dst_cache, [5, 0, 3], [1, 4, 0])
    for s, d in zip(src, dst):
        assert d[[1, 4, 0]].tobytes() == s[[5, 0, 3]].tobytes()
        assert not d[[2, 3]].any()


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from llm_datadist import BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole, Placement
    port = int(sys.argv[1])
    config = LLMConfig()
    config.enable_cache_manager = True
    config.listen_ip_info = f"127.0.0.1:{port}"
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    dd.init(config.generate_options())
    kv = [np.arange(8 * 64, dtype=np.float32).reshape(8, 64) * (t + 1) for t in range(2)]
    dd.cache_manager.register_blocks_cache(CacheDesc(2, [8, 64], DataType.DT_FLOAT, Placement.DEVICE), kv,
                                           BlocksCacheKey(1, 0))
    del kv  # the registration keeps the arrays alive
    print("ready", flush=True)
    sys.stdin.readline()
    dd.finalize()
    print("bye", flush=True)
""")


def test_two_processes_pull_from_tensors_registered_without_a_reference(free_port):
    port = free_port()
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(port)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    dd = LLMDataDist(LLMRole.DECODER, 2)
    try:
        assert child.stdout.readline().strip() == "ready"
        config = LLMConfig()
        config.enable_cache_manager = True
        dd.init(config.generate_options())
        dst = [np.zeros((4, 64), np.float32) for _ in range(2)]
        cache = dd.cache_manager.register_blocks_cache(CacheDesc(2, [4, 64], DataType.DT_FLOAT), dst)
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        info.append_local_ip_info("127.0.0.1", 0)
        info.append_remote_ip_info("127.0.0.1", port)
        assert dd.link_clusters([info], 5000) == (LLMStatusCode.LLM_SUCCESS, [LLMStatusCode.LLM_SUCCESS])
        dd.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, [7, 2, 0, 5], [0, 1, 2, 3])
        expected = np.arange(8 * 64, dtype=np.float32).reshape(8, 64)[[7, 2, 0, 5]]
        for t, d in enumerate(dst):
            assert d.tobytes() == (expected * (t + 1)).tobytes()
    finally:
        dd.finalize()
        child.stdin.write("done\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "bye"
        assert child.wait(20) == 0


# ---- torch --------------------------------------------------------------------------------------
def test_registration_never_imports_torch():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from llm_datadist import CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole

        class NoTorch:  # as if torch were not installed, and counts who looks for it
            asked = 0
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    NoTorch.asked += 1
                    raise ImportError("torch is blocked in this test")
                return None

        sys.modules.pop("torch", None)
        sys.meta_path.insert(0, NoTorch())
        c = LLMConfig(); c.enable_cache_manager = True
        dd = LLMDataDist(LLMRole.PROMPT, 1); dd.init(c.generate_options())
        NoTorch.asked = 0
        dd.cache_manager.register_cache(CacheDesc(1, [2, 2], DataType.DT_FLOAT), [np.zeros((2, 2), np.float32)])
        dd.finalize()
        assert NoTorch.asked == 0 and "torch" not in sys.modules, NoTorch.asked
    """)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


@pytest.mark.torch
def test_torch_tensors(cm):
    torch = importorskip("torch", "torch", "torch is not installed: the torch form can not be checked")
    tensors = [torch.arange(32, dtype=torch.float16).reshape(4, 8) for _ in range(2)]
    cache = cm.register_blocks_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.DEVICE), tensors)
    assert cache.tensor_addrs == [t.data_ptr() for t in tensors]
    bf16 = [torch.zeros((4, 8), dtype=torch.bfloat16)]
    assert cm.register_cache(CacheDesc(1, [4, 8], DataType.DT_BF16), bf16).tensor_addrs == [bf16[0].data_ptr()]
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [8, 4], DataType.DT_FLOAT16), [tensors[0].t()])
    _refused(exc, "tensor 0", "not contiguous")
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(1, [4, 8], DataType.DT_BF16), [tensors[0]])
    _refused(exc, "tensor 0", "torch.float16", "DT_BF16")
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), [tensors[0], torch.zeros(4, 9).half()])
    _refused(exc, "tensor 1", "72 bytes")
    with pytest.raises(LLMException) as exc:
        cm.register_cache(CacheDesc(2, [4, 8], DataType.DT_FLOAT16), [tensors[0], np.zeros((4, 8), np.float16)
                                                                        .ctypes.data])
    _refused(exc, "mixes")
