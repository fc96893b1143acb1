"""LLMRole, LLMConfig and LLMClusterInfo: validation, generated options and the setters real clients use."""
from __future__ import annotations

import json

import pytest

from llm_datadist import LLMClusterInfo, LLMConfig, LLMException, LlmConfig, LLMRole, LLMStatusCode
from llm_datadist.configs import int_to_ip, ip_to_int, role_option_value

PARAM_INVALID = LLMStatusCode.LLM_PARAM_INVALID


def _raises_param_invalid(func):
    with pytest.raises(LLMException) as info:
        func()
    assert info.value.status_code == PARAM_INVALID
    return info.value


def _set(cfg, name, value):
    return lambda: setattr(cfg, name, value)


def test_llm_role():
    assert LLMRole.PROMPT == 1 and LLMRole.DECODER == 2 and LLMRole.MIX == 3
    assert str(LLMRole.PROMPT) == "LLMRole.PROMPT"
    assert f"{LLMRole.DECODER}" == "LLMRole.DECODER"
    assert [role_option_value(r) for r in LLMRole] == ["Prompt", "Decoder", "Mix"]


def test_default_options():
    assert LLMConfig().generate_options() == {"llm.MemoryUtilization": "0.95"}


def test_device_id_int():
    cfg = LLMConfig()
    cfg.device_id = 0
    options = cfg.generate_options()
    assert options["ge.exec.deviceId"] == "0"
    assert options["ge.session_device_id"] == "0"


def test_device_id_list():
    cfg = LLMConfig()
    cfg.device_id = [0, 1]
    options = cfg.generate_options()
    assert options["ge.exec.deviceId"] == "0;1"
    assert options["ge.session_device_id"] == "0"


def test_device_id_tuple():
    cfg = LLMConfig()
    cfg.device_id = (3, 4)
    assert cfg.device_id == (3, 4)
    assert cfg.generate_options()["ge.exec.deviceId"] == "3;4"


def test_device_id_negative():
    _raises_param_invalid(_set(LLMConfig(), "device_id", -1))
    _raises_param_invalid(_set(LLMConfig(), "device_id", [0, -1]))


def test_device_id_type_and_range():
    cfg = LLMConfig()
    with pytest.raises(ValueError):
        cfg.device_id = 2**31
    with pytest.raises(TypeError):
        cfg.device_id = "0"
    with pytest.raises(TypeError):
        cfg.device_id = [0, "1"]
    with pytest.raises(TypeError):
        cfg.device_id = None
    assert cfg.device_id is None


def test_sync_kv_timeout_non_digit_string():
    for value in ("abc", "-5", "1.5", ""):
        _raises_param_invalid(_set(LLMConfig(), "sync_kv_timeout", value))


def test_sync_kv_timeout_not_positive():
    for value in (0, "0", -5):
        _raises_param_invalid(_set(LLMConfig(), "sync_kv_timeout", value))


def test_sync_kv_timeout_range_and_type():
    with pytest.raises(ValueError):
        LLMConfig().sync_kv_timeout = 2**31
    with pytest.raises(TypeError):
        LLMConfig().sync_kv_timeout = 1.5


def test_sync_kv_timeout_emitted():
    cfg = LLMConfig()
    assert "llm.SyncKvCacheWaitTime" not in cfg.generate_options()
    cfg.sync_kv_timeout = "3000"
    assert cfg.generate_options()["llm.SyncKvCacheWaitTime"] == "3000"
    cfg.sync_kv_timeout = 1500
    assert cfg.sync_kv_timeout == 1500
    assert cfg.generate_options()["llm.SyncKvCacheWaitTime"] == "1500"


def test_enable_cache_manager_requires_bool():
    with pytest.raises(TypeError):
        LLMConfig().enable_cache_manager = 1


