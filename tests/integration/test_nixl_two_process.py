"""The engine over nixl between real processes: every side forced to ``transfer_backend="nixl"``, bytes checked.

The two-process, layer-wise and link tests of the default routes run again here with LLM_DATADIST_TRANSPORT=nixl
in this process and in every peer it starts; the tests below add what only nixl has to show.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from llm_datadist import BlocksCacheKey, LLMStatusCode
from llm_datadist._transport import unavailable_reason
from subsystems import skip_if_missing
from tests.integration.conftest import free_port
from tests.integration.test_layerwise_two_process import (  # noqa: F401 - collected here again, over nixl
    test_layer_k_arrives_only_after_release_and_bytes_are_exact as test_layerwise_push_over_nixl,
    test_synchronizer_failure_stops_the_push as test_layerwise_failure_over_nixl,
)
from tests.integration.test_link_lifecycle import (  # noqa: F401
    test_peer_crash_drops_the_link_on_both_link_styles as test_peer_crash_over_nixl,
    test_self_link_pulls_and_pushes_own_caches as test_self_link_over_nixl,
)
from tests.integration.test_two_process import (  # noqa: F401
    cluster,
    expected_blocks,
    local_blocks,
    local_dd,
    prefill,
    test_blocks_view_refreshes_when_owner_reregisters as test_stale_view_refreshes_over_nixl,
    test_concurrent_pulls_from_32_threads_two_peers as test_concurrent_pulls_over_nixl,
    test_link_clusters_pull_blocks_scattered as test_pull_blocks_over_nixl,
    test_pull_blocks_from_continuous_slot as test_pull_blocks_from_slot_over_nixl,
    test_pull_cache_by_key_consumes_on_owner as test_pull_cache_over_nixl,
    test_rank_table_link_both_sides as test_rank_table_link_over_nixl,
    test_remote_accessible_mode_push_and_pull as test_push_and_pull_over_nixl,
    test_server_pulls_from_client_without_any_call_on_client as test_server_pulls_over_nixl,
)

REASON = unavailable_reason("nixl")
pytestmark = skip_if_missing("nixl", REASON)


@pytest.fixture(autouse=True)
def _over_nixl(monkeypatch):
    """This process and every peer it spawns use only the nixl transport."""
    monkeypatch.setenv("LLM_DATADIST_TRANSPORT", "nixl")


def test_the_link_routes_over_nixl_and_pulls_exact_bytes(prefill, caplog):  # noqa: F811
    caplog.set_level(logging.INFO, logger="llm_datadist")
    dd = local_dd(24, sync_kv_timeout=5000)
    try:
        cache, arrays = local_blocks(dd)
        assert dd.link_clusters([cluster(11, prefill.port)], 5000)[0] == LLMStatusCode.LLM_SUCCESS
        dd.cache_manager.pull_blocks(BlocksCacheKey(11, 0), cache, [1, 14, 3], [0, 5, 15])
        for t, array in enumerate(arrays):
            assert np.array_equal(array[[0, 5, 15]], expected_blocks(5)[t][[1, 14, 3]])
        routes = [r.getMessage() for r in caplog.records if "routes over" in r.getMessage()]
        assert routes and all("routes over nixl" in line for line in routes), routes
    finally:
        dd.finalize()


def test_unavailable_nixl_is_refused_at_init_when_forced(monkeypatch):
    """An explicitly requested backend that cannot run fails init with LLM_FEATURE_NOT_ENABLED and the reason."""
    from llm_datadist import LLMException
    from llm_datadist._transport import nixl_env

    monkeypatch.setattr(nixl_env.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LLMException) as err:
        local_dd(25, listen_ip_info=f"127.0.0.1:{free_port()}")
    assert err.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    assert "nixl" in str(err.value)
