import multiprocessing as mp
import socket
import sys

import numpy as np
from llm_datadist import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig, LLMDataDist,
                          LLMException, LLMRole, LLMStatusCode, Placement)

DESC = dict(num_tensors=4, shape=[16, 8 * 128], data_type=DataType.DT_FLOAT16, placement=Placement.DEVICE)


def kv_blocks(seed):  # 4 tensors (K, V of 2 layers) of 16 blocks
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((16, 8 * 128)).astype(np.float16) for _ in range(4)]


def prefill(ports, done):
    p = LLMDataDist(LLMRole.PROMPT, 1)
    for _ in range(5):  # listen on a free port; try another if it was taken meanwhile
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = LLMConfig()
        cfg.enable_cache_manager = True
        cfg.listen_ip_info = f"127.0.0.1:{port}"
        try:
            p.init(cfg.generate_options())
            break
        except LLMException:
            continue
    kv = kv_blocks(seed=0)
    p.cache_manager.register_blocks_cache(CacheDesc(**DESC), kv, BlocksCacheKey(1, 0))  # the tensors themselves
    ports.put(port)
    done.wait(30)  # serve pulls until the decoder is done
    p.finalize()


if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    ports, done = ctx.Queue(), ctx.Event()
    prompt = ctx.Process(target=prefill, args=(ports, done))
    prompt.start()
    port = ports.get(timeout=30)

    cfg = LLMConfig()
    cfg.enable_cache_manager = True
    d = LLMDataDist(LLMRole.DECODER, 2)
    d.init(cfg.generate_options())
    dst = [np.zeros((16, 8 * 128), np.float16) for _ in range(4)]
    cache = d.cache_manager.register_blocks_cache(CacheDesc(**DESC), dst)
    info = LLMClusterInfo()
    info.remote_cluster_id = 1
    info.append_local_ip_info("127.0.0.1", 0)
    info.append_remote_ip_info("127.0.0.1", port)
    assert d.link_clusters([info], 3000)[0] == LLMStatusCode.LLM_SUCCESS
    d.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[7, 3, 9], dst_blocks=[0, 1, 2])

    src = kv_blocks(seed=0)  # what the prefill registered
    ok = all(t[:3].tobytes() == s[[7, 3, 9]].tobytes() and not t[3:].any() for t, s in zip(dst, src))
    d.unlink_clusters([info], 3000)
    d.finalize()
    done.set()
    prompt.join(30)
    print("pulled blocks match" if ok else "MISMATCH")
    sys.exit(0 if ok and prompt.exitcode == 0 else 1)
