"""Live-storage accounting of a training step, on the meta device or on real tensors alike.

`StorageTracker` is a TorchDispatchMode: every tensor an ATen op returns is looked at, and a storage
seen for the first time counts as allocated until its weakref finalizer fires (with PyObject
preservation, that is when the C++ storage dies, not when a Python handle goes). Nothing is read
from an allocator, so the same count works for meta tensors, which own no memory, and for CPU
tensors, which lets a test hold the simulation against a real run.

We use our own mode rather than `torch.distributed._tools.mem_tracker.MemTracker` because MemTracker
attributes by module and registers grad hooks on every parameter (failing on frozen ones), while
the figures we need are by role: frozen weights, trainable parameters, their gradients, optimizer
state, activations, and what the DP engine keeps. Roles come from storages that exist before the
step or are named afterwards (`register`, `mark`) and, for everything else, from the Python code
that allocated and the code that released the storage (the innermost frame outside torch: the DP
engine's package, a torch optimizer, autograd's engine, or the model). A tensor the model or autograd
made but the DP engine released last (a layer input or output gradient kept for clipping) counts as
an engine buffer: the engine is what kept it alive.
"""

from __future__ import annotations

import os
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROLES = ("weights", "trainable_params", "grads", "optimizer_state", "activations", "logits", "engine_buffers",
         "optimizer_temporaries")
# Allocation origins (who asked) map onto the roles a storage has when nobody named it.
_ORIGIN_ROLE = {"model": "activations", "autograd": "activations", "engine": "engine_buffers",
                "optimizer": "optimizer_temporaries"}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep
_AUTOGRAD_ENTRIES = (os.path.join(_TORCH_DIR, "autograd", "graph.py"),
                     os.path.join(_TORCH_DIR, "autograd", "__init__.py"))
_WEAKREF_FILE = os.path.abspath(weakref.__file__)  # finalizers run inside weakref.py: not the releasing code
_THIS_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


@dataclass
class _Record:
    nbytes: int
    role: str
    phase: str
    allocated: int  # event number; -1 for storages that existed before tracking started
    freed: int | None = None
    released_by_engine: bool = False


@dataclass(frozen=True)
class PeakReport:
    """Bytes live at the peak, by role (roles sum to `peak_bytes`), and when the peak happened."""

    peak_bytes: int
    baseline_bytes: int
    by_role: dict[str, int]
    phase: str
    peak_by_phase: dict[str, int]
    final_bytes: int