@pytest.mark.parametrize(
    "name, key, item",
    [
        ("enable_cache_manager", "llm.EnableCacheManager", 29),
        ("enable_remote_cache_accessible", "llm.EnableRemoteCacheAccessible", 30),
    ],
)
def test_bool_options_emitted_when_set(name, key, item):
    cfg = LLMConfig()
    assert getattr(cfg, name) is False
    assert key not in cfg.generate_options()
    setattr(cfg, name, False)
    assert cfg.generate_options()[key] == "0"
    setattr(cfg, name, True)
    assert getattr(cfg, name) is True
    assert cfg.generate_options()[key] == "1"


def test_listen_ip_info_key():
    cfg = LLMConfig()
    cfg.listen_ip_info = "1.1.1.1:26000"
    assert cfg.generate_options()["llm.listenIpInfo"] == "1.1.1.1:26000"
    assert "llm.ListenIpInfo" not in cfg.generate_options()


def test_listen_ip_info_type():
    with pytest.raises(TypeError):
        LLMConfig().listen_ip_info = 1


def test_mem_pool_cfg():
    cfg = LLMConfig()
    with pytest.raises(TypeError):
        cfg.mem_pool_cfg = {}
    pool = '{"memory_size": 1024, "page_shift": 16}'
    cfg.mem_pool_cfg = pool
    assert cfg.generate_options()["llm.MemPoolConfig"] == pool


def test_host_mem_pool_cfg():
    cfg = LLMConfig()
    cfg.host_mem_pool_cfg = '{"memory_size": 4096}'
    assert cfg.generate_options()["llm.HostMemPoolConfig"] == '{"memory_size": 4096}'


def test_rdma_traffic_class():
    cfg = LLMConfig()
    for bad in (-1, 2**32):
        with pytest.raises(ValueError):
            cfg.rdma_traffic_class = bad
    with pytest.raises(TypeError):
        cfg.rdma_traffic_class = None
    cfg.rdma_traffic_class = 300
    assert cfg.generate_options()["llm.RdmaTrafficClass"] == "300"


def test_rdma_service_level():
    cfg = LLMConfig()
    cfg.rdma_service_level = 100
    assert cfg.rdma_service_level == 100
    assert cfg.generate_options()["llm.RdmaServiceLevel"] == "100"


def test_local_comm_res():
    cfg = LLMConfig()
    assert cfg.local_comm_res == ""
    assert "llm.LocalCommRes" not in cfg.generate_options()
    cfg.local_comm_res = ""
    assert cfg.generate_options()["llm.LocalCommRes"] == ""
    with pytest.raises(TypeError):
        cfg.local_comm_res = {}


def test_link_total_time():
    cfg = LLMConfig()
    assert cfg.link_total_time == 0
    assert "llm.LinkTotalTime" not in cfg.generate_options()
    for bad in (-1, 2**32):
        _raises_param_invalid(_set(cfg, "link_total_time", bad))
    with pytest.raises(TypeError):
        cfg.link_total_time = "5"
    cfg.link_total_time = 0
    assert cfg.generate_options()["llm.LinkTotalTime"] == "0"


def test_link_retry_count():
    cfg = LLMConfig()
    assert cfg.link_retry_count == 1
    for bad in (0, 101):
        _raises_param_invalid(_set(cfg, "link_retry_count", bad))
    cfg.link_retry_count = 100
    assert cfg.generate_options()["llm.LinkRetryCount"] == "100"


def test_ge_options():
    cfg = LLMConfig()
    assert cfg.ge_options == {}
    with pytest.raises(TypeError):
        cfg.ge_options = {"a": 1}
    with pytest.raises(TypeError):
        cfg.ge_options = {1: "a"}
    with pytest.raises(TypeError):
        cfg.ge_options = [("a", "b")]
    cfg.ge_options = {"ge.flowGraphMemMaxSize": "1024", "llm.Custom": "x"}
    options = cfg.generate_options()
    assert options["ge.flowGraphMemMaxSize"] == "1024"
    assert options["llm.Custom"] == "x"


