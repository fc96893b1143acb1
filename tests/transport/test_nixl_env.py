"""Where nixl ranks in auto mode and what UCX is told, decided from the machine's RDMA devices and GPUs."""
from __future__ import annotations

import os

import pytest

from llm_datadist._transport import cross_host_reason, nixl_env, transport_class, unavailable_reason


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake /sys/class/infiniband and NVIDIA driver directory; ``machine(rdma=[...], gpus=n)`` fills them."""
    rdma, gpus = tmp_path / "infiniband", tmp_path / "gpus"

    def make(rdma_devices=(), gpu_count=0):
        for path, names in ((rdma, rdma_devices), (gpus, [f"0000:0{i}:00.0" for i in range(gpu_count)])):
            path.mkdir(exist_ok=True)
            for name in names:
                (path / name).mkdir()
        monkeypatch.setattr(nixl_env, "RDMA_CLASS_DIR", str(rdma))
        monkeypatch.setattr(nixl_env, "NVIDIA_PROC", str(gpus))

    return make


def test_without_rdma_or_gpu_tcp_ranks_first_and_ucx_is_limited_to_tcp(machine):
    machine()
    assert nixl_env.preferred_reason() == ""
    assert nixl_env.rank_reason().startswith("tcp is preferred over nixl")
    defaults = nixl_env.ucx_defaults()
    assert defaults["UCX_TLS"] == "tcp,self" and defaults["UCX_MODULES"] == "cma"


def test_rdma_devices_make_nixl_preferred_and_leave_ucx_its_own_choice(machine):
    machine(rdma_devices=["mlx5_0", "mlx5_1"])
    assert nixl_env.rdma_devices() == ["mlx5_0", "mlx5_1"]
    assert "mlx5_0, mlx5_1" in nixl_env.preferred_reason()
    assert "UCX_TLS" not in nixl_env.ucx_defaults() and "UCX_MODULES" not in nixl_env.ucx_defaults()


def test_a_gpu_without_rdma_makes_nixl_preferred_with_cuda_transports(machine):
    machine(gpu_count=1)
    assert "GPU" in nixl_env.preferred_reason()
    defaults = nixl_env.ucx_defaults()
    assert "cuda_copy" in defaults["UCX_TLS"] and "cuda" in defaults["UCX_MODULES"].split(",")


def test_the_user_s_ucx_settings_win(machine, monkeypatch):
    machine()
    for key in ("UCX_MODULES", "UCX_LOG_LEVEL", "NIXL_LOG_LEVEL", "UCX_NET_DEVICES"):
        monkeypatch.delenv(key, raising=False)  # restored (removed) after the test
    monkeypatch.setenv("UCX_TLS", "rc,ud,self")
    applied = nixl_env.apply_ucx_defaults()
    assert applied["UCX_TLS"] == "rc,ud,self" and os.environ["UCX_TLS"] == "rc,ud,self"
    assert applied["UCX_MODULES"] == "cma"


def test_unavailable_reason_is_cheap_and_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(nixl_env.importlib.util, "find_spec", lambda name: None)
    reason = nixl_env.unavailable_reason()
    assert "not installed" in reason or "Python 3.10" in reason


def test_cross_host_reason_only_where_auto_mode_chose(machine):
    machine()
    assert cross_host_reason("nixl", ["nixl"]) == ""  # forced: nothing was chosen
    assert cross_host_reason("process_vm", ["process_vm", "tcp"]) == ""
    tcp = cross_host_reason("tcp", ["loopback", "tcp"])
    assert tcp == ("nixl is not available here" if unavailable_reason("nixl") else nixl_env.rank_reason())


def test_nixl_declares_host_and_cuda_memory_and_one_sided_async_network_reach():
    cls = transport_class("nixl")
    assert cls.caps.memory_kinds == {"host", "cuda"} and cls.caps.one_sided and cls.caps.asynchronous
    assert cls.caps.locality == "network"
    assert (cls.priority > transport_class("tcp").priority) == cls.in_auto
    assert cls.priority < transport_class("process_vm").priority  # same-host routes stay in front