class StorageTracker(TorchDispatchMode):
    """Counts live storage bytes of `device_type` tensors between `__enter__` and `__exit__`.

    `engine_dirs`: source directories (or single source files) of the DP engine; what their code
    allocates (per-example gradients, norms, clipped sums, noise) or releases last (inputs and output gradients kept for
    clipping) is an engine buffer. `vocab_size`: model/autograd tensors with a dimension this size
    are reported as `logits`, so a B·T·V tensor that dominates the peak shows up by name.
    `phase` is set by the caller's hooks (forward / backward / optimizer) and recorded at the peak.
    """

    def __init__(self, device_type: str, engine_dirs: Iterable[str] = (), vocab_size: int | None = None) -> None:
        super().__init__()
        self.device_type = device_type
        # A file matches itself; a directory everything under it.
        self.engine_dirs = tuple(path if os.path.isfile(path) else path + os.sep
                                 for path in map(os.path.abspath, engine_dirs))
        self.vocab_size = vocab_size
        self.phase = "before forward"
        self._records: list[_Record] = []
        self._live: dict[int, _Record] = {}
        self._code_kind: dict[object, str] = {}
        self._event = 0
        self._current = 0
        self._peak = 0
        self._peak_event = -1
        self._peak_phase = "before forward"
        self._phase_peaks: dict[str, int] = {}
        self._baseline = 0
        self._active = False

    # ---- naming storages ------------------------------------------------------------------------

    def register(self, tensors: Iterable[torch.Tensor], role: str) -> None:
        """Storages that exist already (weights, optimizer state of an earlier step) get `role`."""
        for t in tensors:
            record = self._see(t, role, allocated=-1)
            if record is not None:
                record.role = role

    def mark(self, tensors: Iterable[torch.Tensor], role: str) -> None:
        """Give live storages a role learnt late (a `.grad` is known as one only when the optimizer runs)."""
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                record = self._live.get(id(t.untyped_storage()))
                if record is not None:
                    record.role = role

    # ---- the mode -------------------------------------------------------------------------------

    def __enter__(self):
        self._active = True
        self._baseline = self._current
        self._peak = self._current
        self._peak_event = self._event
        return super().__enter__()

    def __exit__(self, *exc):
        self._active = False
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._see(t)
        if func._schema.is_mutable:  # out= and resize_ variants may grow a storage they were given
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor):
                    self._see(t)
        return out

    def _see(self, t: torch.Tensor, role: str | None = None, allocated: int | None = None) -> _Record | None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return None
        storage = t.untyped_storage()
        nbytes = storage.nbytes()
        record = self._live.get(id(storage))
        if record is not None:
            if nbytes > record.nbytes:
                self._grow(nbytes - record.nbytes)
                record.nbytes = nbytes
            return record
        if nbytes == 0:
            return None
        if role is None:
            role = _ORIGIN_ROLE[self._origin()]
            if role == "activations" and self.vocab_size is not None and self.vocab_size in t.shape:
                role = "logits"
        record = _Record(nbytes, role, self.phase, self._event if allocated is None else allocated)
        self._records.append(record)
        self._live[id(storage)] = record
        weakref.finalize(storage, self._free, id(storage))
        self._grow(nbytes)
        return record

    def _grow(self, nbytes: int) -> None:
        self._event += 1
        self._current += nbytes
        if not self._active:
            return
        if self._current > self._phase_peaks.get(self.phase, 0):
            self._phase_peaks[self.phase] = self._current
        if self._current > self._peak:
            self._peak = self._current
            self._peak_event = self._event
            self._peak_phase = self.phase

    def _free(self, key: int) -> None:
        record = self._live.pop(key, None)
        if record is None:
            return
        self._event += 1
        record.freed = self._event
        record.released_by_engine = self._origin() == "engine"
        self._current -= record.nbytes

    def _origin(self) -> str:
        """Whose code runs now (allocating or releasing): the innermost frame outside torch and the memory
        package (dpmemarc_core/memory/) decides."""
        frame = sys._getframe(1)
        while frame is not None:
            kind = self._code_kind.get(frame.f_code)
            if kind is None:
                kind = self._code_kind[frame.f_code] = self._classify(frame.f_code.co_filename)
            if kind != "skip":
                return kind
            frame = frame.f_back
        return "model"

    def _classify(self, filename: str) -> str:
        filename = os.path.abspath(filename)
        if filename.startswith(_OPTIM_DIR):
            return "optimizer"
        if filename in _AUTOGRAD_ENTRIES:
            return "autograd"  # an op autograd's engine runs for a built-in backward formula
        if (filename.startswith(_TORCH_DIR) or filename == _WEAKREF_FILE
                or filename.startswith(_THIS_DIR)):
            return "skip"
        if any(filename.startswith(d) for d in self.engine_dirs):
            return "engine"
        return "model"

    # ---- the answer -----------------------------------------------------------------------------

    def report(self) -> PeakReport:
        """Bytes by role of the storages live at the peak (a storage's role is its last known one)."""
        by_role = dict.fromkeys(ROLES, 0)
        at = self._peak_event
        for r in self._records:
            if r.allocated <= at and (r.freed is None or r.freed > at):
                kept = r.released_by_engine and r.role in ("activations", "logits")
                by_role["engine_buffers" if kept else r.role] += r.nbytes
        return PeakReport(peak_bytes=self._peak, baseline_bytes=self._baseline, by_role=by_role,
                          phase=self._peak_phase, peak_by_phase=dict(self._phase_peaks),
                          final_bytes=self._current)
