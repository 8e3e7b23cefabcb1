"""Training helpers: seeding, device choice, a version line, ties in a validation grid, early stopping, progress bars.

Environment variables: ``MREC_DEVICE`` (the device :func:`get_device` picks when given none, e.g. ``cpu`` on a GPU
machine) and ``MREC_NO_PROGRESS=1`` (no :func:`progress` bars: CI, stored notebooks).
"""

from __future__ import annotations

import math
import os
import platform
import random
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Iterable, Mapping, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

TIE_TOL = 1e-9
"""Validation values closer than this are a tie, won by the earlier candidate. In float64 two machines
differ by about 1e-13, so a choice never depends on which machine computed it."""

C = TypeVar("C")


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and PyTorch (CPU and every GPU), with an int
    in [0, 2**32 - 1]. (Some CUDA kernels stay non-deterministic; see ``torch.use_deterministic_algorithms``.)"""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32 - 1], got {seed!r}.")
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))  # also seeds every CUDA device


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """The torch device: ``prefer``, else ``$MREC_DEVICE``, else ``cuda`` when available, else ``cpu``
    (``"auto"`` means "choose for me"). Raises ValueError for an unknown or unavailable device."""
    choice = prefer if prefer is not None else os.environ.get("MREC_DEVICE", "").strip() or "auto"
    if isinstance(choice, str) and choice.lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(choice.lower() if isinstance(choice, str) else choice)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {choice!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(dev)!r} requested but CUDA is not available; use 'cpu' or 'auto' "
                         "(check MREC_DEVICE if you did not ask for it).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{dev} requested but only {torch.cuda.device_count()} CUDA device(s) exist.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but it is not available; use 'cpu' or 'auto'.")
    return dev


def versions() -> str:
    """One line with Python, library versions (from installed metadata) and the chosen device, e.g.
    ``python 3.11.9 | torch 2.3.1 | numpy 1.26.4 | pandas 2.2.2 | transformers 4.44.2 | device cpu``."""
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("numpy", "pandas", "transformers"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} n/a")
    try:
        dev = str(get_device())
    except ValueError as exc:  # e.g. MREC_DEVICE=cuda on a CPU machine
        dev = f"unavailable ({exc})"
    if dev.startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(get_device())})"
    return " | ".join(parts + [f"device {dev}"])


def pick_best(candidates: Iterable[C], score: Callable[[C], float], *, maximize: bool = True, tol: float = TIE_TOL) -> C:
    """The first candidate whose ``score(candidate)`` is within ``tol`` of the best score, so that ties
    (and near-ties below ``tol``) in a validation grid go to the earlier entry on every machine."""
    cands = list(candidates)
    vals = [float(score(c)) for c in cands]
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"a candidate scored NaN: {dict(zip(map(str, cands), vals))}.")
    best = max(vals) if maximize else min(vals)
    return next(c for c, v in zip(cands, vals) if (v >= best - tol if maximize else v <= best + tol))


State = nn.Module | Mapping[str, Tensor]
"""What :class:`EarlyStopping` keeps: a module (its ``state_dict``) or a dict of tensors."""


@dataclass
class EarlyStopping:
    """Stop when a monitored value has not beaten the best by more than ``min_delta`` for ``patience``
    steps (None: never stop), ``mode`` "min" (a loss) or "max" (nDCG), and keep a copy of the best state.
    Usage: ``if stopper.step(val_loss, model): break`` in the loop, ``stopper.restore(model)`` after it."""

    patience: int | None = 5
    min_delta: float = TIE_TOL
    mode: str = "min"
    best: float | None = field(default=None, init=False)
    best_step: int = field(default=-1, init=False)
    num_bad_steps: int = field(default=0, init=False)
    steps: int = field(default=0, init=False)
    best_state: dict[str, Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}.")

    def step(self, value: float, state: State | None = None) -> bool:
        """Record one validation value (and the current ``state``); True when training should stop. Raises: ValueError:
        if ``value`` is NaN (training diverged; lower the learning rate)."""
        value = float(value.item() if hasattr(value, "item") else value)
        if math.isnan(value):
            raise ValueError("monitored value is NaN: training diverged; lower the learning rate or check the loss.")
        self.steps += 1
        d = self.min_delta
        if self.best is None or (value < self.best - d if self.mode == "min" else value > self.best + d):
            self.best, self.best_step, self.num_bad_steps = value, self.steps - 1, 0
            if state is not None:
                tensors = state.state_dict() if isinstance(state, nn.Module) else state
                self.best_state = {k: v.detach().clone() for k, v in tensors.items()}
        else:
            self.num_bad_steps += 1
        return self.patience is not None and self.num_bad_steps >= self.patience

    def restore(self, state: State) -> State:
        """Copy the best kept values back into ``state`` (a module or the dict given to :meth:`step`)."""
        if self.best_state is None:
            raise ValueError("no best state kept; pass the model to step(value, model).")
        if isinstance(state, nn.Module):
            state.load_state_dict(self.best_state)
        else:
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(self.best_state[k])
        return state


def progress(iterable: Iterable | None = None, **kw):
    """A ``tqdm.auto`` bar that leaves no clutter (``leave=False``); off when ``MREC_NO_PROGRESS`` is
    1/true/yes. Other keyword arguments go to tqdm (``total=``, ``desc=``, ``disable=``)."""
    from tqdm.auto import tqdm

    kw.setdefault("leave", False)
    if os.environ.get("MREC_NO_PROGRESS", "").strip().lower() in ("1", "true", "yes"):
        kw["disable"] = True
    return tqdm(iterable, **kw)
