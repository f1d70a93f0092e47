"""Reading user files: YAML with errors that name the file, pydantic errors that name the key."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from evomerge.errors import EvomergeError


def load_yaml(path: str | Path, error: type[EvomergeError], what: str) -> Any:
    """The parsed file, or ``error`` naming the file when it is missing or not YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(read_text(path, error, what))
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply") from None


def read_text(path: str | Path, error: type[EvomergeError], what: str) -> str:
    """A UTF-8 text file, or ``error`` naming it when it is missing, unreadable or not text."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, not a {what} file") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


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
        loc = ".".join(key_text(x) for x in err["loc"]
                       if not str(x).startswith(("function-", "list[", "union[", "dict[")))
        msg = "unknown key" if err["type"] == "extra_forbidden" else " ".join(str(err["msg"]).split())
        msg = msg.removeprefix("Value error, ")  # a validator's own message needs no pydantic tag
        parts.append(f"{loc or 'top level'}: {msg}")
    # pydantic reports one error per union branch; keep each distinct message once
    return "; ".join(dict.fromkeys(parts))


def key_text(key: Any) -> str:
    """A key as written in a message: quoted when it is empty or holds spaces or control characters."""
    text = str(key)
    return text if text and text.isprintable() and " " not in text else repr(text)


def file_sha256(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
