"""Progress reporting and cancellation shared by all stages.

A stage receives a `Progress` and calls `progress.update(stage, fraction)` at natural steps
(each sampler step, each decoded frame, ...). `update` raises `Cancelled` once `cancel()` was
called from another thread, so a stage stops at its next step and leaves nothing half-made.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from .errors import Cancelled


@dataclass
class Progress:
    callback: Optional[Callable[[str, float], None]] = None
    _cancel: threading.Event = field(default_factory=threading.Event)
    stage: str = ""
    fraction: float = 0.0

    def update(self, stage: str, fraction: float) -> None:
        self.check_cancelled()
        self.stage, self.fraction = stage, float(min(max(fraction, 0.0), 1.0))
        if self.callback is not None:
            self.callback(self.stage, self.fraction)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise Cancelled()
