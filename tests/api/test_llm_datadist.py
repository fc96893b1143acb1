"""LLMDataDist lifecycle, one-sided and rank-table links and switch_role, as the official API specifies them."""
from __future__ import annotations

import json
import socket
import time
import uuid

import pytest

from llm_datadist import (CacheKey, CacheKeyByIdAndIndex, LLMClusterInfo, LLMDataDist, LLMException, LLMRole,
                          LLMStatusCode, RegisterMemStatus)
from waiting import NEVER_HANGS_S, wait_until

SUCCESS = LLMStatusCode.LLM_SUCCESS
PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID
NOT_INITIALIZED = "llm datadist is not initialized"


def _rank_table(n: int = 2) -> str:
    devices = [{"device_id": str(i), "device_ip": "127.0.0.1", "rank_id": str(i)} for i in range(n)]
    return json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                       "server_list": [{"server_id": "127.0.0.1", "device": devices}]})


def _comm_name() -> str:
    return "test-" + uuid.uuid4().hex[:12]


def _pull_fails_with(cm, key, cache):
    """The status of a pull that must fail, or None if it succeeded."""
    try:
        cm.pull_cache(key, cache, 0)
    except LLMException as exc:
        return exc.status_code
    return None


# -- constructor, init, finalize -----------------------------------------------------------------
def test_constructor_argument_types():
    with pytest.raises(TypeError):
        LLMDataDist(1, 0)
    with pytest.raises(ValueError):
        LLMDataDist(LLMRole.PROMPT, -1)
    with pytest.raises(TypeError):
        LLMDataDist(LLMRole.PROMPT, "0")
    with pytest.raises(ValueError):
        LLMDataDist(LLMRole.PROMPT, 2**64)
    assert LLMDataDist(LLMRole.MIX, 2**64 - 1).cluster_id == 2**64 - 1


