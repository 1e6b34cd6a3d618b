"""Checkpoints that load with ``torch.load(..., weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no numpy arrays,
no pickled objects), so the safe unpickler reads it. It holds::

    model / optimizer      state dicts of the last step (what a resume continues from)
    best_model             state dict of the best validation epoch so far (what is evaluated)
    epoch, step, batch     where training stands (``batch``: batches done inside ``epoch``)
    rng                    one RNG snapshot per rank (python, numpy, torch, cuda), as tensors
    config, table_versions, spec, model_name, model_options, history, best, ...  plain values

Writes are atomic (temporary file + ``os.replace``), so a process killed while writing
leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pt"


def capture_rng() -> dict[str, Any]:
    """Snapshot of the python, numpy and torch (and CUDA) RNGs, as tensors and plain values."""
    version, py_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(version),
        "python": torch.tensor(py_state, dtype=torch.int64),  # [625]
        "python_gauss": gauss,
        "numpy_name": str(np_name),
        "numpy": torch.from_numpy(np_keys.astype(np.int64)),  # [624]
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore the RNGs from :func:`capture_rng`'s snapshot.

    Raises:
        KeyError: the snapshot lacks one of the python / numpy / torch entries.
    """
    for key in ("python", "numpy", "torch"):
        if key not in state:
            raise KeyError(f"RNG snapshot lacks '{key}' (has: {sorted(state)})")
    py = tuple(int(v) for v in state["python"].tolist())
    random.setstate((int(state["python_version"]), py, state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy"].numpy().astype(np.uint32),
                         int(state["numpy_pos"]), int(state["numpy_has_gauss"]), float(state["numpy_gauss"])))
    torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.to(torch.uint8).cpu() for s in cuda])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically; returns the path.

    Raises:
        TypeError: ``state`` holds a value the ``weights_only`` loader would refuse (checked by
            reading the temporary file back before it replaces the old checkpoint).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(dict(state), tmp)
    try:
        torch.load(tmp, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler's error names the offending type
        tmp.unlink(missing_ok=True)
        raise TypeError(f"checkpoint {path} would not load with weights_only=True: {e}") from None
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint (a file, or a run folder holding ``checkpoint.pt``) with ``weights_only``.

    Raises:
        FileNotFoundError: no checkpoint there. KeyError: the file lacks ``model``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise KeyError(f"{path}: not a cvr-spark checkpoint (expected a dict with a 'model' entry)")
    return state


def cpu_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``module``'s state dict (safe to keep while training goes on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
