"""Databricks notebooks: source format, valid Python, thin, and every library name they use exists.

Each ``cvr_spark`` name a notebook imports (``from cvr_spark.x import y`` or ``import cvr_spark.x``
attribute chains) is imported and looked up; calls of those names are bound against the real
signatures; widget reads refer to declared widgets and every declared widget is read.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
STAGES = {"simulate", "features", "graph", "train", "evaluate", "score", "end_to_end"}
HEADER = "# Databricks notebook source"
SEPARATOR = "# COMMAND ----------"


def test_one_notebook_per_stage():
    assert {p.stem for p in NOTEBOOKS.glob("*.py")} == STAGES


def _library_names(tree: ast.Module) -> dict[str, object]:
    """Local name -> library object, for every ``cvr_spark`` import (raises if one is missing)."""
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "cvr_spark":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert not alias.name.startswith("_"), f"private name {node.module}.{alias.name}"
                assert hasattr(module, alias.name), f"{node.module} has no attribute {alias.name}"
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "cvr_spark":
                    module = importlib.import_module(alias.name)
                    names[alias.asname or "cvr_spark"] = module if alias.asname else importlib.import_module("cvr_spark")
    return names


def _resolve(node: ast.expr, names: dict[str, object]):
    """The library object an expression (``name`` or ``name.attr...``) refers to, else None."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is None or not inspect.ismodule(base):
            return None
        assert not node.attr.startswith("_"), f"private name {base.__name__}.{node.attr}"
        assert hasattr(base, node.attr) or importlib.util.find_spec(f"{base.__name__}.{node.attr}"), (
            f"{base.__name__} has no attribute {node.attr}")
        if not hasattr(base, node.attr):
            importlib.import_module(f"{base.__name__}.{node.attr}")
        return getattr(base, node.attr)
    return None


def _widget_calls(tree: ast.Module, kind: str) -> list[ast.Call]:
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == kind
                and ast.unparse(node.func.value) == "dbutils.widgets"):
            out.append(node)
    return out


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.py")), ids=lambda p: p.stem)
def test_notebook_format_and_library_calls(path: Path):
    text = path.read_text()
    assert text.splitlines()[0] == HEADER
    cells = text.split(f"\n{SEPARATOR}\n")
    assert len(cells) >= 3, "markdown, widgets and at least one library cell"
    assert all(c.strip() for c in cells), "empty cell"
    assert cells[0].splitlines()[1] == "# MAGIC %md", "the first cell is the markdown title"
    tree = ast.parse(text, filename=str(path))
    assert not [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Lambda))], \
        "notebooks stay thin: no definitions (library code lives in cvr_spark)"
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [ast.alias(n.module or "")])}
    assert "torch" not in imported, "no training code inside notebooks"

    names = _library_names(tree)
    calls = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            target = _resolve(node.func, names)
            if callable(target) and not inspect.isclass(target) and not inspect.ismodule(target):
                sig = inspect.signature(target)
                sig.bind(*[None] * len(node.args), **{k.arg: None for k in node.keywords if k.arg})
                calls += 1
    assert calls >= 1, "a notebook makes at least one library call"


@pytest.mark.parametrize("path", sorted(NOTEBOOKS.glob("*.py")), ids=lambda p: p.stem)
def test_widgets_are_declared_and_read(path: Path):
    tree = ast.parse(path.read_text())
    declared = [c.args[0].value for kind in ("text", "dropdown") for c in _widget_calls(tree, kind)]
    assert declared and len(declared) == len(set(declared)), f"widgets {declared}"
    for call in _widget_calls(tree, "dropdown"):
        choices = ast.literal_eval(call.args[2])
        assert call.args[1].value in choices, f"dropdown {call.args[0].value}: default not a choice"
    read = [c.args[0] for c in _widget_calls(tree, "get")]
    literal = {a.value for a in read if isinstance(a, ast.Constant)}
    assert literal <= set(declared), f"reads undeclared widgets {literal - set(declared)}"
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    unread = [w for w in declared if strings.count(w) < 2]  # declared once, named again where read
    assert not unread, f"widgets declared but never read: {unread}"


def test_notebooks_import_only_public_names_that_exist(tmp_path):
    """The checker itself: a wrong or private name fails it."""
    bad = ast.parse("from cvr_spark.score import score_tabel\n")
    with pytest.raises(AssertionError, match="has no attribute score_tabel"):
        _library_names(bad)
    private = ast.parse("from cvr_spark.score import _write\n")
    with pytest.raises(AssertionError, match="private name"):
        _library_names(private)
    call = ast.parse("from cvr_spark.score import score_table\nscore_table(1, 2, 3, splt='x')\n")
    names = _library_names(call)
    node = [n for n in ast.walk(call) if isinstance(n, ast.Call)][0]
    with pytest.raises(TypeError):
        inspect.signature(_resolve(node.func, names)).bind(1, 2, 3, splt="x")
