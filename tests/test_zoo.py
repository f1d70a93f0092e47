"""The model zoo: real trained models on which merging matters."""

import json

from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.zoo import DATA_DIR, eval_items, load_zoo


def test_zoo_meets_its_design_goals(zoo):
    report = zoo["report"]
    assert report["experts_own_skill_min"] >= 0.9
    # near chance elsewhere: exact answers ~0, four-way multiple choice ~0.25
    for name, row in report["heldout"].items():
        if name.startswith("expert_"):
            skill = name.removeprefix("expert_")
            for task, value in row.items():
                if task != skill:
                    assert value <= (0.5 if task == "fact" else 0.05), (name, task, value)
    assert min(report["default_merge_loss"].values()) >= 0.10
    assert report["goals_met"]


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

    from evomerge.zoo import SKILLS, _training_text, world

    items = eval_items()
    held = {tuple(r["prompt"].split()[1:5]) for t in ("rev", "enc", "revenc") for r in items[t]}
    rng, w = random.Random(0), world()
    for i in range(3000):
        text = _training_text(SKILLS[i % 2], rng, w, held, random_answer=i % 3 == 0)
        assert tuple(text.split()[1:5]) not in held
