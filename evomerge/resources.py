"""Files that ship inside the package: search-space presets and fitness suites with their data.

The repository keeps them at its root (``search_spaces/``, ``fitness/``); the build maps those
folders into the package as ``evomerge.search_spaces`` and ``evomerge.suites`` (see setup.py), and
an editable install maps the same names back to the folders. So there is one copy, found through
the import system in every kind of install.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from evomerge.errors import EvomergeError


def _folder(package: str) -> Path:
    root = resources.files(package)
    if not isinstance(root, Path):  # a zipped install: suites name their data by relative path
        raise EvomergeError(f"{package}: shipped files must be installed unzipped (found {root!r})")
    return root


def presets_dir() -> Path:
    """The folder of the shipped search-space presets (``search_spaces/`` in the repository)."""
    return _folder("evomerge.search_spaces")


def suites_dir() -> Path:
    """The folder of the shipped fitness suites and their data (``fitness/`` in the repository)."""
    return _folder("evomerge.suites")


def shipped(folder: Path) -> list[str]:
    """The names of the YAML files in a shipped folder, without their suffix."""
    return sorted(p.stem for p in folder.glob("*.yaml"))
