"""Fitness suites and backends on the trained zoo: native equals lm-eval, items are fixed, bad
input is named, broken candidates fail cleanly."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import item_map, same_items
from evomerge.errors import SuiteError
from evomerge.fitness.base import get_backend
from evomerge.fitness.suite import Suite
from evomerge.fitness.native import NativeBackend

ZOO_TASKS = ("rev", "enc", "fact")


@pytest.fixture(scope="module")
def suite():
    return Suite.load("zoo")


@pytest.mark.parametrize("name", ["rev", "fact"])
def test_native_equals_lm_eval(name, suite, zoo_model):
    """Same items, same metrics, same per-item correctness (and the same generations)."""
    model, tok = zoo_model(name)
    native = get_backend("native").score(model, tok, suite)
    lm = get_backend("lm-eval", batch_size=16).score(model, tok, suite)
    assert native.failed is None and lm.failed is None
    assert native.fitness == pytest.approx(lm.fitness, abs=1e-12)
    for task in ZOO_TASKS:
        a, b = native.tasks[task], lm.tasks[task]
        for metric, value in b.metrics.items():
            assert a.metrics[metric] == pytest.approx(value, abs=1e-12), (task, metric)
        assert [(i.id, i.correct, i.output) for i in a.items] == [(i.id, i.correct, i.output) for i in b.items]
    assert native.tasks[name].value >= 0.9  # the expert's own skill


def test_heldout_split_matches_lm_eval_too(suite, zoo_model):
    model, tok = zoo_model("enc")
    native = get_backend("native").score(model, tok, suite, split="heldout")
    lm = get_backend("lm-eval").score(model, tok, suite, split="heldout")
    assert native.fitness == pytest.approx(lm.fitness, abs=1e-12)
    assert len(native.tasks["rev"].items) == 120  # every held-out item (no n_heldout)


def test_subsample_is_seeded_fixed_and_from_the_search_split(suite):
    task = suite.task("rev")
    first, again = task.items("search"), task.items("search")
    assert [i.id for i in first] == [i.id for i in again] and len(first) == 40
    assert [i.index for i in first] == sorted(i.index for i in first)
    heldout = {i.id for i in task.items("heldout")}
    assert not heldout & {i.id for i in first}
    other = Suite.from_dict({"tasks": [{**task.spec.model_dump(), "seed": 1}]}, source=suite.source)
    assert [i.id for i in other.tasks[0].items("search")] != [i.id for i in first]
    # subsample: first takes the split's first n items in file order, whatever the seed
    head = Suite.from_dict({"tasks": [{**task.spec.model_dump(), "subsample": "first", "seed": 5}]},
                           source=suite.source).tasks[0]
    search = task.items("search")
    everything = Suite.from_dict({"tasks": [{**task.spec.model_dump(), "n": None, "seed": 5}]},
                                 source=suite.source).tasks[0]
    assert [i.id for i in head.items("search")] == [i.id for i in everything.items("search")][:40] != \
        [i.id for i in search]
    assert head.lm_eval_indices(1000, "search") == everything.lm_eval_indices(1000, "search")[:40]


def test_scores_are_reproducible_and_per_item(suite, zoo_model):
    model, tok = zoo_model("fact")
    backend = NativeBackend(batch_size=7)  # odd batches: same numbers
    a, b = backend.score(model, tok, suite), NativeBackend().score(model, tok, suite)
    assert a.fitness == b.fitness
    assert [i.value for i in a.tasks["fact"].items] == pytest.approx([i.value for i in b.tasks["fact"].items])
    assert a.fitness == pytest.approx((a.tasks["rev"].value + a.tasks["enc"].value + a.tasks["fact"].value) / 3)
    assert a.to_dict()["tasks"]["fact"]["items"][0].keys() == {"id", "correct", "value", "output"}


def test_smooth_suite_ranks_experts_on_their_skill(zoo_model):
    smooth = Suite.load("zoo-smooth")
    scorer = NativeBackend()
    base, btok = zoo_model("base")
    rev, rtok = zoo_model("rev")
    s_base, s_rev = scorer.score(base, btok, smooth), scorer.score(rev, rtok, smooth)
    assert s_rev.tasks["rev"].value > s_base.tasks["rev"].value + 1.0  # log-prob per token
    assert s_rev.tasks["rev"].value <= 0
    fact, ftok = zoo_model("fact")
    assert scorer.score(fact, ftok, smooth).tasks["fact"].value > 1.0  # margin over the best wrong choice


def test_non_finite_logits_fail_the_candidate_with_a_reason(suite, zoo_model):
    model, tok = zoo_model("base")
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    for backend in ("native", "lm-eval"):
        result = get_backend(backend).score(model, tok, suite)
        assert result.fitness is None, backend
        assert "non-finite" in result.failed, backend


# -- bad input ----------------------------------------------------------------------------------

def write_suite(tmp_path, task: dict, lines: list[str] | None = None):
    if lines is not None:
        (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    f = tmp_path / "s.yaml"
    f.write_text(json.dumps({"name": "s", "tasks": [{"name": "t", "data": "data.jsonl", **task}]}))
    return f


GOOD = '{"split": "search", "prompt": "fact e0 ->", "choices": ["v1", "v2"], "answer": 0}'


@pytest.mark.parametrize("task,lines,match", [
    ({"kind": "multiple_choice"}, None, r"suite s, task t: data file .*data.jsonl does not exist"),
    ({"kind": "multiple_choice"}, [GOOD, "{not json"], r"data.jsonl, line 2: not valid JSON"),
    ({"kind": "multiple_choice"}, [GOOD, '{"split": "search", "prompt": "x"}'], r"line 2: missing key\(s\) answer, choices"),
    ({"kind": "multiple_choice"}, [GOOD.replace('"answer": 0', '"answer": 5')], r"line 1: answer must be the index"),
    ({"kind": "multiple_choice"}, [GOOD.replace("search", "train")], r"line 1: split 'train' is not one of"),
    ({"kind": "generate", "answer_regex": "([a-"}, [GOOD], r"tasks.0.answer_regex: .*does not compile"),
    ({"kind": "generate", "metric": "acc"}, [GOOD], r"metric 'acc' does not apply to kind 'generate'"),
    ({"kind": "multiple_choice", "bogus": 1}, [GOOD], r"tasks.0.bogus: Extra inputs"),
    ({"kind": "generate", "metric": "greedy"}, [GOOD], r"metric greedy is read teacher-forced: set teacher_forced"),
    ({"kind": "multiple_choice", "metric": "greedy", "teacher_forced": True}, [GOOD],
     r"metric 'greedy' does not apply to kind 'multiple_choice'"),
    ({"kind": "generate", "metric": "exact_match", "teacher_forced": True}, [GOOD],
     r"teacher_forced applies to metric margin or greedy on a generate task"),
])
def test_bad_suites_name_the_suite_file_and_line(tmp_path, task, lines, match):
    f = write_suite(tmp_path, task, lines)
    with pytest.raises(SuiteError, match=match):
        s = Suite.load(f)
        s.tasks[0].items("search")


def test_teacher_forced_greedy_is_generated_exact_match_without_generating(suite, zoo_model):
    """``metric: greedy`` scores an item right exactly where greedy generation gives its answer,
    and the margin's side metric is the same share; lm-eval and vLLM refuse it in one line."""
    spec = suite.tasks[0].spec.model_dump()  # rev: four letters reversed, exact match by generation
    variants = Suite.from_dict({"name": "variants", "tasks": [
        {**spec, "name": "generated"},
        {**spec, "name": "margin", "metric": "margin", "teacher_forced": True},
        {**spec, "name": "greedy", "metric": "greedy", "teacher_forced": True}]}, source=suite.source)
    for name in ("rev", "enc"):  # the rev expert is right on most items, the enc expert on few
        model, tok = zoo_model(name)
        got = NativeBackend().score(model, tok, variants).tasks
        generated = [i.correct for i in got["generated"].items]
        assert [i.correct for i in got["greedy"].items] == generated
        assert [i.value for i in got["greedy"].items] == [float(c) for c in generated]
        assert got["greedy"].value == got["margin"].metrics["greedy"] == got["generated"].value
        assert got["margin"].value < 0 and got["greedy"].value != got["margin"].value
    assert 0.5 < NativeBackend().score(*zoo_model("rev"), variants).tasks["greedy"].value
    with pytest.raises(SuiteError, match="task greedy: metric greedy on a generate task is computed by the native"):
        get_backend("lm-eval").score(*zoo_model("rev"), Suite.from_dict(
            {"name": "g", "tasks": [variants.tasks[2].spec.model_dump()]}, source=suite.source))