def test_mem_utilization():
    cfg = LLMConfig()
    assert cfg.mem_utilization == 0.95
    with pytest.raises(LLMException):
        cfg.mem_utilization = 1.5
    with pytest.raises(TypeError):
        cfg.mem_utilization = 1
    for ok in (0.0, 0.5, 1.0):
        cfg.mem_utilization = ok
        assert cfg.generate_options()["llm.MemoryUtilization"] == str(ok)


def test_global_resource_config():
    cfg = LLMConfig()
    for bad in (123, {}, []):
        with pytest.raises(TypeError):
            cfg.global_resource_config = bad
    assert "llm.GlobalResourceConfig" not in cfg.generate_options()
    cfg.global_resource_config = ""
    assert cfg.generate_options()["llm.GlobalResourceConfig"] == ""


def test_transfer_backend():
    cfg = LLMConfig()
    assert cfg.transfer_backend == ""
    cfg.transfer_backend = "hixl"
    assert cfg.generate_options()["llm.TransferBackend"] == "hixl"


def test_generate_options_same_dict():
    cfg = LLMConfig()
    first = cfg.generate_options()
    second = cfg.generate_options()
    assert first is second
    assert cfg.gen_options() is first
    assert cfg.options is first
    first["llm.UserKey"] = "kept"
    assert cfg.generate_options()["llm.UserKey"] == "kept"


def test_legacy_options():
    cfg = LLMConfig()
    cfg.deploy_res_path = "/tmp/res"
    cfg.buf_pool_cfg = "cfg"
    cfg.output_max_size = 1024
    cfg.enable_switch_role = False
    options = cfg.generate_options()
    assert options["llm.deployResPath"] == "/tmp/res"
    assert options["llm.BufPoolCfg"] == "cfg"
    assert options["llm.OutputMaxSize"] == "1024"
    assert "llm.EnableSwitchRole" not in options
    cfg.enable_switch_role = True
    assert cfg.generate_options()["llm.EnableSwitchRole"] == "1"
    with pytest.raises(TypeError):
        cfg.enable_switch_role = 1
    with pytest.raises(TypeError):
        cfg.output_max_size = "1"


def test_cluster_info_ips_converted_to_little_endian_ints():
    cfg = LLMConfig()
    raw = json.dumps({"cluster_id": 1, "listen_ip_info": [{"ip": "1.2.3.4", "port": 26000}]})
    cfg.cluster_info = raw
    assert cfg.cluster_info == raw
    emitted = json.loads(cfg.generate_options()["llm.ClusterInfo"])
    assert emitted["listen_ip_info"][0] == {"ip": 67305985, "port": 26000}
    _raises_param_invalid(_set(cfg, "cluster_info", "{not json"))


def test_processing_order_ge_options_first():
    cfg = LLMConfig()
    cfg.ge_options = {"ge.exec.deviceId": "7", "llm.MemoryUtilization": "0.1"}
    cfg.device_id = 1
    options = cfg.generate_options()
    assert options["ge.exec.deviceId"] == "1"
    assert options["llm.MemoryUtilization"] == "0.95"
    assert list(options)[0] == "ge.exec.deviceId"


def test_link_secret_option():
    cfg = LLMConfig()
    assert cfg.link_secret == ""
    assert "llm.LinkSecret" not in cfg.generate_options()
    cfg.link_secret = "s3cret"
    assert cfg.link_secret == "s3cret"
    assert cfg.generate_options()["llm.LinkSecret"] == "s3cret"
    with pytest.raises(TypeError):
        cfg.link_secret = b"bytes"


