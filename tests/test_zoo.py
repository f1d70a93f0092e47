"""The model zoo: real trained models on which merging matters."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.machine import PINNED_ENV, vector_isa
from evomerge.zoo import (DATA_DIR, MAX_ATTEMPTS, SKILLS, ZOO_VERSION, eval_items, expert_seed, goals_met, load_zoo,
                          weights_digest)


# The tiny zoo of seed 0 as the README's Intel Xeon builds it (it meets its design goals there).
# Pinned numerics make a machine build one zoo under every setting, but not every CPU the same one:
# an AMD EPYC with AVX-512 builds dfcf166011d21d62, whose default task arithmetic loses all of rev
# in every expert attempt (README, The model zoo). Tests hold on either; the goals' figures are
# asserted for the zoo they were measured on.
DOCUMENTED_TINY = "9c830cfce1c21eb1"


def test_zoo_meets_its_design_goals(zoo):
    report = zoo["report"]
    table = report["heldout"]
    # what holds on every machine, with margins: experts learn their skill, the base has it latent
    assert report["experts_own_skill_min"] >= 0.9
    gained = [k for k in SKILLS if table[f"expert_{k}"][k] - table["base"][k] >= 0.25]
    assert report["skills_gained"] == gained and len(gained) >= 2
    for skill in SKILLS:
        assert table["base"][skill] < table[f"expert_{skill}"][skill]
    assert report["goals_met"] == goals_met(report)
    assert zoo["version"] == ZOO_VERSION and set(zoo["expert_steps"]) == set(SKILLS)
    if weights_digest(zoo) == DOCUMENTED_TINY:
        # the default merges keep some of every gained skill, and lose a real part of them: merging matters
        for merge, kept in report["default_merge_kept"].items():
            assert min(kept[k] for k in gained) >= 0.05, (merge, kept)
            assert sum(kept[k] for k in gained) / len(gained) <= 0.8, (merge, kept)
        assert report["goals_met"]


def test_design_goals_need_gained_skills_kept_in_part_and_lost_in_part():
    ok = {"experts_own_skill_min": 0.95, "skills_gained": ["rev", "enc"],
          "default_merge_kept": {"ta": {"rev": 0.5, "enc": 0.6, "fact": 3.0}, "ties": {"rev": 0.1, "enc": 0.9, "fact": 0}}}
    assert goals_met(ok)
    assert not goals_met(ok | {"experts_own_skill_min": 0.85})
    assert not goals_met(ok | {"skills_gained": ["rev"]})
    assert not goals_met(ok | {"default_merge_kept": {"ta": {"rev": 0.04, "enc": 0.9, "fact": 1}}})
    assert not goals_met(ok | {"default_merge_kept": {"ta": {"rev": 0.7, "enc": 0.95, "fact": 0}}})


def test_expert_seeds_are_retried_until_the_design_goals_hold(zoo):
    """Every attempt before the kept one missed the goals; the kept one met them; each attempt's
    seed is derived from the zoo's seed, so any machine that meets the same figures keeps the same."""
    attempts = zoo["attempts"]
    met = attempts[-1]["goals_met"]
    assert [a["goals_met"] for a in attempts] == [False] * (len(attempts) - 1) + [met]
    assert zoo["expert_attempt"] == len(attempts) - 1 <= MAX_ATTEMPTS - 1
    assert met or len(attempts) == MAX_ATTEMPTS  # missed goals: every attempt was tried, the last one kept
    assert met == zoo["report"]["goals_met"] and (met or weights_digest(zoo) != DOCUMENTED_TINY)
    assert [a["expert_seed"] for a in attempts] == [expert_seed(0, i) for i in range(len(attempts))]
    assert attempts[-1]["default_merge_kept"] == zoo["report"]["default_merge_kept"]
    assert zoo["numerics"] == PINNED_ENV


def test_zoo_build_is_bit_reproducible_whatever_the_callers_numerics(zoo, tmp_path):
    """A second build with the same seed writes the same bytes, also when started with other
    kernels and threads (as on another CPU): training runs under the pinned numerics."""
    kernels = "avx2" if vector_isa() in ("AVX2", "AVX-512") else "default"
    env = os.environ | {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": kernels, "MKL_CBWR": "AUTO"}
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(tmp_path / "again")],
                         env=env, capture_output=True, text=True)
    met = zoo["report"]["goals_met"]
    assert out.returncode == (0 if met else 1), out.stderr[-2000:]  # a zoo that misses its goals exits 1, said
    assert ("DESIGN GOALS NOT MET" in out.stdout) != met
    again = load_zoo(tmp_path / "again")
    assert _hashes(Path(again["root"])) == _hashes(Path(zoo["root"]))
    assert again["sha256"] == zoo["sha256"] and weights_digest(again) in out.stdout
    assert again["torch"] == torch.__version__ and again["report"] == zoo["report"]


def test_zoo_build_into_a_full_directory_is_one_line_and_trains_nothing(tmp_path):
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "mine.txt").write_text("not a zoo")
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(tmp_path / "z")],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"evomerge: error: output {tmp_path / 'z'}: exists and is not empty "
                                               "(pass --overwrite to replace it)"]
    assert [p.name for p in tmp_path.iterdir()] == ["z"] and (tmp_path / "z" / "mine.txt").read_text() == "not a zoo"


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
