"""A linked peer that answers a request with the wrong kind of message fails the call with LLM_LINK_FAILED.

The peer is a raw client (``wire.RawLink``) that links to a listening decode and answers every request it gets
with ``Ack``: the decode's pulls from it ask for a cache view (normal mode) or the cache table (remote-cache-
accessible mode) and must end in an LLMException with the link-failure code, never in an AttributeError from
reading fields the answer does not have, and nothing may land in the destination.
"""
from __future__ import annotations

import pytest

from llm_datadist import BlocksCacheKey, LLMException, LLMRole, LLMStatusCode
from tests.reliability import local, wire
from tests.reliability.procs import wait_for

PEER, DECODE = 73, 74
NT, NB, BB = 2, 4, 256


@pytest.mark.parametrize("ra", [False, True], ids=["view", "table"])
def test_a_pull_answered_with_the_wrong_message_fails_the_link(make_dd, ra):
    attrs = {"enable_remote_cache_accessible": True} if ra else {}
    dd = make_dd(LLMRole.DECODER, DECODE, listen=True, **attrs)
    peer = wire.RawLink(make_dd.port(dd), PEER, ra=ra)  # answers Ack to everything
    try:
        assert wait_for(lambda: dd._engine.links.has_link_to(PEER), 5.0)
        cache, arrays = local.blocks(dd.cache_manager, NT, NB, BB, remote_accessible=True if ra else None)
        with pytest.raises(LLMException) as failed:
            dd.cache_manager.pull_blocks(BlocksCacheKey(PEER, 0), cache, [0, 1], [2, 3])
        assert failed.value.status_code == LLMStatusCode.LLM_LINK_FAILED, failed.value
        assert local.untouched(arrays)
    finally:
        peer.close()