def test_property_setters_and_keys():
    assert LLMConfig is LlmConfig
    cfg = LLMConfig()
    cfg.device_id = 0
    cfg.sync_kv_timeout = 5000
    cfg.enable_switch_role = True
    cfg.enable_cache_manager = True
    cfg.enable_remote_cache_accessible = True
    cfg.listen_ip_info = "127.0.0.1:26000"
    cfg.local_comm_res = ""
    cfg.transfer_backend = "hixl"
    cfg.link_total_time = 10
    cfg.link_retry_count = 3
    cfg.mem_pool_cfg = '{"memory_size": 1048576}'
    cfg.buf_pool_cfg = "x"
    cfg.rdma_traffic_class = 132
    cfg.rdma_service_level = 4
    live = cfg.ge_options
    live["ge.someOption"] = "1"  # the HIXL PR writes into the live dict
    options = cfg.generate_options()
    assert type(options) is dict
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in options.items())
    expected = {
        "ge.exec.deviceId": "0", "llm.SyncKvCacheWaitTime": "5000", "llm.EnableCacheManager": "1",
        "llm.EnableRemoteCacheAccessible": "1", "llm.listenIpInfo": "127.0.0.1:26000", "llm.LocalCommRes": "",
        "llm.TransferBackend": "hixl", "llm.LinkTotalTime": "10", "llm.LinkRetryCount": "3",
        "llm.MemPoolConfig": '{"memory_size": 1048576}', "llm.RdmaTrafficClass": "132",
        "llm.RdmaServiceLevel": "4", "ge.someOption": "1", "llm.EnableSwitchRole": "1", "llm.BufPoolCfg": "x",
    }
    for key, value in expected.items():
        assert options[key] == value, key
    assert cfg.ge_options is live


def test_none_resets_string_and_bool_options():
    cfg = LLMConfig()
    cfg.listen_ip_info = None
    assert cfg.listen_ip_info == ""
    cfg.enable_cache_manager = None
    assert cfg.enable_cache_manager is False
    assert "llm.EnableCacheManager" not in cfg.generate_options()


# ---- LLMClusterInfo ----------------------------------------------------------------------------
def test_new_cluster_info():
    info = LLMClusterInfo()
    assert info.remote_cluster_id is None
    assert info.remote_role_type is None
    assert info.local_ip_info_list == []
    assert info.remote_ip_info_list == []


def test_local_ip_little_endian():
    info = LLMClusterInfo()
    info.append_local_ip_info("1.2.3.4", 26000)
    assert info.local_ip_info_list == [(67305985, 26000)]
    info.append_local_ip_info(67305985, 0)
    assert info.local_ip_info_list[1] == (67305985, 0)
    assert ip_to_int("1.2.3.4") == 0x04030201
    assert int_to_ip(0x04030201) == "1.2.3.4"


def test_unparseable_ip():
    info = LLMClusterInfo()
    for ip in ("300.1.1.1", "::1"):
        with pytest.raises(RuntimeError, match="Can not parse ip str"):
            info.append_remote_ip_info(ip, 1)
    assert info.remote_ip_info_list == []


def test_port_and_ip_types():
    info = LLMClusterInfo()
    for port in (65536, -1):
        with pytest.raises(ValueError):
            info.append_remote_ip_info("1.1.1.1", port)
    with pytest.raises(TypeError):
        info.append_remote_ip_info("1.1.1.1", "1")
    with pytest.raises(TypeError):
        info.append_remote_ip_info(1.0, 1)
    info.append_remote_ip_info("10.0.0.2", 26000)
    assert info.remote_ip_info_list == [(ip_to_int("10.0.0.2"), 26000)]


def test_remote_cluster_id():
    info = LLMClusterInfo()
    with pytest.raises(ValueError):
        info.remote_cluster_id = -1
    with pytest.raises(TypeError):
        info.remote_cluster_id = None
    info.remote_cluster_id = 2**64 - 1
    assert info.remote_cluster_id == 2**64 - 1


def test_remote_role_type_setter():
    info = LLMClusterInfo()
    info.remote_role_type = LLMRole.PROMPT
    assert info.remote_role_type is LLMRole.PROMPT
    info.remote_role_type = 2
    info.remote_role_type = None
    with pytest.raises(TypeError):
        info.remote_role_type = "PROMPT"
