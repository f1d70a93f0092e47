"""The machine a process runs on: what its CPU is, how many of its cores are free for torch's
threads, and the float environment under which training writes the same bytes on any x86-64 CPU.

Threads: two intra-op threads on a 2-core machine beside one busy process wait for each other at
every barrier (a search candidate took 4 to 38 s instead of 0.7 s). :class:`ThreadFit` measures how
much of this process's cores other processes use (``/proc/stat`` less this process's own CPU time)
and gives torch the cores left free, at least one, looking again every ``interval`` seconds.

Training numerics: float reductions in torch's CPU kernels follow the instruction set (AVX-512 or
AVX2 kernels, MKL's per-CPU code paths) and the thread count, and training amplifies last-bit
differences into another model. :data:`PINNED_ENV` takes each layer to one code path that every
x86-64 CPU runs alike: ATen's ``default`` kernels (no CPU-specific vectorization), MKL's
conditional numerical reproducibility in its ``COMPATIBLE`` branch, and one thread. These are read
when the libraries start, so a process gets them by being started with them: :func:`run_pinned`.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def _cpuinfo(key: str) -> str:
    """The first ``key`` line's value in ``/proc/cpuinfo``, or '' where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what the platform module says."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def vector_isa() -> str:
    """The widest x86 vector instruction set the CPU has, as torch's kernels choose by it."""
    flags = _cpuinfo("flags").split()
    return "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()


def describe() -> str:
    """One line naming the machine as far as floats care: CPU model and vector instructions, usable
    cores, torch and the kernels it runs here."""
    import torch

    return (f"{cpu_model()} ({vector_isa()}), {usable_cores()} cores, torch {torch.__version__} with "
            f"{torch.backends.cpu.get_cpu_capability()} kernels on {torch.get_num_threads()} thread(s)")


def numerics_pinned() -> bool:
    """Whether this process runs under :data:`PINNED_ENV` (torch's kernels and threads included)."""
    import torch

    return (all(os.environ.get(k) == v for k, v in PINNED_ENV.items())
            and torch.backends.cpu.get_cpu_capability() == "DEFAULT" and torch.get_num_threads() == 1)


def run_pinned(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` under :data:`PINNED_ENV` (``kwargs`` go to :func:`subprocess.run`)."""
    return subprocess.run([sys.executable, *args], env=os.environ | PINNED_ENV, **kwargs)


# ---------------------------------------------------------------------------------------------
# Threads


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _busy_seconds() -> Optional[float]:
    """CPU seconds spent so far on this process's cores by anything (``/proc/stat``), or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
        cores = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (OSError, AttributeError):
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if name in cores:  # user nice system idle iowait irq softirq steal ...
            values = [int(x) for x in fields[:8]]
            ticks += sum(values) - values[3] - values[4]
    return ticks / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadFit:
    """torch's intra-op threads fitted to the cores other processes leave free.

    ``fixed``: a thread count the user chose (``--threads``); ``OMP_NUM_THREADS`` in the
    environment counts as such a choice. Otherwise the count follows the load: a core counts as
    taken when other processes use more than ``TAKEN`` of one, measured over ``interval`` seconds
    (a first look over ``first_look`` seconds at start)."""

    TAKEN = 0.5

    def __init__(self, fixed: Optional[int] = None, interval: float = 30.0, first_look: float = 0.2):
        import torch

        self._torch = torch
        self.cores = usable_cores()
        self.interval = interval
        env = os.environ.get("OMP_NUM_THREADS", "")
        self.fixed = fixed if fixed else (int(env) if env.isdigit() and int(env) > 0 else None)
        self.why = "--threads" if fixed else "OMP_NUM_THREADS"
        self.others: Optional[float] = None
        self._mark = self._sample()
        if self.fixed:
            torch.set_num_threads(self.fixed)
        elif self._mark is not None:
            time.sleep(first_look)
            self.check(force=True)

    def _sample(self) -> Optional[tuple[float, float, float]]:
        busy = _busy_seconds()
        return None if busy is None else (time.monotonic(), busy, _own_seconds())

    @property
    def threads(self) -> int:
        return self._torch.get_num_threads()

    def describe(self) -> str:
        if self.fixed:
            return f"torch threads: {self.threads} ({self.why})"
        if self.others is None:
            return f"torch threads: {self.threads} (the load of other processes cannot be read here)"
        return (f"torch threads: {self.threads} of {self.cores} cores (other processes use {self.others:.1f} "
                f"cores; it follows the load, --threads N fixes it)")

    def check(self, force: bool = False) -> bool:
        """Look at the load again if ``interval`` seconds have passed (or ``force``); set torch's
        threads to the free cores. Whether the count changed."""
        if self.fixed or self._mark is None or (not force and time.monotonic() - self._mark[0] < self.interval):
            return False
        now = self._sample()
        if now is None:
            return False
        wall = now[0] - self._mark[0]
        if wall <= 0:
            return False
        others = max(0.0, ((now[1] - self._mark[1]) - (now[2] - self._mark[2])) / wall)
        self._mark, self.others = now, others
        want = max(1, self.cores - math.ceil(others - self.TAKEN))
        if want == self.threads:
            return False
        before = self.threads
        self._torch.set_num_threads(want)
        if self.threads != want:  # vLLM's CPU worker, for one, replaces set_num_threads once it binds its threads
            self.fixed, self.why = self.threads, "held by a library that bound them (vLLM's CPU backend does)"
            log.info("torch threads: %d, %s; they no longer follow the load", self.threads, self.why)
            return False
        log.info("torch threads: %d -> %d (other processes use %.1f of %d cores)", before, want, others, self.cores)
        return True
