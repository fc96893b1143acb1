"""``python -m llm_datadist_bench``: the same as ``llm-datadist bench``."""
from __future__ import annotations

import sys

from llm_datadist_bench.cli import main

if __name__ == "__main__":  # spawned bench processes re-import this module as __mp_main__
    sys.exit(main())