def test_apis_before_init_raise_runtime_error(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    info = tools.cluster_info(2, 26000)
    calls = [
        lambda: dd.cache_manager,
        lambda: dd.link("comm", {1: 0, 2: 1}, _rank_table()),
        lambda: dd.unlink(1),
        lambda: dd.query_register_mem_status(1),
        lambda: dd.link_clusters([info], 1000),
        lambda: dd.unlink_clusters([info], 1000),
        lambda: dd.switch_role(LLMRole.DECODER),
    ]
    for call in calls:
        with pytest.raises(RuntimeError) as exc:
            call()
        assert type(exc.value) is RuntimeError  # a plain RuntimeError, not an LLMException
        assert str(exc.value) == NOT_INITIALIZED


def test_finalize_without_init_is_noop(make_dd):
    dd = make_dd(LLMRole.DECODER, 1, init=False)
    dd.finalize()
    dd.finalize()
    with pytest.raises(RuntimeError):
        dd.cache_manager


def test_init_twice_is_noop(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1)
    cm = dd.cache_manager
    dd.init(tools.make_options())
    dd.init({"something": "else"})
    assert dd.cache_manager is cm


def test_several_instances_per_process(make_dd):
    # Unlike the official library (see docs/compatibility.md), a second initialized instance is allowed, even
    # with the same cluster id.
    first = make_dd(LLMRole.PROMPT, 1)
    second = make_dd(LLMRole.DECODER, 2)
    third = make_dd(LLMRole.MIX, 1)
    assert {first.cluster_id, second.cluster_id, third.cluster_id} == {1, 2}
    assert len({id(dd.cache_manager) for dd in (first, second, third)}) == 3


def test_new_instance_after_finalize(make_dd, tools):
    first = make_dd(LLMRole.PROMPT, 1)
    first.finalize()
    second = make_dd(LLMRole.PROMPT, 1)
    assert second.cache_manager is not None
    # the finalized instance can itself be initialized again
    first.init(tools.make_options())
    assert first.cache_manager is not None


def test_init_options_must_be_dict(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    with pytest.raises(TypeError):
        dd.init([])
    with pytest.raises(TypeError):
        dd.init(None)
    dd.init(tools.make_options())  # still usable
    assert dd.cache_manager is not None


def test_flow_graph_mem_max_size(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    for bad in ("1024,2048", "1.23", "-1"):
        with pytest.raises(LLMException) as exc:
            dd.init({**tools.make_options(), "ge.flowGraphMemMaxSize": bad})
        assert exc.value.status_code == PARAM_INVALID
    with pytest.raises(TypeError):
        dd.init({**tools.make_options(), "ge.flowGraphMemMaxSize": 123})
    with pytest.raises(RuntimeError, match=NOT_INITIALIZED):
        dd.cache_manager
    dd.init({**tools.make_options(), "ge.flowGraphMemMaxSize": "1024"})
    assert dd.cache_manager is not None


def test_hixl_backend_needs_cache_manager(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    with pytest.raises(LLMException, match="EnableCacheManager") as exc:
        dd.init(tools.make_options(enable_cache_manager=None, transfer_backend="hixl",
                                   listen_ip_info="127.0.0.1:26000"))
    assert exc.value.status_code == PARAM_INVALID


def test_hixl_backend_needs_listen_ip_info(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    with pytest.raises(LLMException, match="listenIpInfo") as exc:
        dd.init(tools.make_options(transfer_backend="hixl"))
    assert exc.value.status_code == PARAM_INVALID


def test_hixl_backend_needs_remote_cache_accessible(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    with pytest.raises(LLMException, match="EnableRemoteCacheAccessible") as exc:
        dd.init(tools.make_options(transfer_backend="hixl", enable_remote_cache_accessible=False,
                                   listen_ip_info="127.0.0.1:26000"))
    assert exc.value.status_code == PARAM_INVALID


def test_local_comm_res_needs_cache_manager(make_dd, tools):
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    with pytest.raises(LLMException) as exc:
        dd.init(tools.make_options(enable_cache_manager=False, local_comm_res=""))
    assert exc.value.status_code == PARAM_INVALID
    with pytest.raises(RuntimeError, match=NOT_INITIALIZED):
        dd.cache_manager


def test_local_comm_res_implies_cache_manager_and_remote_access(make_dd, new_cache, tools):
    dd = make_dd(LLMRole.PROMPT, 1, enable_cache_manager=None, local_comm_res='{"version": "1.3"}')
    options = tools.make_options(enable_cache_manager=None, local_comm_res='{"version": "1.3"}')
    assert "llm.EnableCacheManager" not in options and "llm.EnableRemoteCacheAccessible" not in options
    cm = dd.cache_manager  # CacheManager mode
    cache, _ = new_cache(cm, 2, (2, 8))
    with pytest.raises(TypeError):  # remote-cache-accessible mode: pull_cache only takes CacheKeyByIdAndIndex
        cm.pull_cache(CacheKey(2, 1), cache)


def test_init_does_not_modify_options(make_dd, free_port, tools):
    # listen info and local_comm_res make init derive llm.ListenIp/ListenPort/Role and the implied flags
    options = tools.make_options(enable_cache_manager=None, listen_ip_info=f"127.0.0.1:{free_port()}",
                                 local_comm_res="")
    before = dict(options)
    dd = make_dd(LLMRole.PROMPT, 1, init=False)
    dd.init(options)
    assert options == before
    assert dd.cache_manager is not None


def test_cluster_id_property(make_dd):
    dd = make_dd(LLMRole.PROMPT, 3)
    assert dd.cluster_id == 3


def test_legacy_members_rejected_in_cache_manager_mode(pd):
    with pytest.raises(LLMException) as exc:
        pd.p.kv_cache_manager
    assert exc.value.status_code == PARAM_INVALID
    for dd, linked_to in ((pd.p, pd.d.cluster_id), (pd.d, pd.p.cluster_id), (pd.p, 4242)):
        with pytest.raises(LLMException, match="check_link_status is not supported") as exc:
            dd.check_link_status(linked_to)  # refused whether the cluster is linked or not
        assert exc.value.status_code == PARAM_INVALID


def test_check_link_status_in_legacy_mode(make_dd, tools):
    p = make_dd(LLMRole.PROMPT, 1, listen=True, enable_cache_manager=False)
    d = make_dd(LLMRole.DECODER, 2, enable_cache_manager=False)
    info = tools.cluster_info(1, make_dd.port(p))
    for dd, other in ((d, 1), (p, 2)):
        with pytest.raises(LLMException) as exc:
            dd.check_link_status(other)
        assert exc.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    assert d.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    assert d.check_link_status(1) is None
    assert wait_until(lambda: _link_status(p, 2) is None)  # the server's side of the same link
    for stranger in (3, 2**64 - 1):
        with pytest.raises(LLMException) as exc:
            d.check_link_status(stranger)
        assert exc.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    for bad in ("1", None, 1.0):
        with pytest.raises(TypeError):
            d.check_link_status(bad)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError):
            d.check_link_status(bad)
    assert d.unlink_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    for dd, other in ((d, 1), (p, 2)):
        assert wait_until(lambda: _link_status(dd, other) == LLMStatusCode.LLM_NOT_YET_LINK)
    d.finalize()
    with pytest.raises(RuntimeError, match=NOT_INITIALIZED):
        d.check_link_status(1)


def _link_status(dd, cluster_id):
    """None when check_link_status passes, else the status it raised."""
    try:
        dd.check_link_status(cluster_id)
    except LLMException as exc:
        return exc.status_code
    return None


# -- rank-table links ------------------------------------------------------------------------------
def test_link_empty_comm_name(pd):
    with pytest.raises(LLMException) as exc:
        pd.p.link("", {3: 0, 2: 1}, "{}")
    assert exc.value.status_code == PARAM_INVALID


def test_link_comm_name_length(make_dd):
    dd = make_dd(LLMRole.PROMPT, 1)
    with pytest.raises(LLMException) as exc:
        dd.link("a" * 128, {1: 0, 99: 1}, _rank_table())
    assert exc.value.status_code == PARAM_INVALID
    comm_id = dd.link("a" * 127, {1: 0, 99: 1}, _rank_table())
    assert isinstance(comm_id, int) and comm_id >= 1
    dd.unlink(comm_id)


def test_link_cluster_rank_info_must_be_dict(pd):
    with pytest.raises(TypeError):
        pd.p.link("link", [3, 2], "{}")
    with pytest.raises(TypeError):
        pd.p.link("link", {"3": 0, 2: 1}, "{}")
    with pytest.raises(TypeError):
        pd.p.link("link", {3: "0", 2: 1}, "{}")


def test_link_cluster_count_and_rank_order(pd):
    for bad in ({1: 0, 2: 1, 3: 2, 4: 3, 5: 4}, {1: 0}, {3: 1, 2: 0}):
        with pytest.raises(LLMException) as exc:
            pd.p.link("link", bad, "{}")
        assert exc.value.status_code == PARAM_INVALID
    with pytest.raises(ValueError):
        pd.p.link("link", {1: 0, 2: -1}, "{}")


def test_link_rank_table_must_be_str(pd):
    with pytest.raises(TypeError):
        pd.p.link("link", {3: 0, 2: 1}, 123)


def test_comm_ids_count_from_one(make_dd):
    dd = make_dd(LLMRole.PROMPT, 1)
    first = dd.link(_comm_name(), {1: 0, 98: 1}, _rank_table())
    second = dd.link(_comm_name(), {1: 0, 99: 1}, _rank_table())
    assert (first, second) == (1, 2)
    dd.unlink(first)
    dd.unlink(second)


def test_query_register_mem_status(make_dd):
    p = make_dd(LLMRole.PROMPT, 1)
    d = make_dd(LLMRole.DECODER, 2)
    lonely = p.link(_comm_name(), {1: 0, 77: 1}, _rank_table())  # that peer never shows up
    assert p.query_register_mem_status(lonely) is RegisterMemStatus.PREPARING
    name, members = _comm_name(), {1: 0, 2: 1}
    p_comm = p.link(name, members, _rank_table())
    d_comm = d.link(name, members, _rank_table())
    assert p.query_register_mem_status(p_comm) in (RegisterMemStatus.PREPARING, RegisterMemStatus.OK)
    assert wait_until(lambda: p.query_register_mem_status(comm_id=p_comm) is RegisterMemStatus.OK
                     and d.query_register_mem_status(d_comm) is RegisterMemStatus.OK)
    assert p.query_register_mem_status(lonely) is RegisterMemStatus.PREPARING
    d.unlink(d_comm)
    p.unlink(p_comm)
    p.unlink(lonely)


def test_unlink_comm_id_type_and_range(pd):
    with pytest.raises(TypeError):
        pd.p.unlink("not_int")
    with pytest.raises(ValueError):
        pd.p.unlink(-1)
    with pytest.raises(TypeError):
        pd.p.query_register_mem_status("1")
    with pytest.raises(ValueError):
        pd.p.query_register_mem_status(2**64)


def test_unknown_comm_id(pd):
    with pytest.raises(LLMException) as exc:
        pd.p.unlink(12345)
    assert exc.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    with pytest.raises(LLMException) as exc:
        pd.p.query_register_mem_status(12345)
    assert exc.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK


# -- one-sided links -------------------------------------------------------------------------------
def test_link_timeout_must_be_positive(pd):
    for call in (pd.d.link_clusters, pd.d.unlink_clusters):
        for timeout in (0, -5):
            with pytest.raises(LLMException) as exc:
                call([pd.info()], timeout)
            assert exc.value.status_code == PARAM_INVALID
    assert pd.linked()


def test_link_clusters_must_be_list_of_cluster_info(pd):
    with pytest.raises(TypeError):
        pd.d.link_clusters("not_list", 5000)
    with pytest.raises(TypeError):
        pd.d.link_clusters([pd.info(), "x"], 5000)
    with pytest.raises(TypeError):
        pd.d.unlink_clusters([1], 5000)
    with pytest.raises(TypeError):
        pd.d.link_clusters(None, 5000)


def test_link_timeout_type_and_range(pd):
    with pytest.raises(ValueError):
        pd.d.link_clusters([pd.info()], 2**31)
    with pytest.raises(TypeError):
        pd.d.link_clusters([pd.info()], 1.0)
    with pytest.raises(ValueError):
        pd.d.unlink_clusters([pd.info()], 2**31)


def test_unlink_force_must_be_bool(pd):
    with pytest.raises(TypeError):
        pd.d.unlink_clusters([pd.info()], 5000, force="not_bool")
    with pytest.raises(TypeError):
        pd.d.unlink_clusters([pd.info()], 5000, force=1)
    assert pd.linked()


def test_link_without_local_ip(make_dd, new_cache, tools):
    # Unlike the official library (see docs/compatibility.md), a cluster without a local ip links (address
    # learned from the socket).
    p = make_dd(LLMRole.PROMPT, 1, listen=True)
    d = make_dd(LLMRole.DECODER, 2)
    info = tools.cluster_info(1, make_dd.port(p), local_ip=None)
    assert info.local_ip_info_list == []
    assert d.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    src, src_arrays = new_cache(p.cache_manager, 2, (2, 8), keys=[CacheKey(1, 5)])
    dst, dst_arrays = new_cache(d.cache_manager, 2, (2, 8), fill="sentinel")
    d.cache_manager.pull_cache(CacheKey(1, 5), dst, 1)
    for s, t in zip(src_arrays, dst_arrays):
        assert (t[1] == s[0]).all() and (t[0] == tools.SENTINEL).all()


def test_local_comm_res_link_without_local_ip(make_dd, tools):
    res = '{"version": "1.3"}'
    p = make_dd(LLMRole.PROMPT, 1, listen=True, enable_cache_manager=None, local_comm_res=res)
    d = make_dd(LLMRole.DECODER, 2, enable_cache_manager=None, local_comm_res=res)
    info = tools.cluster_info(1, make_dd.port(p), local_ip=None)
    assert d.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])


def test_link_without_remote_cluster_id(make_dd, new_cache, tools):
    # Unlike the official library (see docs/compatibility.md), the peer's cluster id is learned from the handshake.
    p = make_dd(LLMRole.PROMPT, 7, listen=True)
    d = make_dd(LLMRole.DECODER, 2)
    info = tools.cluster_info(None, make_dd.port(p))
    assert info.remote_cluster_id is None
    assert d.link_clusters([info], 3000) == (SUCCESS, [SUCCESS])
    src, src_arrays = new_cache(p.cache_manager, 2, (2, 8), keys=[CacheKey(7, 5)])
    dst, dst_arrays = new_cache(d.cache_manager, 2, (2, 8), fill="sentinel")
    d.cache_manager.pull_cache(CacheKey(7, 5), dst, 0)
    assert all((t[0] == s[0]).all() and (t[1] == tools.SENTINEL).all() for s, t in zip(src_arrays, dst_arrays))
    # the learned id also names the link for a second link attempt and for unlink
    known = tools.cluster_info(7, make_dd.port(p))
    assert d.link_clusters([known], 3000) == (LLMStatusCode.LLM_ALREADY_LINK, [LLMStatusCode.LLM_ALREADY_LINK])
    assert d.unlink_clusters([known], 3000) == (SUCCESS, [SUCCESS])


def test_link_clusters_success_shape(pd, make_dd, tools):
    client = make_dd(LLMRole.DECODER, 3)
    ret = client.link_clusters([tools.cluster_info(pd.p.cluster_id, pd.port)], 3000)
    assert ret == (SUCCESS, [SUCCESS])
    assert isinstance(ret, tuple) and type(ret[0]) is LLMStatusCode and isinstance(ret[1], list)
    assert all(type(code) is LLMStatusCode for code in ret[1])


def test_link_twice_returns_already_link(pd):
    ret, rets = pd.d.link_clusters([pd.info()], 3000)
    assert ret == LLMStatusCode.LLM_ALREADY_LINK
    assert rets == [LLMStatusCode.LLM_ALREADY_LINK]
    assert pd.linked()


def test_link_failure_is_returned_not_raised(pd, free_port):
    dead = LLMClusterInfo()
    dead.remote_cluster_id = 77
    dead.append_local_ip_info("127.0.0.1", 0)
    dead.append_remote_ip_info("127.0.0.1", free_port())  # nobody listens there
    started = time.monotonic()
    ret, rets = pd.d.link_clusters([dead], 500)
    assert time.monotonic() - started < NEVER_HANGS_S  # it gives up at its 500 ms timeout, never hangs
    assert ret in (LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_TIMEOUT)
    assert rets == [ret]
    # one good and one bad cluster: the bad one is reported, the good one ("already linked") too
    ret, rets = pd.d.link_clusters([pd.info(), dead], 500)
    assert rets[0] == LLMStatusCode.LLM_ALREADY_LINK
    assert rets[1] in (LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_TIMEOUT)
    assert ret != SUCCESS
    assert pd.linked()


def test_unlink_clusters_then_transfers_fail(make_pair, new_cache, tools):
    pair = make_pair()
    src, _ = new_cache(pair.p_cm, 2, (2, 8))
    dst, _ = new_cache(pair.d_cm, 2, (2, 8))
    pair.d_cm.pull_cache(CacheKeyByIdAndIndex(pair.p.cluster_id, src.cache_id), dst)
    assert pair.d.unlink_clusters([pair.info()], 3000) == (SUCCESS, [SUCCESS])
    with pytest.raises(LLMException) as exc:
        pair.d_cm.pull_cache(CacheKeyByIdAndIndex(pair.p.cluster_id, src.cache_id), dst)
    assert exc.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    # the server side was told: its link is gone too
    back = CacheKeyByIdAndIndex(pair.d.cluster_id, dst.cache_id)
    assert wait_until(lambda: _pull_fails_with(pair.p_cm, back, src) == LLMStatusCode.LLM_NOT_YET_LINK)
    # unlinking again: nothing to unlink
    ret, rets = pair.d.unlink_clusters([pair.info()], 3000)
    assert ret != SUCCESS and rets == [ret]
    # and the pair can link again
    pair.link()
    pair.d_cm.pull_cache(CacheKeyByIdAndIndex(pair.p.cluster_id, src.cache_id), dst)


def test_force_unlink_of_unlinked_cluster(pd, tools):
    stranger = tools.cluster_info(4242, 1)
    assert pd.d.unlink_clusters([stranger], 3000, force=True) == (SUCCESS, [SUCCESS])
    assert pd.linked()


def _listening(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port (asked of the kernel, not the library)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_switch_role_and_start_listening(make_dd, free_port, tools):
    dd = make_dd(LLMRole.PROMPT, 1)
    assert dd.role == LLMRole.PROMPT
    dd.switch_role(LLMRole.DECODER)
    assert dd.role == LLMRole.DECODER
    port = free_port()
    assert not _listening(port)
    dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{port}"})
    assert dd.role == LLMRole.PROMPT and _listening(port)
    client = make_dd(LLMRole.DECODER, 2)
    assert client.link_clusters([tools.cluster_info(1, port)], 3000) == (SUCCESS, [SUCCESS])
    assert client.unlink_clusters([tools.cluster_info(1, port)], 3000) == (SUCCESS, [SUCCESS])
    assert wait_until(lambda: not dd._engine.links.has_links())
    dd.switch_role(LLMRole.DECODER)  # no listen address: it stops listening
    assert dd.role == LLMRole.DECODER and not _listening(port)
    moved = free_port()
    dd.switch_role(LLMRole.MIX, {"llm.listenIpInfo": f"127.0.0.1:{moved}"})
    assert dd.role == LLMRole.MIX and _listening(moved) and not _listening(port)


def test_switch_to_current_role(make_dd):
    dd = make_dd(LLMRole.DECODER, 1)
    for role, options in ((LLMRole.DECODER, None), (LLMRole.DECODER, {}), (LLMRole.MIX, None), (LLMRole.MIX, None)):
        dd.switch_role(role, options)
        assert dd.role == role


def test_switch_role_argument_types(pd):
    with pytest.raises(TypeError):
        pd.p.switch_role("not_a_role")
    with pytest.raises(TypeError):
        pd.p.switch_role(LLMRole.DECODER, "not_dict")
    with pytest.raises(TypeError):
        pd.p.switch_role(None)
    assert pd.linked() and pd.p.role == LLMRole.PROMPT


def test_switch_role_with_links_raises_exist_link(make_pair, free_port):
    pair = make_pair()
    for dd in (pair.d, pair.p):
        with pytest.raises(LLMException) as exc:
            dd.switch_role(LLMRole.MIX)
        assert exc.value.status_code == LLMStatusCode.LLM_EXIST_LINK
    port = free_port()
    with pytest.raises(LLMException) as exc:
        pair.d.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": f"127.0.0.1:{port}"})
    assert exc.value.status_code == LLMStatusCode.LLM_EXIST_LINK
    assert pair.linked() and (pair.d.role, pair.p.role) == (LLMRole.DECODER, LLMRole.PROMPT)  # nothing changed
    assert not _listening(port) and _listening(pair.port)
    # after unlinking, switching works
    assert pair.d.unlink_clusters([pair.info()], 3000) == (SUCCESS, [SUCCESS])
    pair.d.switch_role(LLMRole.MIX)
    assert wait_until(lambda: not pair.p._engine.links.has_links())
    pair.p.switch_role(LLMRole.MIX)
    assert (pair.d.role, pair.p.role) == (LLMRole.MIX, LLMRole.MIX) and not _listening(pair.port)


def test_switch_role_bad_listen_ip_info(make_dd):
    dd = make_dd(LLMRole.DECODER, 1)
    with pytest.raises(LLMException) as exc:
        dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "1.1.1.1"})
    assert exc.value.status_code == PARAM_INVALID
    with pytest.raises(LLMException, match=r"llm\.listenIpInfo .*'port'") as exc:  # not a bare ValueError
        dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:port"})
    assert exc.value.status_code == PARAM_INVALID
    assert dd.role == LLMRole.DECODER  # a refused switch changes nothing
    dd.switch_role(LLMRole.PROMPT)  # still usable
    assert dd.role == LLMRole.PROMPT


def test_legacy_mode_switch_role(make_dd):
    dd = make_dd(LLMRole.DECODER, 1, enable_cache_manager=False)
    with pytest.raises(LLMException) as exc:
        dd.switch_role(LLMRole.DECODER)
    assert exc.value.status_code == PARAM_INVALID
    with pytest.raises(LLMException) as exc:
        dd.switch_role(LLMRole.PROMPT)
    assert exc.value.status_code == PARAM_INVALID
    assert dd.role == LLMRole.DECODER
    with pytest.raises(LLMException) as exc:
        dd.cache_manager
    assert exc.value.status_code == PARAM_INVALID


def test_cache_manager_identity_and_after_finalize(make_dd):
    dd = make_dd(LLMRole.PROMPT, 1)
    cm = dd.cache_manager
    assert dd.cache_manager is cm and dd.cache_manager is cm
    dd.finalize()
    with pytest.raises(RuntimeError, match=NOT_INITIALIZED):
        dd.cache_manager
    dd.finalize()  # idempotent
    # the stale CacheManager raises a clear LLMException instead of touching freed state
    with pytest.raises(LLMException) as exc:
        cm.unregister_cache(1)
    assert exc.value.status_code == LLMStatusCode.LLM_FAILED
