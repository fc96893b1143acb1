"""Config errors are LLMException(LLM_PARAM_INVALID) naming the option and the bad value, at the setter or at
``init`` at the latest: listen addresses, raw listen keys, local_comm_res, rank tables, cluster ip infos, V1 ip
infos; wrong *types* stay TypeError as in the official setters; a missing ``enable_cache_manager`` says how to
set it."""
from __future__ import annotations

import json

import pytest

from llm_datadist import LLMClusterInfo, LLMConfig, LLMDataDist, LLMException, LLMRole, LLMStatusCode
from llm_datadist import v1
from llm_datadist.utils.addresses import parse_ip, parse_ip_port, parse_port, rank_table_addresses

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID

BAD_LISTEN = ["127.0.0.1:abc", "127.0.0.1:", ":26000", "1.1.1.1", "300.1.1.1:26000", "localhost:26000",
              "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1: 26000", "1.2.3:26000", "127.0.0.1:26000:1",
              "[::1]:26000", "::1:26000", "127.0.0.1:２６"]


def _param_invalid(exc_info, *fragments: str) -> None:
    assert exc_info.value.status_code == PARAM_INVALID
    for fragment in fragments:
        assert fragment in str(exc_info.value), (fragment, str(exc_info.value))


def _rank_table(*device_ips: str, server_id: str = "127.0.0.1") -> str:
    devices = [{"device_id": str(i), "device_ip": ip, "rank_id": str(i)} for i, ip in enumerate(device_ips)]
    return json.dumps({"version": "1.0", "server_count": "1", "status": "completed",
                       "server_list": [{"server_id": server_id, "device": devices}]})


