"""Reading user files: YAML with errors that name the file, pydantic errors that name the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import EvomergeError


def load_yaml(path: str | Path, error: type[EvomergeError], what: str) -> Any:
    """The parsed file, or ``error`` naming the file when it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None


M = TypeVar("M", bound=BaseModel)


def validate(cls: type[M], raw: Any, error: type[EvomergeError], where: str, what: str) -> M:
    """``raw`` validated as ``cls``, or ``error`` naming ``where`` and every key at fault."""
    if not isinstance(raw, dict):
        raise error(f"{where}: {what} must be a mapping, got {type(raw).__name__}")
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise error(f"{where}: {describe_validation(e)}") from None


def describe_validation(e: ValidationError) -> str:
    """One ``key.path: message`` per problem; pydantic's union branches and type tags dropped."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]
                       if not str(x).startswith(("function-", "list[", "union[", "dict[")))
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{loc or 'top level'}: {msg}")
    # pydantic reports one error per union branch; keep each distinct message once
    return "; ".join(dict.fromkeys(parts))
