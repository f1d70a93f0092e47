"""The machine: pinned training numerics, and torch threads fitted to the cores other processes leave free."""

import json
import subprocess
import sys
import time

import pytest
import torch

from evomerge import machine
from evomerge.machine import ThreadFit, usable_cores

PROBE = ("import json, os, torch; from evomerge import machine; print(json.dumps({"
         "'capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads(), "
         "'mkl_cbwr': os.environ.get('MKL_CBWR'), 'pinned': machine.numerics_pinned()}))")


def test_a_pinned_process_runs_default_kernels_on_one_thread_whatever_its_caller_set(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2" if machine.vector_isa() in ("AVX2", "AVX-512") else "default")
    monkeypatch.setenv("MKL_CBWR", "AUTO")
    out = machine.run_pinned(["-c", PROBE], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"capability": "DEFAULT", "threads": 1, "mkl_cbwr": "COMPATIBLE", "pinned": True}
    assert not machine.numerics_pinned()  # this test process is not pinned: its floats are the CPU's own


def test_zoo_training_refuses_to_run_outside_the_pinned_numerics(tmp_path):
    out = subprocess.run([sys.executable, "-m", "evomerge.zoo", str(tmp_path / "z")], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("evomerge: error: zoo training needs the pinned numerics"), out.stderr
    assert not (tmp_path / "z").exists()


def test_describe_names_the_cpu_its_vector_instructions_and_torch():
    text = machine.describe()
    assert machine.cpu_model() in text and f"{usable_cores()} cores" in text
    assert torch.__version__ in text and torch.backends.cpu.get_cpu_capability() in text


@pytest.fixture
def torch_threads(monkeypatch):
    """torch's own set_num_threads (an in-process vLLM test replaces it for the process's life),
    and the thread count restored afterwards."""
    monkeypatch.setattr(torch, "set_num_threads", torch._C.set_num_threads)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_given_are_kept(torch_threads, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fit = ThreadFit(3, interval=0)
    assert fit.threads == 3 and not fit.check(force=True) and fit.threads == 3
    assert fit.describe() == "torch threads: 3 (--threads)"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fit = ThreadFit(interval=0)
    assert fit.threads == 1 and fit.describe() == "torch threads: 1 (OMP_NUM_THREADS)"


def _busy_process() -> subprocess.Popen:
    """A process that keeps one core busy for at most 60 s (it ends when its stdin closes)."""
    code = ("import select, sys, time\nend = time.monotonic() + 60\n"
            "while time.monotonic() < end and not select.select([sys.stdin], [], [], 0)[0]:\n"
            "    sum(range(10000))\n")
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)


def test_a_busy_process_beside_takes_a_thread(torch_threads, monkeypatch):
    """With one core kept busy by another process, torch gets the cores left: one fewer (at least one)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    busy = _busy_process()
    try:
        fit = ThreadFit(interval=0, first_look=0.5)
    finally:
        busy.stdin.close()
        busy.wait()
    assert fit.others is not None and fit.others >= 0.75, fit.describe()
    assert fit.threads == max(1, usable_cores() - 1) or (fit.others > 1.25 and fit.threads < usable_cores())
    assert f"of {usable_cores()} cores (other processes use" in fit.describe()


def test_this_process_own_work_is_not_load(torch_threads, monkeypatch):
    """What this process itself burns on the cores is taken out of the load: it makes no thread go."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    fit = ThreadFit(interval=0, first_look=0.0)
    t0, busy0 = time.monotonic(), machine._busy_seconds()
    end = time.process_time() + 0.5
    while time.process_time() < end:  # half a second of this process's own CPU time
        sum(range(10000))
    fit.check(force=True)
    all_load = (machine._busy_seconds() - busy0) / (time.monotonic() - t0)
    assert fit.others <= all_load - 0.5, (fit.others, all_load)
    assert not ThreadFit(interval=3600, first_look=0.0).check()  # no second look before the interval


def test_threads_a_library_holds_stop_following_the_load(torch_threads, monkeypatch):
    """Where set_num_threads no longer sets anything (vLLM's CPU worker replaces it with a warning
    once it binds its threads), the fit says so once and stops asking."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)  # what vLLM's worker installs, without its log line
    fit = ThreadFit(interval=0, first_look=0.0)
    fit.cores = 8  # more cores than taken, so the fit asks for more than the one thread held
    fit.check(force=True)
    assert asked and fit.threads == 1 and fit.fixed == 1
    assert fit.describe().startswith("torch threads: 1 (held by a library that bound them")
    assert not fit.check(force=True) and len(asked) == 1
