"""Errors evomerge raises for bad input; each names the file, key or tensor at fault."""


class EvomergeError(Exception):
    """Base class of evomerge's user-facing errors."""


class RecipeError(EvomergeError):
    """A recipe (YAML or API) is invalid."""


class ModelError(EvomergeError):
    """A model directory is missing, unreadable or incompatible with the others."""


class SuiteError(EvomergeError):
    """A suite or its data is malformed; the message names the suite, file and line."""
