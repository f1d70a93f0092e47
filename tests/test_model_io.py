"""Reading and writing model directories: shards, atomicity, pickle gating, compatibility errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from conftest import load_dir
from safetensors.torch import save_file

from evomerge.errors import ModelError
from evomerge.merging.to_disk import merge_to_disk, merged_tensors
from evomerge.merging.recipe import Recipe


def ties(fam, **extra):
    return {"merge_method": "ties", "base_model": fam["base"], **extra,
            "models": [{"model": e, "parameters": {"weight": 0.6, "density": 0.5}} for e in fam["experts"]]}


def test_sharded_output_loads_in_transformers(families, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = families("bf16")
    recipe = Recipe.from_dict(ties(fam))
    out = merge_to_disk(recipe, tmp_path / "merged", max_shard_bytes=100_000)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    expected = dict(merged_tensors(recipe))
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    sd = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(sd[k], v), k
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("w1 w2")["input_ids"] == [5, 6]
    assert (out / "generation_config.json").exists()
    assert Recipe.from_yaml(out / "evomerge_recipe.yaml") == recipe


def test_sharded_input(families, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = families("fp32")
    sharded = tmp_path / "sharded_expert"
    AutoModelForCausalLM.from_pretrained(fam["experts"][0]).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{fam['experts'][0]}/{f}", sharded / f)
    assert (sharded / "model.safetensors.index.json").exists()
    a = dict(merged_tensors(Recipe.from_dict(ties(fam))))
    r = ties(fam)
    r["models"][0]["model"] = str(sharded)
    b = dict(merged_tensors(Recipe.from_dict(r)))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_disk_leaves_no_directory_that_looks_complete(families, tmp_path):
    """A real write failure (the file-size limit makes write() fail with EFBIG, as a full disk
    would with ENOSPC) leaves neither the output directory nor its temporary twin."""
    fam = families("fp32")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(ties(fam)))
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import resource, sys
        from evomerge.cli import main
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        sys.exit(main(["merge", {str(recipe)!r}, {str(out)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "File too large" in proc.stderr
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_existing_output_is_refused_unless_overwrite(families, tmp_path):
    fam = families("fp32")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ModelError, match="exists and is not empty"):
        merge_to_disk(Recipe.from_dict(ties(fam)), out)
    with pytest.raises(ModelError, match="was not written by evomerge"):  # not ours: never replaced
        merge_to_disk(Recipe.from_dict(ties(fam)), out, overwrite=True)
    assert (out / "keep.txt").exists()
    out.joinpath("keep.txt").unlink()
    merge_to_disk(Recipe.from_dict(ties(fam)), out)  # an empty directory is taken
    (out / "stale.txt").write_text("x")
    with pytest.raises(ModelError, match="exists and is not empty"):
        merge_to_disk(Recipe.from_dict(ties(fam)), out)
    merge_to_disk(Recipe.from_dict(ties(fam)), out, overwrite=True)  # evomerge's own output: replaced
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()


def test_pickle_checkpoints_need_the_flag(families, tmp_path):
    fam = families("fp32")
    pk = tmp_path / "pickled"
    shutil.copytree(fam["experts"][1], pk)
    torch.save(load_dir(pk), pk / "pytorch_model.bin")
    (pk / "model.safetensors").unlink()
    r = ties(fam)
    r["models"][1]["model"] = str(pk)
    with pytest.raises(ModelError, match="pickle checkpoints .*--allow-pickle"):
        merge_to_disk(Recipe.from_dict(r), tmp_path / "out")
    a = dict(merged_tensors(Recipe.from_dict(r), allow_pickle=True))
    b = dict(merged_tensors(Recipe.from_dict(ties(fam))))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_incompatible_models_report_every_mismatch_at_once(families, tmp_path):
    fam = families("fp32")
    bad = tmp_path / "bad"
    shutil.copytree(fam["experts"][2], bad)
    sd = load_dir(bad)
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.2.self_attn.q_proj.weight"] = torch.zeros(32, 64)
    sd["model.extra.weight"] = torch.zeros(3)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    r = ties(fam)
    r["models"][2]["model"] = str(bad)
    with pytest.raises(ModelError) as e:
        merge_to_disk(Recipe.from_dict(r), tmp_path / "out")
    msg = str(e.value)
    assert "tensor model.layers.1.mlp.up_proj.weight: missing in" in msg
    assert "tensor model.layers.2.self_attn.q_proj.weight: shape [32, 64] in" in msg
    assert "has tensors that" in msg and "model.extra.weight" in msg
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_asks_for_tokenizer_source(families, tmp_path):
    fam = families("vocab")
    with pytest.raises(ModelError, match="model.embed_tokens.weight: .* 136 rows .* set tokenizer_source"):
        merge_to_disk(Recipe.from_dict(ties(fam)), tmp_path / "out")
    out = merge_to_disk(Recipe.from_dict(ties(fam, tokenizer_source="base")), tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").unlink(), "config.json is missing"),
    (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
    (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors, index or .safetensors files"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage"), "cannot read"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})),
     "shard files listed in model.safetensors.index.json are missing: model-00001-of-00002.safetensors"),
])
def test_broken_model_directories_are_named(damage, message, families, tmp_path):
    fam = families("fp32")
    broken = tmp_path / "broken"
    shutil.copytree(fam["experts"][0], broken)
    damage(broken)
    r = ties(fam)
    r["models"][0]["model"] = str(broken)
    with pytest.raises(ModelError, match=f"model {broken}: .*{message}"):
        merge_to_disk(Recipe.from_dict(r), tmp_path / "out")


def test_missing_model_and_offline_hub_id(tmp_path):
    r = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "nope"),
         "models": [{"model": "someorg/somemodel", "parameters": {"weight": 1}}]}
    with pytest.raises(ModelError, match="no such directory"):
        merge_to_disk(Recipe.from_dict(r), tmp_path / "out")
    r["base_model"], r["models"][0]["model"] = "someorg/somemodel", str(tmp_path / "nope")
    with pytest.raises(ModelError, match=r"someorg/somemodel: not a local directory, and not in the local Hugging Face "
                                         r"cache \(HF_HUB_OFFLINE is set: nothing is fetched\)"):
        merge_to_disk(Recipe.from_dict(r), tmp_path / "out")


def test_a_search_over_two_vocabularies_says_what_a_search_needs(families, tmp_path):
    from evomerge.config import RunConfig
    from evomerge.search.space import checked_space

    fam = families("vocab")
    cfg = RunConfig.from_dict({"models": {"base": fam["base"], "experts": fam["experts"]}, "merge_method": "ties",
                               "fitness": {"suite": "zoo-smooth"}, "budget": {"max_candidates": 2}})
    with pytest.raises(ModelError, match="136 rows .* a search needs models of one vocabulary") as e:
        checked_space(cfg)
    assert "set tokenizer_source" not in str(e.value)


def _hub_cache(home, repo: str, model_dir: str, commit: str) -> None:
    """``model_dir``'s files in a Hugging Face cache under ``home`` as ``repo`` at ``commit``, its main."""
    root = home / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(model_dir, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def test_hub_references_pin_a_revision_and_are_refused_offline_when_not_cached(tmp_path):
    """``org/name@revision`` in models: resolved from the local cache offline, its commit recorded in
    run.json; one missing from the cache is refused in one line naming it, before any run exists."""
    from evomerge.tiny import build_family

    fam = build_family(tmp_path / "family", n_experts=2)
    rows = [{"id": "a", "split": "search", "prompt": "w5 w6", "choices": ["w7", "w8"], "answer": 0},
            {"id": "b", "split": "heldout", "prompt": "w6 w5", "choices": ["w8", "w7"], "answer": 1}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    commits = {f"evotest/m{i}": f"{i + 1:040x}" for i in range(3)}
    refs = [f"evotest/m0@{commits['evotest/m0']}", "evotest/m1@main", "evotest/m2"]
    cfg = {"models": {"base": refs[0], "experts": refs[1:]}, "merge_method": "ties", "space": "global",
           "fitness": {"suite": {"name": "one", "tasks": [{"name": "one", "data": str(tmp_path / "items.jsonl"),
                                                           "kind": "multiple_choice"}]}},
           "references": False, "driver": {"name": "cma", "popsize": 4}, "budget": {"max_candidates": 2}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}

    def search(run: str):
        return subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(tmp_path / "cfg.yaml"),
                               "--run-dir", str(tmp_path / run)], capture_output=True, text=True, env=env, timeout=600)

    proc = search("refused")  # an empty cache
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("evomerge: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"model {refs[0]}: not a local directory, and not in the local Hugging Face cache (HF_HUB_OFFLINE is " \
           "set: nothing is fetched)" in errors[0]
    assert not (tmp_path / "refused").exists()

    for (repo, commit), path in zip(commits.items(), [fam["base"], *fam["experts"]]):
        _hub_cache(tmp_path / "hf", repo, path, commit)
    proc = search("run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["hub_commits"] == dict(zip(refs, commits.values()))
    with pytest.raises(ModelError, match="evotest/m1@nosuchtag: not a local directory, and not in the local"):
        from evomerge.merging.headers import resolve_model_path

        resolve_model_path("evotest/m1@nosuchtag", allow_download=False)
