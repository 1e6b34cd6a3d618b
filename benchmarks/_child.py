"""Running one benchmark case in a fresh interpreter, shared by the scripts in benchmarks/.

A case that must not inherit an earlier case's state (its peak RSS, a JVM that has already
compiled the job's code) runs as ``python <script> <case arguments>`` and prints its figures
as one JSON line, last on its stdout; its stderr (logs) passes through. Import it from a
script in benchmarks/ as ``import _child``.
"""
from __future__ import annotations

import json
import subprocess
import sys
from typing import Optional


def run_json_child(cmd: list[str], what: str, env: Optional[dict[str, str]] = None) -> dict:
    """Run ``cmd`` and return the last non-empty line of its stdout, parsed as JSON.

    Raises:
        RuntimeError: the child exited non-zero or printed nothing (its stdout is echoed
            first); the message names ``what`` and the command.
    """
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        sys.stdout.write(proc.stdout)
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads(lines[-1])
