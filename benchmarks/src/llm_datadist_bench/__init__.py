"""llm-datadist-bench: the benchmark of llm_datadist, a distribution of its own (``pip install -e ./benchmarks``,
or the core's ``bench`` extra from a checkout). ``llm-datadist bench ...`` runs ``llm_datadist_bench.cli.main``;
so do ``llm-datadist-bench ...`` and ``python -m llm_datadist_bench ...``.

What it uses of llm_datadist: the public API (``LLMDataDist``, ``CacheManager``, ...), the command-line helpers
``llm_datadist.cli.progress``, ``ipc``, ``instance`` and ``netns`` (the simulated hosts, which the core's chaos
soak and multi-host tests use too), and ``llm_datadist._engine.diagnostics`` (the engine's probes of this machine,
the one private module it may import; ``tests/cli/test_bench_layering.py`` checks this).
"""
