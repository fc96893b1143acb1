"""The optional compiled data path (llm_datadist._transport._fastpath); every other setting is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and the library uses its pure-Python path
(it logs a warning saying so).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("llm_datadist._transport._fastpath", ["src/llm_datadist/_transport/_fastpath.c"],
                             optional=True, extra_compile_args=["-O2", "-std=gnu99", "-Wall"])])