def test_unknown_lm_eval_task_is_named(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\ntasks:\n  - {name: x, lm_eval: no_such_task_anywhere, metric: acc}\n")
    with pytest.raises(SuiteError, match="task x: lm-eval task .no_such_task_anywhere. is not known to lm-eval"):
        get_backend("lm-eval").task_dict(Suite.load(f))


def test_an_unreadable_lm_eval_task_and_a_tokenizer_without_pad_are_named(tmp_path, zoo_model):
    """A registry task whose data set is not cached, offline, is named in one line (by the native
    scorer, which reads lm-eval tasks' documents too, as by the lm-eval backend)."""
    model, tok = zoo_model("base")
    f = tmp_path / "s.yaml"
    f.write_text("name: s\ntasks:\n  - {name: x, lm_eval: arc_easy, metric: acc}\n")
    for backend in (NativeBackend(), get_backend("lm-eval")):
        with pytest.raises(SuiteError, match=r"^lm-eval could not load task\(s\) 'arc_easy': ") as e:
            backend.score(model, tok, Suite.load(f))
        assert "\n" not in str(e.value)
    tok = type(tok).from_pretrained(tok.name_or_path)
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(SuiteError, match="neither a pad nor an EOS token"):
        NativeBackend().score(model, tok, Suite.load("zoo"))


def test_unknown_suite_lists_shipped_ones():
    with pytest.raises(SuiteError, match="shipped suites: .*zoo"):
        Suite.load("no-such-suite")


def test_shipped_suites_parse():
    from evomerge.fitness.suite import SUITES_DIR

    names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    assert {"zoo", "zoo-smooth", "zoo-composed", "gsm8k", "arc-challenge", "mmlu-stem-mini"} <= set(names)
    for n in names:
        Suite.load(n)


# -- the command line -----------------------------------------------------------------------------

def test_eval_command_writes_json(zoo, tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", zoo["experts"]["fact"], "--suite", "zoo",
                           "--split", "heldout", "--json", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "fitness" in proc.stdout
    result = json.loads(out.read_text())
    assert result["split"] == "heldout" and result["tasks"]["fact"]["value"] >= 0.9
    assert len(result["tasks"]["fact"]["items"]) == 24


def test_eval_command_reports_bad_input(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", str(tmp_path / "missing"), "--suite", "zoo"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "cannot be loaded" in proc.stderr


# -- vLLM (the CPU build here and in CI: make setup-vllm) ------------------------------------------

@pytest.fixture(scope="module")
def vllm_backend(vllm_family):
    """One engine for the module's tests."""
    return get_backend("vllm", model_dir=vllm_family["base"], dtype="float32", engine={"max_model_len": 256})


def test_vllm_equals_native_item_by_item(suite, vllm_family, vllm_backend):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_family["base"])
    native = get_backend("native")
    seen = []
    for path in [vllm_family["experts"][0], vllm_family["base"], vllm_family["experts"][0]]:  # swapped in place
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        v, n = vllm_backend.score(model, tok, suite), native.score(model, tok, suite)
        assert v.failed is None and n.failed is None
        same_items(v, n)  # correctness, generated text and metric value of every item
        seen.append(item_map(v))
    assert seen[0] != seen[1]  # the weights did change between candidates
    assert seen[0] == seen[2]  # and nothing of the previous candidate survives (prefix cache reset)


def test_vllm_scores_the_trained_zoo_as_native_does(suite, zoo, zoo_model, vllm_available):
    """The zoo has head_dim 32, as vLLM's CPU attention needs: its trained experts run in vLLM."""
    backend = get_backend("vllm", model_dir=zoo["base"], dtype="float32", engine={"max_model_len": 64})
    for skill in ("rev", "enc"):
        model, tok = zoo_model(skill)
        v, n = backend.score(model, tok, suite), get_backend("native").score(model, tok, suite)
        same_items(v, n)
        assert v.tasks[skill].value >= 0.9


CHAT = ("{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}</s> {% endif %}")


def test_lm_eval_options_reach_the_vllm_and_lm_eval_backends_alike(tmp_path, suite, vllm_family, vllm_backend):
    """num_fewshot, a chat template with a system instruction, and gen_kwargs: the vllm backend
    builds the same requests as lm-eval's HF model, and they change what is scored."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = tmp_path / "chat"
    shutil.copytree(vllm_family["experts"][1], chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = CHAT
    tok.save_pretrained(chat)
    tok = AutoTokenizer.from_pretrained(chat)
    model = AutoModelForCausalLM.from_pretrained(chat).eval()
    options = {"num_fewshot": 2, "apply_chat_template": True, "fewshot_as_multiturn": True,
               "system_instruction": "w1 w2", "gen_kwargs": {"max_gen_toks": 1}}
    v = get_backend("vllm", model_dir=str(chat), engine={"max_model_len": 256}, options=options).score(model, tok, suite)
    h = get_backend("lm-eval", options=options).score(model, tok, suite)
    same_items(v, h)
    assert all(len(tok.encode(it.output, add_special_tokens=False)) <= 1 for it in v.tasks["rev"].items)
    plain = item_map(vllm_backend.score(model, tok, suite))
    assert any(plain[k][1] != x[1] for k, x in item_map(v).items() if k[0] == "fact")  # other contexts


def test_few_shot_examples_of_local_tasks_come_from_the_search_split(suite):
    from evomerge.fitness.lmeval import LmEvalBackend, _task_name

    tasks = LmEvalBackend(options={"num_fewshot": 3}).task_dict(suite)
    task = suite.tasks[0]
    lm_task = tasks[_task_name(task)]
    docs = list(lm_task.eval_docs)
    heldout = [d for d in docs if d["split"] == "heldout"]
    search = [d for d in docs if d["split"] == "search"]
    assert heldout and search
    for doc in heldout[:3] + search[:3]:
        shots = lm_task.sampler.sample(3, eval_doc=doc)
        assert len(shots) == 3 and all(s["split"] == "search" and s != doc for s in shots)


def test_vllm_with_two_tensor_parallel_cpu_workers(suite, vllm_family):
    """Workers in other processes: the merged tensors are sent to them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_family["base"])
    model = AutoModelForCausalLM.from_pretrained(vllm_family["experts"][0]).eval()
    backend = get_backend("vllm", model_dir=vllm_family["base"], engine={"max_model_len": 256,
                                                                          "tensor_parallel_size": 2})
    same_items(backend.score(model, tok, suite), get_backend("native").score(model, tok, suite))


def test_eval_command_with_the_vllm_backend(tmp_path, suite, vllm_family):
    """`evomerge eval --backend vllm` streams the model's files into the engine: no transformers model."""
    out = {}
    for backend in ("vllm", "native"):
        proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", vllm_family["experts"][1], "--suite", "zoo",
                               "--backend", backend, "--json", str(tmp_path / f"{backend}.json")],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[backend] = json.loads((tmp_path / f"{backend}.json").read_text())
    v, n = out["vllm"]["tasks"], out["native"]["tasks"]
    assert v.keys() == n.keys()
    for task in v:  # every item's correctness, output and metric value, and the task's metric
        assert v[task]["items"] == n[task]["items"] and v[task]["value"] == n[task]["value"], task
