"""The core's optional dependencies (everything else is in pyproject.toml).

They are here, not in pyproject.toml, for one reason: the benchmark is a separate distribution in ./benchmarks
(llm-datadist-bench), and the ``bench`` and ``test`` extras install it from there. pip cannot resolve a relative
path in a package's requirements, so this names the folder of this checkout by its absolute file URL when the
core is built from a checkout. Built without that folder (from an sdist) the extras name ``llm-datadist-bench``
plainly; an index refuses direct references, so a wheel meant for one is built from the sdist.
"""
import pathlib

from setuptools import setup

BENCH = pathlib.Path(__file__).resolve().parent / "benchmarks"


def bench(extras: str = "") -> str:
    """The requirement on the benchmark distribution (``extras`` like ``[plot]``)."""
    if (BENCH / "pyproject.toml").is_file():
        return f"llm-datadist-bench{extras} @ {BENCH.as_uri()}"
    return f"llm-datadist-bench{extras}"


setup(extras_require={
    "torch": ["torch>=2.0"],
    # the transport drives NIXL 1.5's bindings; CPU-only: pip install --no-deps nixl nixl-cu12
    "nixl": ["nixl>=1.5,<1.6"],
    "vllm": ["vllm>=0.32"],
    "bench": [bench("[plot]")],  # the benchmark (llm-datadist bench) and matplotlib for its plot
    "test": ["pytest>=7.0", "pytest-timeout>=2.1", bench()],  # the bench's tests run with the suite
})
