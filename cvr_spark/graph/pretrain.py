"""Stage 0 of CSTWA (MODELS.md §9.3): pre-train the click-only model, export E^pre.

:func:`pretrain_ctr` trains the registered ``ctr`` model (:mod:`cvr_spark.models.ctr`) with
the shared loop (:func:`cvr_spark.train.loop.fit`: early stopping on validation click AUC,
best epoch's weights kept) and leaves a run folder of the usual layout (``checkpoint.pt``,
``config.json``, ``metrics.json``). :func:`load_embeddings` reads the field embedding table
from such a run folder, or from any checkpoint whose state holds an EmbeddingArch table
(``<prefix>.table.weight``), together with the features-table version it was trained on.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from cvr_spark.models.base import FeatureSpec

log = logging.getLogger(__name__)

TABLE_SUFFIX = "table.weight"


@dataclass
class PretrainConfig:
    """How the graph job pre-trains its CTR model when no checkpoint is given."""

    model: str = "ctr"
    preset: str = "paper"
    epochs: int = 10  # [I] best validation click AUC within <= 10 epochs (MODELS.md §9.3)
    patience: int = 1
    seed: int = 0
    device: str = "auto"
    out: str = ""  # run folder; empty: <graph output>/pretrain/features_v<version>
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EmbeddingSource:
    """An exported embedding table and where it came from (recorded in the graph manifest)."""

    table: np.ndarray  # [sum of vocab sizes, D] float32, EmbeddingArch row layout
    source: str  # checkpoint file
    state_key: str  # its key in the checkpoint's state dict
    train_table_version: Optional[int]  # features-table version it was trained on (None: unknown)
    model_name: Optional[str]

    @property
    def checksum(self) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.table, np.float32).tobytes()).hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "state_key": self.state_key, "model": self.model_name,
                "train_table_version": self.train_table_version, "shape": list(self.table.shape),
                "sha256": self.checksum}


def pretrain_ctr(data_dir: str, out_dir: str | Path, cfg: PretrainConfig,
                 version: Optional[int] = None) -> Path:
    """Train ``cfg.model`` on the train split (early stopping on valid ``ctr_auc``); returns the
    run folder. A finished run in ``out_dir`` is not retrained (the loop resumes it as done).

    Raises:
        ValueError: bad options (names the key); see :func:`cvr_spark.train.loop.fit`.
    """
    from cvr_spark.models import registry
    from cvr_spark.train.checkpoint import seed_everything
    from cvr_spark.train.distributed import spec_to_dict
    from cvr_spark.train.experiment import make_train_config
    from cvr_spark.train.loader import FeatureLoader, load_manifest
    from cvr_spark.train.loop import fit, plain, resolve_device

    out = Path(out_dir)
    spec = FeatureSpec.from_manifest(load_manifest(data_dir))
    train_opts = {"patience": cfg.patience, "device": cfg.device, "early_stop_metric": "ctr_auc",
                  "progress": False, **cfg.train_overrides}
    tcfg = make_train_config(train_opts, epochs=cfg.epochs, seed=cfg.seed)
    options = registry.preset_options(cfg.model, cfg.preset, cfg.model_overrides)
    seed_everything(cfg.seed)
    model = registry.build(cfg.model, spec, options)
    device = resolve_device(tcfg.device)
    common = dict(seed=cfg.seed, in_memory=tcfg.in_memory, device=device, version=version, spec=spec)
    train = FeatureLoader(data_dir, "train", model.cfg.batch_size, shuffle=True, **common)
    valid = FeatureLoader(data_dir, "valid", tcfg.eval_batch_size, shuffle=False, **common)
    job = {"data_dir": str(data_dir), "model": cfg.model, "seed": cfg.seed, "out_dir": str(out),
           "model_options": options, "train": dataclasses.asdict(tcfg), "version": version,
           "preset": cfg.preset, "purpose": "cstwa graph pre-training"}
    meta = {"model_name": cfg.model, "model_options": options, "spec": spec_to_dict(spec), "job": job}
    out.mkdir(parents=True, exist_ok=True)
    result = fit(model, train, valid, tcfg, out, meta=meta, record={**meta, "train": dataclasses.asdict(tcfg)})
    (out / "metrics.json").write_text(json.dumps(plain({"model": cfg.model, "seed": cfg.seed, **result}),
                                                 indent=2, default=str))
    log.info("pre-trained %s: best epoch %d, valid ctr_auc %s", cfg.model, result["best_epoch"],
             result["valid"].get("ctr_auc"))
    return out


def _pick_table(state: Mapping[str, Any], key: str, where: str) -> str:
    if key:
        if key not in state:
            raise KeyError(f"{where}: no state entry '{key}' (embedding tables: "
                           f"{[k for k in state if k.endswith(TABLE_SUFFIX)]})")
        return key
    tables = [k for k in state if k.endswith(TABLE_SUFFIX)]
    if len(tables) > 1:  # e.g. CSTWA's ctr_embedding / cvr_embedding: prefer the CTR side
        tables = [k for k in tables if "ctr" in k.split(".")[0]] or tables
    if len(tables) != 1:
        raise KeyError(f"{where}: expected one EmbeddingArch table ('*.{TABLE_SUFFIX}'), found "
                       f"{tables or 'none'}; name it with graph.embedding_key")
    return tables[0]


def load_embeddings(checkpoint: str | Path, spec: FeatureSpec, embedding_key: str = "") -> EmbeddingSource:
    """The embedding table of a run folder / checkpoint file, checked against ``spec``.

    Uses the best validation weights when the checkpoint holds them.

    Raises:
        FileNotFoundError: no checkpoint. KeyError: no (or an ambiguous) embedding table.
        ValueError: the checkpoint's features differ from ``spec`` or the table's rows do not
            match the vocabulary sizes.
    """
    from cvr_spark.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
    from cvr_spark.train.distributed import spec_from_dict

    path = Path(checkpoint)
    path = path / CHECKPOINT_NAME if path.is_dir() else path
    state = load_checkpoint(path)
    weights = state["best_model"] if state.get("best_model") is not None else state["model"]
    key = _pick_table(weights, embedding_key, str(path))
    meta = state.get("meta") or {}
    if meta.get("spec"):
        saved = spec_from_dict(meta["spec"])
        for attr in ("sparse_fields", "sparse_vocab", "multi_fields", "multi_vocab"):
            if tuple(getattr(saved, attr)) != tuple(getattr(spec, attr)):
                raise ValueError(f"{path}: trained with {attr}={getattr(saved, attr)} but the manifest has "
                                 f"{getattr(spec, attr)}; pre-train on these features")
    table = weights[key].float().cpu().numpy()
    total = sum(spec.sparse_vocab) + sum(spec.multi_vocab)
    if table.ndim != 2 or table.shape[0] != total:
        raise ValueError(f"{path}: '{key}' has shape {tuple(table.shape)}, expected [{total}, D] "
                         "(the manifest's vocabulary sizes)")
    version = (state.get("table_versions") or {}).get("train")
    return EmbeddingSource(table, str(path), key, None if version is None else int(version), meta.get("model_name"))
