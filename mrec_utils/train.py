"""Training helpers: seeding, device choice, version line, early stopping, progress bars.

Environment variables:
    MREC_DEVICE       device used by :func:`get_device` when no ``prefer`` is given
                      (e.g. ``cpu`` to force CPU on a GPU machine).
    MREC_NO_PROGRESS  set to ``1`` to switch off :func:`progress` bars (CI, stored notebooks).
"""

from __future__ import annotations

import math
import os
import platform
import random
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Iterable

import numpy as np
import torch

__all__ = ["seed_everything", "get_device", "versions", "TIE_TOL", "pick_best", "EarlyStopping", "progress"]

TIE_TOL = 1e-9
"""Validation values closer than this are a tie, won by the earlier candidate. In float64 two machines
differ by about 1e-13, so a choice never depends on which machine computed it."""


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and PyTorch (CPU and all GPUs).

    This does not switch on ``torch.use_deterministic_algorithms``; some CUDA kernels
    (e.g. scatter-add in embedding backward) may still be non-deterministic on a GPU.

    Args:
        seed: an int in [0, 2**32 - 1].
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32 - 1], got {seed}.")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def get_device(prefer: str | torch.device | None = None) -> torch.device:
    """Pick the torch device.

    Order: ``prefer`` if given, else the ``MREC_DEVICE`` environment variable, else
    ``cuda`` when available, else ``cpu``. ``"auto"`` means "choose for me".

    Raises:
        ValueError: for an unknown device string, or when CUDA (or MPS) is requested but
            not available on this machine.
    """
    choice = prefer if prefer is not None else os.environ.get("MREC_DEVICE", "").strip() or "auto"
    if isinstance(choice, torch.device):
        dev = choice
    elif isinstance(choice, str):
        if choice.lower() == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(choice.lower())
        except RuntimeError as exc:
            raise ValueError(f"unknown device {choice!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from exc
    else:
        raise TypeError(f"prefer must be a str, torch.device or None, got {type(choice).__name__}.")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(dev)!r} requested but CUDA is not available; use 'cpu' or 'auto' "
                "(check MREC_DEVICE if you did not ask for it)."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{dev} requested but only {torch.cuda.device_count()} CUDA device(s) exist.")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError("device 'mps' requested but it is not available; use 'cpu' or 'auto'.")
    return dev


def _pkg_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "n/a"


def versions() -> str:
    """One compact line with Python, library versions and the chosen device.

    Package versions are read from installed metadata (nothing heavy is imported).

    Example: ``python 3.11.9 | torch 2.3.1 | numpy 1.26.4 | pandas 2.2.2 | transformers 4.44.2 | device cpu``
    """
    parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    parts += [f"{p} {_pkg_version(p)}" for p in ("numpy", "pandas", "transformers")]
    try:
        dev = str(get_device())
    except ValueError as exc:  # e.g. MREC_DEVICE=cuda on a CPU machine
        dev = f"unavailable ({exc})"
    if dev.startswith("cuda"):
        dev += f" ({torch.cuda.get_device_name(get_device())})"
    parts.append(f"device {dev}")
    return " | ".join(parts)


def pick_best(candidates: Iterable[Any], score: Any, *, maximize: bool = True, tol: float = TIE_TOL) -> Any:
    """The first candidate whose ``score(candidate)`` is within ``tol`` of the best score.

    Grid searches on validation users use it, so that ties (and near-ties below ``tol``) go to the
    earlier grid entry on every machine instead of to whichever value rounding favoured.
    """
    cands = list(candidates)
    if not cands:
        raise ValueError("pick_best needs at least one candidate.")
    vals = [float(score(c)) for c in cands]
    if any(math.isnan(v) for v in vals):
        raise ValueError(f"a candidate scored NaN: {dict(zip(map(str, cands), vals))}.")
    best = max(vals) if maximize else min(vals)
    return next(c for c, v in zip(cands, vals) if (v >= best - tol if maximize else v <= best + tol))


@dataclass
class EarlyStopping:
    """Stop training when a monitored value has not improved for ``patience`` steps.

    Args:
        patience: number of consecutive non-improving steps tolerated (>= 1).
        min_delta: an improvement must beat the best value by more than this (>= 0).
        mode: ``"min"`` (loss) or ``"max"`` (accuracy, nDCG).
        keep_best_state: if True and a model is passed to :meth:`step`, a copy of its
            ``state_dict`` at the best step is kept (same devices) for :meth:`restore`.

    Usage::

        stopper = EarlyStopping(patience=3)
        for epoch in range(100):
            ...
            if stopper.step(val_loss, model):
                break
        stopper.restore(model)
    """

    patience: int = 5
    min_delta: float = TIE_TOL
    mode: str = "min"
    keep_best_state: bool = True
    best: float | None = field(default=None, init=False)
    best_step: int = field(default=-1, init=False)
    num_bad_steps: int = field(default=0, init=False)
    steps: int = field(default=0, init=False)
    best_state: dict[str, Any] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}.")
        if not (isinstance(self.min_delta, (int, float)) and self.min_delta >= 0):
            raise ValueError(f"min_delta must be a number >= 0, got {self.min_delta!r}.")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}.")

    def is_improvement(self, value: float) -> bool:
        """Whether ``value`` beats the best value so far by more than ``min_delta``."""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.num_bad_steps >= self.patience

    def step(self, value: float, model: torch.nn.Module | None = None) -> bool:
        """Record one validation value; return True when training should stop.

        Raises:
            ValueError: if ``value`` is NaN (training diverged; lower the learning rate).
        """
        if hasattr(value, "item"):
            value = value.item()
        value = float(value)
        if math.isnan(value):
            raise ValueError("monitored value is NaN: training diverged; lower the learning rate or check the loss.")
        self.steps += 1
        if self.is_improvement(value):
            self.best = value
            self.best_step = self.steps - 1
            self.num_bad_steps = 0
            if model is not None and self.keep_best_state:
                self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.num_bad_steps += 1
        return self.should_stop

    def restore(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the best kept ``state_dict`` into ``model`` (in place) and return it."""
        if self.best_state is None:
            raise ValueError("no best state kept; pass the model to step(value, model) with keep_best_state=True.")
        model.load_state_dict(self.best_state)  # copies values into the parameters
        return model


def progress(iterable: Iterable | None = None, **kw: Any):
    """A ``tqdm.auto`` progress bar that leaves no clutter in stored notebook outputs.

    ``leave=False`` by default; disabled entirely when the environment variable
    ``MREC_NO_PROGRESS`` is ``1``/``true``/``yes``. Other keyword arguments go to tqdm
    (``total=``, ``desc=``, ...).
    """
    from tqdm.auto import tqdm

    kw.setdefault("leave", False)
    if os.environ.get("MREC_NO_PROGRESS", "").strip().lower() in ("1", "true", "yes"):
        kw["disable"] = True
    return tqdm(iterable, **kw)
