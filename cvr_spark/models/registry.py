"""Model registry: name -> model class (with its paper, outputs and option dataclass).

Family modules in this package register their classes with :func:`register`; every module
of the package is imported on first use, so adding a family is adding a file.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any, Mapping

from cvr_spark.models.base import EMBEDDING_OPTIMIZERS, CVRModel, FeatureSpec

_REGISTRY: dict[str, type[CVRModel]] = {}
_LOADED = False


def register(name: str):
    """Class decorator: register ``cls`` under ``name`` (also sets ``cls.name``)."""

    def deco(cls: type[CVRModel]) -> type[CVRModel]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"model name '{name}' registered twice")
        _REGISTRY[name] = cls
        if not cls.__dict__.get("name"):
            cls.name = name
        return cls

    return deco


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    import cvr_spark.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in ("base", "registry") and not mod.name.startswith("_"):
            importlib.import_module(f"cvr_spark.models.{mod.name}")
    _LOADED = True


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[CVRModel]:
    """The class registered as ``name``.

    Raises:
        KeyError: unknown name (the message lists the registered names).
    """
    _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}'; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build(name: str, spec: FeatureSpec, options: Mapping[str, Any] | None = None) -> CVRModel:
    """Instantiate model ``name`` with its config dataclass filled from ``options``.

    Raises:
        ValueError: an option is not a field of the model's config (names it), or an unknown
            ``embedding_optimizer``.
    """
    cls = get(name)
    known = {f.name for f in dataclasses.fields(cls.config_cls)}
    unknown = set(options or {}) - known
    if unknown:
        raise ValueError(f"model '{name}': unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    cfg = cls.config_cls(**dict(options or {}))
    if getattr(cfg, "embedding_optimizer", EMBEDDING_OPTIMIZERS[0]) not in EMBEDDING_OPTIMIZERS:
        raise ValueError(f"model '{name}': embedding_optimizer must be one of {EMBEDDING_OPTIMIZERS}, "
                         f"got {cfg.embedding_optimizer!r}")
    return cls(spec, cfg)


def describe() -> list[dict]:
    """One entry per registered model: name, paper, outputs and options with defaults."""
    rows = []
    for n in names():
        cls = _REGISTRY[n]
        cfg = cls.config_cls()
        rows.append({
            "name": n,
            "paper": cls.paper,
            "outputs": list(getattr(cls, "outputs", ("p_ctr", "p_cvr", "p_ctcvr"))),
            "cvr_output": cls.cvr_output,
            "ctcvr_output": cls.ctcvr_output,
            "options": dataclasses.asdict(cfg),
        })
    return rows


def preset_path(name: str):
    """``conf/models/<name>.yaml`` ('+' in a registry name becomes '_')."""
    from cvr_spark.config import CONF_DIR

    return CONF_DIR / "models" / f"{name.replace('+', '_')}.yaml"


def preset_options(name: str, preset: str = "paper", overrides: Mapping[str, Any] | None = None) -> dict:
    """The options of model ``name`` under ``preset`` (a top-level block of its YAML file).

    The YAML file holds one block per preset (``paper``, ``fast``, ...), each a mapping of
    fields of the model's config dataclass. Unknown keys raise an error naming the key.

    Raises:
        FileNotFoundError / KeyError / ValueError: missing file, missing preset, bad key.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cls = get(name)
    path = preset_path(name)
    if not path.exists():
        raise FileNotFoundError(f"no preset file for model '{name}': {path}")
    blocks = OmegaConf.to_container(OmegaConf.load(path))
    if preset not in blocks:
        raise KeyError(f"{path}: no preset '{preset}' (has: {sorted(blocks)})")
    merged = OmegaConf.structured(cls.config_cls)
    for source, values in ((f"{path} [{preset}]", blocks[preset] or {}), ("override", dict(overrides or {}))):
        try:
            merged = OmegaConf.merge(merged, values)
        except OmegaConfBaseException as e:
            key = f"model.{e.full_key}" if source == "override" else e.full_key
            raise ValueError(f"{source}: key '{key}' of model '{name}': {str(e).splitlines()[0]}") from None
    return dataclasses.asdict(OmegaConf.to_object(merged))
