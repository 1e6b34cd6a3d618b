"""Provenance of a benchmark run, shared by the scripts in benchmarks/.

Every results JSON carries two blocks built here:

* ``"provenance"`` (:func:`run_info`): the git commit of the repository the script lives in
  and whether its working tree was dirty (``git status --porcelain`` not empty; the changed
  paths are listed, at most 50), the command line as a shell-pasteable string
  (``shlex.join(sys.argv)``, run from ``cwd`` with ``python``), and the UTC start time. Git
  fields are null where git or the repository is unavailable.
* ``"machine"`` (:func:`machine_info`): host, CPU model (``/proc/cpuinfo`` "model name", else
  ``platform.processor()``), the machine's CPU count (``os.cpu_count()``) and the CPUs this
  process may run on, total memory, OS, Python and the versions of the packages named.

Import it from a script in benchmarks/ as ``import _provenance`` (the script's folder is first
on ``sys.path`` when it runs as ``python benchmarks/<script>.py``).
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
MAX_DIRTY_PATHS = 50


def _git(*args: str, repo: Path = REPO) -> str | None:
    """stdout of ``git -C repo args``; None if git is missing or fails."""
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state(repo: Path = REPO) -> dict[str, Any]:
    """``{"commit", "dirty", "dirty_paths"}`` of ``repo``; all null where git is unavailable."""
    head = _git("rev-parse", "HEAD", repo=repo)
    status = _git("status", "--porcelain", repo=repo) if head is not None else None
    if head is None or status is None:
        return {"commit": None, "dirty": None, "dirty_paths": None}
    paths = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": head.strip(), "dirty": bool(paths), "dirty_paths": paths[:MAX_DIRTY_PATHS]}


def command_line(argv: Sequence[str] | None = None) -> str:
    """``argv`` (default ``sys.argv``) quoted so that it can be pasted into a POSIX shell."""
    return shlex.join(list(sys.argv if argv is None else argv))


def run_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The ``"provenance"`` block: git state, command line, interpreter, cwd, UTC time."""
    return {
        "git": git_state(),
        "command": command_line(argv),
        "python": sys.executable,
        "cwd": os.getcwd(),
        "utc_time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``, else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or None


def memory_total_gib() -> float | None:
    """Total physical memory in GiB (/proc/meminfo MemTotal, else sysconf), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / 2**30, 1)  # the value is in kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def package_versions(names: Iterable[str]) -> dict[str, str | None]:
    """Versions of the distributions named: the module's ``__version__`` where it is already
    imported under the same name (it carries local tags such as torch's ``+cu132``), else the
    installed distribution's (nothing is imported here); None where it is not installed."""
    out = {}
    for name in names:
        module = sys.modules.get(name.replace("-", "_"))
        version = getattr(module, "__version__", None)
        if isinstance(version, str):
            out[name] = version
            continue
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _gpus() -> list[str] | None:
    """CUDA device names if torch is already imported (not imported here: it is slow), else None."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # a broken CUDA setup must not lose the benchmark's results
        return None


def write_result(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a benchmark's results as indented JSON to ``path``, creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2))


def machine_info(packages: Iterable[str] = ()) -> dict[str, Any]:
    """The ``"machine"`` block: the machine itself, not a Spark or thread setting."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "hostname": platform.node(),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "memory_total_gib": memory_total_gib(),
        "gpus": _gpus(),
        "python": platform.python_version(),
        "packages": package_versions(packages),
    }
