"""The ``llm-datadist`` command line (``demo``, ``bench``, ``doctor``, ``version``); entry point ``cli.main:main``."""
