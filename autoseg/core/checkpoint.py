"""Checkpoints: tensors and plain data only, written atomically, loaded with ``weights_only=True``.

A checkpoint holds the weights, optimizer and grad-scaler state, the epoch, the RNG
states of torch, numpy and Python, the resolved settings and the plan configuration,
so a resumed run continues deterministically from where it stopped (its data
loaders are reseeded from the seed and the epoch it resumes at).
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.core.errors import CheckpointError
from autoseg.core.files import atomic_path

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Every random stream training draws from: torch's CPU and CUDA generators (one state per visible
    GPU, none without CUDA), NumPy's and Python's; a resumed run continues them exactly."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    cuda = state.get("cuda", [])  # absent in checkpoints from before it was saved
    if cuda and torch.cuda.is_available():
        # a resume on fewer GPUs restores the ones it has (DDP: each rank draws on its own device)
        count = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([t.cpu() for t in cuda[:count]])


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically: a kill during the write leaves the previous checkpoint intact.

    torch writes through a Python file, so a full disk is the OSError it is (torch's own file
    writer reports only an "enforce fail").
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save({"version": CHECKPOINT_VERSION, **payload}, handle)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's payload; anything but autoseg's plain-data checkpoint is refused, never unpickled.

    torch's own message for a refused file suggests loading it with pickling enabled, which would
    run whatever code the file holds: that advice is not passed on. ``mmap`` maps the tensors
    instead of reading them: only those used are ever read from disk.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        holds = f" (it holds the Python object {found[1]})" if found else ""
        raise CheckpointError(
            f"{path} is not a plain-weights checkpoint{holds}, so it was not loaded: autoseg "
            "never unpickles Python objects; use a checkpoint written by autoseg train or "
            "autoseg export, intact"
        ) from None
    except Exception as exc:
        raise CheckpointError(
            f"{path} is damaged or not a PyTorch checkpoint ({type(exc).__name__}), so it was "
            "not loaded; copy it again or train again"
        ) from exc
    version = payload.get("version") if isinstance(payload, dict) else None
    if version is None:
        raise CheckpointError(f"{path} is not an autoseg checkpoint (it has no version record), so it was not loaded")
    if version != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {version}; expected {CHECKPOINT_VERSION}")
    return payload


def load_inference_weights(path: Path) -> dict[str, torch.Tensor]:
    """The network weights of a checkpoint, for prediction: the optimizer state of a full training
    checkpoint is mapped, never read, and the weights are copied out of the mapping."""
    weights = load_checkpoint(path, mmap=True).get("weights")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path} holds no network weights, so it cannot predict")
    return {name: tensor.clone() for name, tensor in weights.items()}


def load_weights(network: torch.nn.Module, weights: dict[str, Any], source: str) -> None:
    """Load ``weights`` into ``network``; weights of another network (the plan changed since) are a clear error."""
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        problem = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(
            f"{source} does not fit the network plans.json describes ({problem}); the plan changed after "
            "training: plan again from the data it was trained on, or train again with --no-resume"
        ) from None


def weights_digest(weights: dict[str, torch.Tensor]) -> int:
    """A checksum of a state dict's values (a JSON-safe integer): equal weights, equal digest."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    for tensor in weights.values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") % (2**53)
