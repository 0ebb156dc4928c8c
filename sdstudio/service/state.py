"""Progress of the running job, shared by the UI and ``/sdapi/v1/progress``.

This is the single-worker precursor of the durable job queue: one job runs at a time (the engine
holds a lock per device); its progress and interrupt flag live here, not in a global.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass
class JobState:
    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def begin(self, job: str, job_count: int, steps: int) -> None:
        with self.lock:
            self.job, self.job_count, self.job_no = job, job_count, 0
            self.sampling_step, self.sampling_steps = 0, steps
            self.started, self.interrupted, self.skipped = time.time(), False, False

    def update(self, job_no: int, step: int, steps: int) -> None:
        with self.lock:
            self.job_no, self.sampling_step, self.sampling_steps = job_no, step, steps

    def end(self) -> None:
        with self.lock:
            self.job = ""

    @property
    def progress(self) -> float:
        if not self.job or not self.job_count or not self.sampling_steps:
            return 0.0
        return min(1.0, (self.job_no + self.sampling_step / self.sampling_steps) / self.job_count)

    def eta(self) -> float:
        p = self.progress
        return 0.0 if p <= 0 else (time.time() - self.started) * (1 - p) / p
