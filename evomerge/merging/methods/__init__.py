"""The merge-method registry. A method is one module here (its parameters, its sparsifier and its
tensor merge, see :mod:`.base`) plus its line in ``MODULES``; recipe validation, search-space
bounds, the engine, the merge to disk, the tests and the README's table all read ``METHODS``."""

from __future__ import annotations

from evomerge.errors import RecipeError
from evomerge.merging.methods import breadcrumbs, dare, della, linear, slerp, task_arithmetic, ties
from evomerge.merging.methods.base import MergeMethod, Param

MODULES = (task_arithmetic, ties, dare, breadcrumbs, della, linear, slerp)


def _registry(methods: list[MergeMethod]) -> dict[str, MergeMethod]:
    """Methods by name; a name given twice is refused (one would silently replace the other)."""
    out: dict[str, MergeMethod] = {}
    for m in methods:
        if m.name in out:
            raise RecipeError(f"merge methods: two methods are named {m.name!r}")
        out[m.name] = m
    return out


METHODS: dict[str, MergeMethod] = _registry([m for module in MODULES for m in module.METHODS])


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            f"merge_method: unknown method {name!r}; known: {', '.join(sorted(METHODS))}"
        ) from None


def _param_text(p: Param) -> str:
    if p.flag:
        return p.name
    bits = [f"default {p.default:g}"] if p.default is not None else []
    if p.bounds is not None:
        bits.append(f"searched in [{p.bounds[0]:g}, {p.bounds[1]:g}]" + ("" if p.searched else " when asked"))
    return f"{p.name} ({', '.join(bits)})" if bits else p.name


def methods_table() -> str:
    """The README's table of merge methods, from the registry."""
    rows = ["| method | what it does | per-model parameters | global parameters | base model |",
            "|---|---|---|---|---|"]
    for m in METHODS.values():
        rows.append(f"| `{m.name}` | {m.summary} | {', '.join(_param_text(p) for p in m.model) or '-'} | "
                    f"{', '.join(_param_text(p) for p in m.globals_) or '-'} | {'needed' if m.needs_base else 'none'} |")
    return "\n".join(rows)


__all__ = ["METHODS", "MergeMethod", "Param", "get_method", "methods_table"]
