"""Init options of the v2 facade: the option keys and checks, as the engine parses them (re-exported)."""
from __future__ import annotations

from llm_datadist._engine.api import options as _options

OPT_LISTEN_IP_INFO = _options.OPT_LISTEN_IP_INFO
ENABLE_CACHE_MANAGER_HINT = _options.ENABLE_CACHE_MANAGER_HINT
parse_listen_ip_info = _options.parse_listen_ip_info
complete_options = _options.complete_options
check_flow_graph_mem = _options.check_flow_graph_mem
parse_options = _options.parse_options

__all__ = ["OPT_LISTEN_IP_INFO", "ENABLE_CACHE_MANAGER_HINT", "parse_listen_ip_info", "complete_options",
           "check_flow_graph_mem", "parse_options"]
