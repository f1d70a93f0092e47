"""Errors evomerge raises for bad input; each names the file, key or tensor at fault."""


class EvomergeError(Exception):
    """Base class of evomerge's user-facing errors."""


def first_line(e: BaseException) -> str:
    """An exception's message, first line only (library messages can run to pages)."""
    text = str(e).strip().splitlines()
    return text[0] if text else ""


def one_line(e: BaseException, limit: int = 400) -> str:
    """An exception as one line: its type and its message with whitespace folded, cut at ``limit``."""
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:limit]


def names_that(registry: dict, capability: str) -> str:
    """For messages: the names of a registry's entries (backends, drivers) whose ``capability``
    flag is set, joined with "and"."""
    return " and ".join(n for n, e in registry.items() if getattr(e, capability)) or "none"


class RecipeError(EvomergeError):
    """A recipe (YAML or API) is invalid."""


class ModelError(EvomergeError):
    """A model directory is missing, unreadable or incompatible with the others."""


class SuiteError(EvomergeError):
    """A suite or its data is malformed; the message names the suite, file and line."""
