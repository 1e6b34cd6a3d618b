"""The benchmarks' shared provenance block (benchmarks/_provenance.py), their child-process
runner (benchmarks/_child.py), and the training-epoch and training-step benchmarks at a tiny
size (no Spark)."""
from __future__ import annotations

import importlib.util
import json
import shlex
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


provenance = _load("_provenance")
child = _load("_child")


def _load_benchmark(name: str):
    """A benchmark script as a module (its ``import _provenance`` needs benchmarks/ on sys.path)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return _load(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_run_info_keys_and_types():
    info = provenance.run_info(["benchmarks/features.py", "--rows", "20000"])
    assert set(info) == {"git", "command", "python", "cwd", "utc_time"}
    assert set(info["git"]) == {"commit", "dirty", "dirty_paths"}
    when = datetime.fromisoformat(info["utc_time"])
    assert when.utcoffset() == timezone.utc.utcoffset(None)
    assert abs((datetime.now(timezone.utc) - when).total_seconds()) < 60
    json.dumps(info)  # serialisable as it is


def test_git_state_in_this_repository():
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    except OSError:
        pytest.skip("git is not installed")
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    state = provenance.git_state()
    assert state["commit"] == head.stdout.strip() and len(state["commit"]) == 40
    assert isinstance(state["dirty"], bool)
    assert state["dirty"] == bool(state["dirty_paths"])


def test_git_state_null_outside_a_repository(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None, "dirty_paths": None}


@pytest.mark.parametrize("argv", [
    ["benchmarks/graph.py", "--scale", "1.0", "0.1", "--out", "benchmarks/results/graph.json"],
    ["benchmarks/features.py", "--workdir", "/tmp/a dir with spaces", "--preset", "it's"],
    ["benchmarks/train_throughput.py", "--models", "esmm,cstwa", "--out", "$HOME/x;rm -rf y", ""],
])
def test_command_round_trips_through_shlex(argv):
    command = provenance.command_line(argv)
    assert isinstance(command, str)
    assert shlex.split(command) == argv


def test_machine_info_reports_the_machine():
    import os

    machine = provenance.machine_info(["pytest", "surely-not-an-installed-package"])
    for key in ("hostname", "arch", "os", "cpu_model", "cpu_count", "cpus_usable", "memory_total_gib",
                "gpus", "python", "packages"):
        assert key in machine
    assert machine["cpu_count"] == os.cpu_count()
    assert machine["memory_total_gib"] is None or machine["memory_total_gib"] > 0
    assert machine["packages"]["pytest"] == pytest.__version__
    assert machine["packages"]["surely-not-an-installed-package"] is None
    json.dumps(machine)


def test_cpu_model_reads_proc_cpuinfo():
    path = Path("/proc/cpuinfo")
    if not path.exists():
        pytest.skip("no /proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
             if line.split(":", 1)[0].strip() == "model name"]
    if names:
        assert provenance.cpu_model() == names[0]


def test_train_epoch_benchmark_runs_the_train_command_on_its_synthetic_table(tmp_path):
    """benchmarks/train_epoch.py at a tiny size: the synthetic table is one the loader reads, and
    each setting reports epoch times that agree with the run's own history."""
    import sys

    out = tmp_path / "epoch.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_epoch.py"), "--rows", "6000",
                           "--epochs", "2", "--threads", "1", "--workdir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    settings = [r["setting"] for r in result["rows"]] + [s.split(":")[0] for s in result["skipped"]]
    assert sorted(settings) == ["amp", "fp32"] and result["rows"][0]["setting"] == "fp32"
    for row in result["rows"]:
        assert [e["epoch"] for e in row["epochs"]] == [0, 1]
        assert all(e["samples"] == 6000 and e["epoch_s"] > 0 for e in row["epochs"])
        assert row["best_samples_per_s"] == max(e["samples"] / e["epoch_s"] for e in row["epochs"])
        assert 0 <= row["test"]["ctr_auc"] <= 1
        history = json.loads((tmp_path / "work" / "runs" / row["setting"] / "r0" / "esmm" / "seed1" / "metrics.json")
                              .read_text())["history"]
        assert [h["samples_per_s"] for h in history] == [e["samples_per_s"] for e in row["epochs"]]
    for row in result["rows"]:
        summary = result["summary"][row["setting"]]
        assert summary["repeats"] == 1 and summary["median_best_samples_per_s"] == row["best_samples_per_s"]
    manifest = json.loads((tmp_path / "work" / "data" / "manifest.json").read_text())
    assert len(manifest["fields"]) == 18
    assert "train_epoch.py --rows 6000" in result["provenance"]["command"]


def test_train_throughput_breakdown_accounts_for_the_step(tmp_path):
    """benchmarks/train_throughput.py --breakdown --compile at a tiny size: the parts of a step add
    up to it, the row-wise embedding update is inside the optimiser's share, and the matrix
    products of the model's Linear calls were timed; every setting also ran compiled."""
    import sys

    out = tmp_path / "tp.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--models", "esmm",
                           "--settings", "cpu", "--threads", "1", "--batch-size", "200", "--warmup", "1",
                           "--steps", "4", "--rounds", "2", "--breakdown", "--compile", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(r["model"] == "esmm" and len(r["rounds"]) == 2 for r in rows)
    eager = {r["setting"] for r in rows if not r["compiled"]}
    compiled = {r["setting"] for r in rows if r["compiled"]}
    assert "cpu" in eager and compiled == {f"{name}-compile" for name in eager}
    assert all(r["compile_s"] > 0 for r in rows if r["compiled"])
    for row in rows:
        b = row["breakdown_ms"]
        assert b["step"] == pytest.approx(b["forward_loss"] + b["backward"] + b["optimizer"] + b["hook"])
        assert 0 < b["embedding_rows"] < b["optimizer"]  # ESMM's preset: row-wise lazy Adam
        assert b["gemm_alone"] > 0 and min(b["forward_loss"], b["backward"]) > 0
    assert "ms per step: forward+loss" in done.stdout


def test_linear_shapes_sees_every_linear_call_of_a_forward():
    import torch

    tt = _load_benchmark("train_throughput")
    net = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, batch):
            return self.net(batch["x"])

    batch = {"x": torch.randn(7, 6), "click": torch.zeros(7)}
    assert tt.linear_shapes(Wrap(), batch) == [(7, 6, 4), (7, 4, 1)]
    assert tt.gemm_ms([(7, 6, 4)], torch.float32, reps=2) > 0


def test_run_json_child_takes_the_last_stdout_line():
    import sys

    code = "print('log line'); print(); print('{\"x\": 1}'); print()"
    assert child.run_json_child([sys.executable, "-c", code], "case") == {"x": 1}


@pytest.mark.parametrize("code", ["import sys; print('{}'); sys.exit(3)", "pass"])
def test_run_json_child_fails_on_exit_code_or_no_output(code):
    import sys

    with pytest.raises(RuntimeError, match=r"^case scale=1 failed \(exit (3|0)\): "):
        child.run_json_child([sys.executable, "-c", code], "case scale=1")
