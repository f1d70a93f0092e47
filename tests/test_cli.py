"""The evomerge command line, run as a user runs it."""

import subprocess
import sys

import yaml
from conftest import load_dir

from evomerge.merging.to_disk import merged_tensors
from evomerge.merging.recipe import Recipe


def run(*args):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True)


def test_merge_command(families, tmp_path):
    fam = families("bf16")
    r = {"merge_method": "dare_ties", "base_model": fam["base"],
         "models": [{"model": e, "parameters": {"weight": 0.5, "density": 0.6}} for e in fam["experts"]]}
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump(r))
    proc = run("merge", str(f), str(tmp_path / "out"), "--dtype", "float32", "--seed", "9", "--shard-size", "200K")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {tmp_path / 'out'}" in proc.stdout
    got = load_dir(tmp_path / "out")
    expected = dict(merged_tensors(Recipe.from_dict({**r, "dtype": "float32", "random_seed": 9})))
    assert got.keys() == expected.keys()
    assert all(got[k].dtype == expected[k].dtype == __import__("torch").float32 for k in got)
    assert all((got[k] == expected[k]).all() for k in got)
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1


def test_bad_recipe_exits_2_naming_file_and_key(tmp_path):
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "b", "modles": []}))
    proc = run("merge", str(f), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"evomerge: error: {f}: " in proc.stderr and "modles: unknown key" in proc.stderr
    assert not (tmp_path / "out").exists()
