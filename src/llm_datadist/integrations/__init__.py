"""Integrations of llm_datadist into serving engines; each one imports its engine lazily (``integrations.vllm``)."""
