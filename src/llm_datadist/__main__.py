"""``python -m llm_datadist``: the ``llm-datadist`` command line."""
from __future__ import annotations

import sys

from llm_datadist.cli.main import main

if __name__ == "__main__":  # the guard matters: spawned demo processes re-import this module as __mp_main__
    sys.exit(main())
