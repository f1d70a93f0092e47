"""Compile-and-verify: run an elementwise (or exactly reducing) function through
``torch.compile`` for large tensors, and check each compiled variant's first call bit for bit
against eager PyTorch.

Compilation keeps eager PyTorch's rounding (``emulate_precision_casts``); the first call of every
compiled variant is checked against eager on its first 128Ki elements, and a variant that differs
(older compilers, FMA contraction) runs eagerly from then on. Set ``EVOMERGE_COMPILE=0`` to run
eagerly throughout. Nothing here knows about merge methods.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from functools import lru_cache
from typing import Callable

import torch

from evomerge.errors import first_line

log = logging.getLogger(__name__)

_COMPILE_MIN_NUMEL = 2048  # smaller tensors run eagerly (same results, no compile per tiny shape)
_VERIFY_NUMEL = 1 << 17  # a compiled variant is checked against eager on at most this many elements


def _compile_enabled() -> bool:
    return os.environ.get("EVOMERGE_COMPILE", "1") != "0"


_compile_failed = False
# per compiled variant (function, argument dtypes, flags): whether its first result equalled eager's
_verified: dict[tuple, bool] = {}


def _signature(fn: Callable, args: tuple) -> tuple:
    def sig(a):
        if isinstance(a, torch.Tensor):
            return ("T", a.dtype, a.device.type, a.dim())
        if isinstance(a, (list, tuple)):
            return tuple(sig(x) for x in a)
        if a is None or isinstance(a, (bool, int, str)):
            return a
        if dataclasses.is_dataclass(a):  # a bundle of kernel inputs (KeepRules)
            return tuple(sig(getattr(a, f.name)) for f in dataclasses.fields(a))
        if callable(a):  # a rule inlined into the kernel: one variant per function
            return (a.__module__, a.__qualname__)
        return type(a).__name__
    return (fn.__qualname__, *(sig(a) for a in args))


def _bits_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dtype.is_floating_point:  # NaNs compare by bit pattern
            ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            return torch.equal(a.view(ints), b.view(ints))
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_bits_equal(x, y) for x, y in zip(a, b))
    return a == b


def _prefix(a, numel: int, k: int):
    """``a`` cut to the first ``k`` of ``numel`` elements: every tensor of ``numel`` elements (1-D,
    or rows of a 2-D view) in ``a``, which may be a list; everything else as it is. A cut is a
    view only where the tensor is one (the compiled graph's guards tell views from tensors)."""
    if isinstance(a, torch.Tensor) and a.dim() and a.numel() == numel:
        cut = a[:max(1, k // max(1, a[0].numel()))]
        return cut if a._base is not None else cut.clone()
    if isinstance(a, list):
        return [_prefix(x, numel, k) for x in a]
    return a


_FAILED = object()


def _try_compiled(compiled: Callable, args: tuple):
    """``compiled(*args)``, or ``_FAILED`` (logged) where compilation is impossible here."""
    global _compile_failed
    try:
        return compiled(*args)
    except Exception as e:  # no C++ compiler, unsupported device...: same results, eagerly
        _compile_failed = True
        log.warning("torch.compile failed (%s); the merge kernel runs eagerly from now on", _cause(e))
        log.debug("torch.compile's error", exc_info=True)
        return _FAILED


def _cause(e: BaseException) -> str:
    """What made a compilation fail, in one line: dynamo wraps the backend's own error (its first
    line only says which backend raised), so the innermost exception is named beside it."""
    inner, seen = e, {id(e)}
    while (nxt := getattr(inner, "inner_exception", None) or inner.__cause__) is not None and id(nxt) not in seen:
        inner = nxt
        seen.add(id(nxt))
    said = f"{type(e).__name__}: {first_line(e)}"
    return said if inner is e else f"{said} {type(inner).__name__}: {first_line(inner)}"


def run(fn: Callable, compiled: Callable, numel: int, *args, writes_first: bool = False):
    """Run the compiled version of ``fn`` for large tensors, the eager one otherwise.

    The first call of each variant is also run eagerly, on its first ``_VERIFY_NUMEL`` elements
    (``fn`` is elementwise, or reduces exactly: integer counts, maxima, fixed-point sums), and
    the bit patterns are compared: a compiler that does not keep eager rounding (an older
    inductor, FMA contraction) is caught there, logged, and that variant runs eagerly from then
    on. ``writes_first``: ``fn`` returns nothing and writes its result into ``args[0]``."""
    if numel < _COMPILE_MIN_NUMEL or _compile_failed or not _compile_enabled():
        return fn(*args)
    key = _signature(fn, args)
    if _verified.get(key) is False:
        return fn(*args)
    if key not in _verified:
        sample = tuple(_prefix(a, numel, _VERIFY_NUMEL) for a in args)
        got = _try_compiled(compiled, sample)
        if got is _FAILED:
            return fn(*args)
        if writes_first:
            got, ref = sample[0], torch.empty_like(sample[0])
            fn(ref, *sample[1:])
        else:
            ref = fn(*sample)
        _verified[key] = _bits_equal(got, ref)
        if not _verified[key]:
            log.warning("the compiled %s rounds differently from eager PyTorch on %s (torch %s); "
                        "this variant runs eagerly from now on", fn.__name__, key[1:], torch.__version__)
            return fn(*args)
    result = _try_compiled(compiled, args)
    return fn(*args) if result is _FAILED else result


@lru_cache(maxsize=None)
def compiled(fn: Callable) -> Callable:
    import torch._dynamo.config as dynamo_config

    # one compiled graph per method variant, dtype and expert count: allow more than the default 8
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 128))
    # the engine's DARE draws are float16 beside bfloat16 tensors; inductor warns of the mix but
    # still emits one vectorized loop
    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed in the scheduler node")
    _cache_per_capability()
    return torch.compile(fn, dynamic=True, options={"emulate_precision_casts": True})


def _cache_per_capability() -> None:
    """Give a process run under ``ATEN_CPU_CAPABILITY`` its own inductor cache, below the one it
    would use. Inductor's caches are not keyed on it: a kernel generated with AVX-512 vectors by
    one process is compiled without them by a pinned one (the zoo's builds run under
    ``ATEN_CPU_CAPABILITY=default``), which g++ refuses, so the merge ran eagerly."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if not capability:
        return
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # a torch that keeps it elsewhere: the shared cache, as before
        return
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir()
    leaf = f"aten-{capability}"
    if os.path.basename(os.path.normpath(base)) != leaf:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, leaf)

