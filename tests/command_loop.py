"""The loop of the tests' helper processes: one JSON command per stdin line, one JSON reply per line.

``serve(commands, write)`` runs ``commands[op](**args)`` for each line ``{"op": op, **args}`` and writes
``{"ok": true, **result}``, or ``{"ok": false, "error": ..., "traceback": ...}`` when it raised (the test fails
with it); it returns at ``{"op": "quit"}`` (answered ``{"ok": true}``) or at the end of stdin.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from typing import IO, Any, Callable, Dict


def serve(commands: Dict[str, Callable[..., Dict[str, Any]]], write: Callable[[str], Any]) -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        op = command.pop("op")
        if op == "quit":
            write(json.dumps({"ok": True}) + "\n")
            return
        try:
            reply = {"ok": True, **commands[op](**command)}
        except Exception as exc:  # noqa: BLE001 - reported to the test, which fails with it
            reply = {"ok": False, "error": repr(exc), "traceback": traceback.format_exc()}
        write(json.dumps(reply) + "\n")


def run(commands: Dict[str, Callable[..., Dict[str, Any]]], replies: IO[str], finish: Callable[[], Any]) -> None:
    """:func:`serve` into ``replies``, then ``finish()``, then leave at once (no interpreter teardown: threads of
    the code under test may still run)."""
    serve(commands, replies.write)
    finish()
    replies.flush()
    os._exit(0)
