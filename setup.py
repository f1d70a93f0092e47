"""Packaging that pyproject.toml cannot say: the root folders search_spaces/ and fitness/ ship
inside the package as evomerge.search_spaces and evomerge.suites (one copy, in the repository)."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["evomerge", "evomerge.*"]) + ["evomerge.search_spaces", "evomerge.suites"],
    package_dir={"evomerge.search_spaces": "search_spaces", "evomerge.suites": "fitness"},
    package_data={"evomerge.search_spaces": ["*.yaml"], "evomerge.suites": ["*.yaml", "data/*/*.jsonl"]},
)
