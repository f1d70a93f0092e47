"""The model zoo: real trained models on which merging matters."""

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import DATA_DIR, SKILLS, ZOO_VERSION, build_zoo, eval_items, load_zoo


def test_zoo_meets_its_design_goals(zoo):
    report = zoo["report"]
    assert report["experts_own_skill_min"] >= 0.9
    # the default merges keep some of every skill, not all of it: merging matters
    for merge, kept in report["default_merge_kept"].items():
        assert min(kept.values()) >= 0.05, (merge, kept)
        assert sum(kept.values()) / len(kept) <= 0.9, (merge, kept)
    # the base has the skills latent: it is below every expert on the expert's skill
    for skill in SKILLS:
        assert report["heldout"]["base"][skill] < report["heldout"][f"expert_{skill}"][skill]
    assert report["goals_met"]
    assert zoo["version"] == ZOO_VERSION and set(zoo["expert_steps"]) == set(SKILLS)


def test_zoo_build_is_bit_reproducible(zoo, tmp_path):
    """A second build with the same seed on this torch build writes the same bytes."""
    again = build_zoo(tmp_path / "again", size="tiny", seed=0)
    assert _hashes(Path(again["root"])) == _hashes(Path(zoo["root"]))
    assert again["torch"] == torch.__version__ and again["report"] == zoo["report"]


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


def test_experts_are_low_rank_updates_of_the_decoder(zoo):
    """Each expert differs from the base by a rank-``lora_rank`` update on every decoder linear
    layer, and nowhere else (embeddings, norms and the LM head are the base's)."""
    from safetensors.torch import load_file

    base = load_file(str(Path(zoo["base"]) / "model.safetensors"))
    rank = zoo["config"]["lora_rank"]
    for skill, path in zoo["experts"].items():
        expert = load_file(str(Path(path) / "model.safetensors"))
        assert expert.keys() == base.keys()
        for name, w in expert.items():
            delta = (w - base[name]).double()
            if ".layers." in name and name.endswith("proj.weight"):
                assert 0 < int(torch.linalg.matrix_rank(delta, rtol=1e-4)) <= rank, (skill, name)
            else:
                assert torch.equal(w, base[name]), (skill, name)


def test_zoo_models_load_with_transformers_and_round_trip(zoo, tmp_path):
    manifest = load_zoo(zoo["root"])
    assert manifest["experts"] == zoo["experts"]
    for path in [zoo["base"], *zoo["experts"].values()]:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.vocab_size == len(tok)
        ids = tok("rev a b c d ->").input_ids
        assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "rev a b c d ->"
        assert tok.pad_token_id is not None


def test_shipped_eval_data_is_what_the_world_generates():
    for task, rows in eval_items().items():
        lines = (DATA_DIR / f"{task}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == rows, task
    rev = eval_items()["rev"]
    assert {r["split"] for r in rev} == {"search", "heldout"}
    prompts = [r["prompt"] for r in rev]
    assert len(prompts) == len(set(prompts))


def test_training_never_sees_an_evaluation_sequence():
    import random

    from evomerge.zoo import GENERIC, _training_text, world

    items = eval_items()
    held = {tuple(r["prompt"].split()[1:5]) for t in ("rev", "enc", "revenc") for r in items[t]}
    rng, w = random.Random(0), world()
    tasks = ("rev", "enc") + GENERIC
    for i in range(4000):
        text = _training_text(tasks[i % len(tasks)], rng, w, held)
        symbols = tuple(text.split(" -> ")[0].split()[1:])
        assert 3 <= len(symbols) <= 5 and symbols not in held, text