# ---- the shared parser --------------------------------------------------------------------------
def test_parse_ip_port_accepts_ipv4_and_ports_0_to_65535():
    assert parse_ip_port("opt", "127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_ip_port("opt", "0.0.0.0:65535") == ("0.0.0.0", 65535)
    assert parse_ip_port("opt", "[::1]:26000", allow_ipv6=True) == ("::1", 26000)
    assert parse_ip_port("opt", "10.0.0.2:26000", allow_ipv6=True) == ("10.0.0.2", 26000)


@pytest.mark.parametrize("text", BAD_LISTEN + [None, 26000, b"127.0.0.1:1"])
def test_parse_ip_port_refuses_with_the_option_and_value(text):
    with pytest.raises(LLMException) as exc:
        parse_ip_port("my.option", text)
    _param_invalid(exc, "my.option", repr(text))


@pytest.mark.parametrize("text", ["[::1]", "[::1]:", "[::1]:70000", "[1.2.3.4]:1", "[zz]:1", "[::1]26000"])
def test_parse_ip_port_refuses_bad_bracketed_ipv6(text):
    with pytest.raises(LLMException) as exc:
        parse_ip_port("my.option", text, allow_ipv6=True)
    _param_invalid(exc, "my.option", repr(text))


def test_parse_ip_and_port():
    assert parse_ip("f", "::1") == "::1"
    assert parse_port("f", "0") == 0 and parse_port("f", 65535) == 65535
    for bad_ip, allow_ipv6 in (("::1", False), ("300.1.1.1", True), ("", True), ("host", True), (None, True)):
        with pytest.raises(LLMException) as exc:
            parse_ip("field", bad_ip, allow_ipv6)
        _param_invalid(exc, "field", repr(bad_ip))
    for bad_port in (-1, 65536, "x", "", True, 1.0, None):
        with pytest.raises(LLMException) as exc:
            parse_port("field", bad_port)
        _param_invalid(exc, "field", repr(bad_port))


# ---- LLMConfig setters --------------------------------------------------------------------------
@pytest.mark.parametrize("text", BAD_LISTEN)
def test_listen_ip_info_setter_refuses_bad_addresses(text):
    config = LLMConfig()
    with pytest.raises(LLMException) as exc:
        config.listen_ip_info = text
    _param_invalid(exc, "listen_ip_info", repr(text))
    assert config.listen_ip_info == ""  # nothing was stored


def test_listen_ip_info_setter_keeps_types_and_good_values():
    config = LLMConfig()
    with pytest.raises(TypeError):
        config.listen_ip_info = 26000
    for good in ("127.0.0.1:26000", "0.0.0.0:0", "10.1.2.3:65535", ""):
        config.listen_ip_info = good
        assert config.listen_ip_info == good
    config.listen_ip_info = None
    assert config.listen_ip_info == ""


@pytest.mark.parametrize("text, fragments", [
    ("{not json", ["local_comm_res", "not valid JSON"]),
    ("[1, 2]", ["local_comm_res", "JSON object"]),
    (_rank_table("300.1.1.1"), ["local_comm_res", "device_ip", "'300.1.1.1'"]),
    (_rank_table("host-a"), ["local_comm_res", "device_ip", "'host-a'"]),
    (json.dumps({"server_list": [{"device": [{"device_ip": "1.2.3.4", "rank_id": "x"}]}]}),
     ["local_comm_res", "rank_id", "'x'"]),
    (json.dumps({"server_list": "nope"}), ["local_comm_res", "server_list"]),
])
def test_local_comm_res_setter_refuses_bad_tables(text, fragments):
    config = LLMConfig()
    with pytest.raises(LLMException) as exc:
        config.local_comm_res = text
    _param_invalid(exc, *fragments)


def test_local_comm_res_setter_accepts_what_the_official_accepts():
    config = LLMConfig()
    one_device = json.dumps({"version": "1.2", "server_count": "1", "status": "completed", "server_list": [
        {"server_id": "node-1", "device": [{"device_id": "0", "device_ip": "192.168.1.1"}]}]})
    for good in ("", '{"version": "1.3"}', one_device, _rank_table("127.0.0.1", "::1")):
        config.local_comm_res = good
        assert config.local_comm_res == good
    with pytest.raises(TypeError):
        config.local_comm_res = {}


def test_cluster_info_ip_errors_name_the_method_and_value():
    info = LLMClusterInfo()
    for bad in ("300.1.1.1", "::1", "host"):
        with pytest.raises(LLMException) as exc:
            info.append_remote_ip_info(bad, 26000)
        _param_invalid(exc, "append_remote_ip_info", bad)
        assert isinstance(exc.value, RuntimeError)  # the official type, kept
        with pytest.raises(LLMException) as exc:
            info.append_local_ip_info(bad, 0)
        _param_invalid(exc, "append_local_ip_info", bad)
    for port in (-1, 65536):
        with pytest.raises(ValueError, match=str(port)):  # a port out of range is a ValueError, as official
            info.append_remote_ip_info("127.0.0.1", port)
    assert info.remote_ip_info_list == [] and info.local_ip_info_list == []


def test_legacy_cluster_info_ip_error_names_the_entry():
    config = LLMConfig()
    with pytest.raises(LLMException) as exc:
        config.cluster_info = json.dumps({"cluster_id": 1, "listen_ip_info": [{"ip": "1.2.3.4", "port": 1},
                                                                              {"ip": "1.2.3.400", "port": 2}]})
    _param_invalid(exc, "cluster_info listen_ip_info[1].ip", "1.2.3.400")


# ---- raw option dicts at init -------------------------------------------------------------------
@pytest.mark.parametrize("key, value, fragments", [
    ("llm.listenIpInfo", "127.0.0.1:abc", ["llm.listenIpInfo", "'127.0.0.1:abc'"]),
    ("llm.listenIpInfo", "127.0.0.1:99999", ["llm.listenIpInfo", "'99999'"]),
    ("llm.listenIpInfo", "999.0.0.1:1", ["llm.listenIpInfo", "'999.0.0.1'"]),
    ("llm.ListenPort", "abc", ["llm.ListenPort", "'abc'"]),
    ("llm.ListenIp", "not-an-ip", ["llm.ListenIp", "'not-an-ip'"]),
    ("llm.LocalCommRes", _rank_table("1.2.3.999"), ["llm.LocalCommRes", "device_ip", "'1.2.3.999'"]),
])
def test_init_refuses_bad_raw_address_options(key, value, fragments):
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    with pytest.raises(LLMException) as exc:
        dd.init({"llm.EnableCacheManager": "1", "ge.exec.deviceId": "0", key: value})
    _param_invalid(exc, *fragments)
    with pytest.raises(RuntimeError, match="not initialized"):
        dd.cache_manager  # noqa: B018 - nothing was started
    dd.init({"llm.EnableCacheManager": "1", "ge.exec.deviceId": "0"})  # the instance is still usable
    dd.finalize()


def test_switch_role_refuses_bad_listen_option():
    dd = LLMDataDist(LLMRole.DECODER, 1)
    dd.init({"llm.EnableCacheManager": "1"})
    try:
        with pytest.raises(LLMException) as exc:
            dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:70000"})
        _param_invalid(exc, "llm.listenIpInfo", "70000")
    finally:
        dd.finalize()


# ---- rank tables --------------------------------------------------------------------------------
def test_rank_table_addresses_map_and_check():
    assert rank_table_addresses("rank_table", _rank_table("127.0.0.2", "::1")) == {0: "127.0.0.2", 1: "::1"}
    table = _rank_table("10.0.0.1", "10.0.0.2", server_id="127.0.0.9")
    assert rank_table_addresses("rank_table", table, use_server_id=True) == {0: "127.0.0.9", 1: "127.0.0.9"}
    assert rank_table_addresses("rank_table", "") == {} and rank_table_addresses("rank_table", None) == {}
    with pytest.raises(LLMException) as exc:
        rank_table_addresses("rank_table", _rank_table("10.0.0.1", server_id="node-1"), use_server_id=True)
    _param_invalid(exc, "rank_table", "server_id", "'node-1'")


@pytest.mark.parametrize("table, fragments", [
    (_rank_table("127.0.0.1", "127.0.0.300"), ["rank_table", "rank 1 device_ip", "'127.0.0.300'"]),
    ("{oops", ["rank_table", "not valid JSON"]),
])
def test_link_refuses_bad_rank_tables_before_starting(table, fragments):
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    dd.init({"llm.EnableCacheManager": "1"})
    try:
        with pytest.raises(LLMException) as exc:
            dd.link("bad-table", {1: 0, 2: 1}, table)
        _param_invalid(exc, *fragments)
        with pytest.raises(LLMException) as exc:  # no domain was started: comm ids start at 1
            dd.query_register_mem_status(1)
        assert exc.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        dd.finalize()


# ---- V1 ip infos ---------------------------------------------------------------------------------
def test_v1_link_refuses_bad_ip_infos_by_field():
    dd = v1.LlmDataDist(31, v1.LlmRole.kDecoder)
    assert dd.Initialize({v1.OPTION_DEVICE_ID: "0"}) == LLMStatusCode.LLM_SUCCESS
    try:
        for remote in (v1.IpInfo("::1", 26000), v1.IpInfo("1.2.3.4", 70000), v1.IpInfo("1.2.3.4", "26000"),
                       v1.IpInfo("host", 1)):
            cluster = v1.ClusterInfo(30, 0, [v1.IpInfo("127.0.0.1", 0)], [remote])
            status, rets = dd.LinkLlmClusters([cluster], 1000)
            assert status == LLMStatusCode.LLM_PARAM_INVALID, remote
    finally:
        dd.Finalize()
    with pytest.raises(LLMException) as exc:
        v1.parse_ip_port("127.0.0.1:x")
    _param_invalid(exc, v1.OPTION_LISTEN_IP_INFO, "'127.0.0.1:x'")


# ---- enable_cache_manager -----------------------------------------------------------------------
def test_forgetting_enable_cache_manager_says_how_to_set_it():
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    dd.init(LLMConfig().generate_options())
    try:
        for action in (lambda: dd.cache_manager, lambda: dd.link("c", {1: 0, 2: 1}, _rank_table("127.0.0.1")),
                       lambda: dd.query_register_mem_status(1)):
            with pytest.raises(LLMException) as exc:
                action()
            _param_invalid(exc, "LLMConfig.enable_cache_manager = True", "llm.EnableCacheManager")
    finally:
        dd.finalize()
    config = LLMConfig()
    config.transfer_backend = "hixl"
    config.listen_ip_info = "127.0.0.1:26000"
    with pytest.raises(LLMException) as exc:
        LLMDataDist(LLMRole.PROMPT, 1).init(config.generate_options())
    _param_invalid(exc, "LLMConfig.enable_cache_manager = True", "EnableCacheManager")
