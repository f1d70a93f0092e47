"""lm-eval tasks from the user's own YAML (include), the test-set guard (search_split) and the
fingerprint of included task files. The tasks are written here: a generate_until task from a
directory (with a template it includes and a !function module), a multiple_choice task from one
file, and a generate_until task scored on a custom metric function."""

import json
import re
from pathlib import Path

import pytest

from conftest import same_items
from evomerge.errors import SuiteError
from evomerge.fitness.base import get_backend
from evomerge.fitness.lmeval_tasks import Resolver, check_tasks
from evomerge.fitness.suite import Suite
from evomerge.search.fingerprint import FileHashes, changes, fingerprint
from evomerge.zoo import family

TEMPLATE = """\
output_type: generate_until
dataset_path: json
doc_to_text: prompt
doc_to_target: answer
generation_kwargs: {until: ["."], max_gen_toks: 6, do_sample: false}
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true}
filter_list:
  - name: extract
    filter:
      - {function: regex, regex_pattern: "([a-l](?: [a-l])*)", group_select: 0}
      - {function: take_first}
"""

REV = """\
include: _template.yaml
task: my_rev
dataset_kwargs:
  data_files: {validation: ../data/rev_search.jsonl, test: ../data/rev_heldout.jsonl}
validation_split: validation
test_split: test
process_docs: !function helpers.keep_all
"""

HELPERS = """\
def keep_all(dataset):
    return dataset


def same_first_letter(references, predictions):
    return float(bool(predictions[0]) and predictions[0][:1] == references[0][:1])
"""

FACT = """\
task: my_fact
output_type: multiple_choice
dataset_path: json
dataset_kwargs:
  data_files: {validation: data/fact_search.jsonl, test: data/fact_heldout.jsonl}
validation_split: validation
test_split: test
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""

LETTER = """\
include: _template.yaml
task: my_letter
dataset_kwargs:
  data_files: {test: ../data/rev_heldout.jsonl}
test_split: test
filter_list:
  - name: none
    filter: [{function: take_first}]
metric_list:
  - {metric: !function helpers.same_first_letter, aggregation: mean, higher_is_better: true}
"""


def _split(src: Path, out: Path) -> None:
    """The zoo task's JSONL as two lm-eval data files, search and held-out, in file order."""
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    for split in ("search", "heldout"):
        (out / f"{src.stem}_{split}.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows if r["split"] == split))


@pytest.fixture
def user_tasks(tmp_path) -> Path:
    """A suite directory holding the user's task YAML (tasks/ and fact.yaml) and their data."""
    zoo = Suite.load("zoo")
    (tmp_path / "data").mkdir()
    for name in ("rev", "fact"):
        _split(zoo.task(name).path, tmp_path / "data")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "_template.yaml").write_text(TEMPLATE)
    (tasks / "my_rev.yaml").write_text(REV)
    (tasks / "my_letter.yaml").write_text(LETTER)
    (tasks / "helpers.py").write_text(HELPERS)
    (tmp_path / "fact.yaml").write_text(FACT)
    return tmp_path


def _suite(root: Path, tasks: list[dict]) -> Suite:
    (root / "suite.yaml").write_text(json.dumps({"name": "mine", "tasks": tasks}))
    return Suite.load(root / "suite.yaml")


REV_TASK = {"name": "rev", "lm_eval": "my_rev", "include": "tasks", "metric": "exact_match", "filter": "extract",
            "n": 40, "search_split": "validation"}
FACT_TASK = {"name": "fact", "lm_eval": "my_fact", "include": "fact.yaml", "metric": "acc", "n": 20,
             "search_split": "validation"}


def test_included_tasks_score_as_the_same_local_tasks(user_tasks, zoo_model):
    """A generate_until task from a directory and a multiple_choice task from a file, searched on
    their validation split and held out on their test split, score the same items as the zoo's
    local tasks do natively, item by item, from any working directory."""
    model, tok = zoo_model("rev")
    mine = _suite(user_tasks, [REV_TASK, FACT_TASK])
    zoo = Suite.load("zoo")
    backend = get_backend("lm-eval", batch_size=16)
    for split in ("search", "heldout"):
        lm, native = backend.score(model, tok, mine, split), get_backend("native").score(model, tok, zoo, split)
        assert lm.failed is None
        for name in ("rev", "fact"):
            a, b = lm.tasks[name], native.tasks[name]
            assert len(a.items) == len(b.items) == len(zoo.task(name).items(split))
            assert [(i.correct, i.output) for i in a.items] == [(i.correct, i.output) for i in b.items], (split, name)
            assert a.value == pytest.approx(b.value, abs=1e-12)
    assert lm.tasks["rev"].value >= 0.9  # the rev expert on its own skill, held out


def test_native_scores_included_tasks_as_lm_eval_does(user_tasks, zoo_model):
    """The native scorer on the same lm-eval tasks (lm-eval's zero-shot prompts, its regex filter
    and stop strings read from the task YAML): item by item as the lm-eval backend, both splits."""
    model, tok = zoo_model("fact")
    mine = _suite(user_tasks, [REV_TASK, FACT_TASK])
    for split in ("search", "heldout"):
        native, lm = get_backend("native").score(model, tok, mine, split), get_backend("lm-eval").score(
            model, tok, mine, split)
        assert native.failed is None and lm.failed is None
        same_items(native, lm, tol=1e-9)
        assert native.tasks["fact"].metrics["acc_norm"] == pytest.approx(lm.tasks["fact"].metrics["acc_norm"])
    assert native.tasks["fact"].value >= 0.9  # the fact expert on its own skill, held out


FEWSHOT = REV.replace("task: my_rev", "task: my_rev_3shot") + "num_fewshot: 3\nfewshot_split: validation\n"
OTHER_FILTER = REV.replace("task: my_rev", "task: my_rev_lower") + """\
filter_list:
  - name: lower
    filter: [{function: lowercase}, {function: take_first}]
"""
PUNCT = REV.replace("task: my_rev", "task: my_rev_punct") + """\
metric_list:
  - {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_punctuation: true}
"""


@pytest.mark.parametrize("task,why", [
    ({"lm_eval": "my_letter", "metric": "same_first_letter"}, "on metric 'same_first_letter' (it computes exact_match)"),
    ({"lm_eval": "my_rev_3shot", "metric": "exact_match"}, "with few-shot examples"),
    ({"lm_eval": "my_rev_lower", "metric": "exact_match", "filter": "lower"},
     "with filter 'lower' (lowercase then take_first)"),
    ({"lm_eval": "my_rev_punct", "metric": "exact_match"}, "with exact_match options ignore_punctuation"),
    ({"lm_eval": "my_rev", "metric": "exact_match", "filter": "strict"}, "which has no filter 'strict'"),
])
def test_native_refuses_only_what_it_cannot_score_as_lm_eval_does(user_tasks, task, why):
    from evomerge.fitness.native import NativeBackend

    for name, text in (("my_rev_3shot", FEWSHOT), ("my_rev_lower", OTHER_FILTER), ("my_rev_punct", PUNCT)):
        (user_tasks / "tasks" / f"{name}.yaml").write_text(text)
    suite = _suite(user_tasks, [{"name": "x", "include": "tasks", **task}])
    with pytest.raises(SuiteError, match=re.escape(f"task x: the native scorer cannot score lm-eval task "
                                                   f"{task['lm_eval']!r}, {why} (use fitness.backend lm-eval or vllm)")):
        NativeBackend().items(suite.tasks[0], "search")


def test_native_reads_an_lm_eval_tasks_items_as_lm_eval_builds_them(user_tasks, monkeypatch):
    """No model needed: the prompts, choices, delimiter and answers the native scorer takes from an
    included task's documents are the zoo's local items (the YAML mirrors the local tasks). The
    suite's lm-eval tasks are loaded together, once per split role."""
    from evomerge.fitness import lmeval_tasks
    from evomerge.fitness.native import NativeBackend

    loads = []
    real_load = lmeval_tasks.load
    monkeypatch.setattr(lmeval_tasks, "load", lambda entries, resolver: loads.append(len(entries)) or
                        real_load(entries, resolver))
    mine, zoo = _suite(user_tasks, [REV_TASK, FACT_TASK]), Suite.load("zoo")
    native = NativeBackend()
    for name in ("rev", "fact"):
        for split in ("search", "heldout"):
            items, how = native.items(mine.task(name), split)
            local = zoo.task(name).items(split)
            assert [(i.prompt, i.answer, i.choices) for i in items] == [(i.prompt, i.answer, i.choices) for i in local]
            assert how == (zoo.task(name).scoring if name == "fact" else
                           zoo.task(name).scoring.__class__("generate", "exact_match", (".",), 6,
                                                            "([a-l](?: [a-l])*)", False))
    assert loads == [2, 2]  # both tasks in one load for the search (validation) split, one for held-out


def test_a_custom_metric_function(user_tasks, zoo_model):
    """A generate_until task scored on a metric the user's module defines (no process_results)."""
    model, tok = zoo_model("rev")
    mine = _suite(user_tasks, [{"name": "letter", "lm_eval": "my_letter", "include": "tasks",
                                "metric": "same_first_letter", "n": 30}])
    result = get_backend("lm-eval", batch_size=16).score(model, tok, mine)
    task = result.tasks["letter"]
    assert result.failed is None and task.metric == "same_first_letter" and len(task.items) == 30
    rows = [json.loads(line) for line in (user_tasks / "data" / "rev_heldout.jsonl").read_text().splitlines()]
    answers = {f"letter-{i}": r["answer"] for i, r in enumerate(rows)}
    assert [i.correct for i in task.items] == [i.output[:1] == answers[i.id][:1] for i in task.items]
    assert task.value == pytest.approx(sum(i.correct for i in task.items) / 30) and task.value >= 0.8
    wrong = _suite(user_tasks, [{"name": "letter", "lm_eval": "my_letter", "include": "tasks", "n": 2,
                                 "metric": "same_first_letter", "filter": "extract"}])
    with pytest.raises(SuiteError, match=r"task letter: lm-eval task 'my_letter' has no filter 'extract' \(it has: none\)"):
        get_backend("lm-eval").score(model, tok, wrong)


def test_vllm_scores_included_tasks_as_lm_eval_does(user_tasks, vllm_family):
    """The vllm backend on the same included tasks, both splits: item by item as lm-eval's HF model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(vllm_family["base"])
    model = AutoModelForCausalLM.from_pretrained(vllm_family["experts"][0]).eval()
    mine = _suite(user_tasks, [REV_TASK, FACT_TASK])
    vllm = get_backend("vllm", model_dir=vllm_family["base"], dtype="float32", engine={"max_model_len": 256})
    for split in ("search", "heldout"):
        v, lm = vllm.score(model, tok, mine, split), get_backend("lm-eval").score(model, tok, mine, split)
        assert v.failed is None and lm.failed is None
        same_items(v, lm)


def test_edited_task_files_are_named_in_the_fingerprint(user_tasks, tmp_path, zoo):
    from evomerge.config import RunConfig

    cfg = RunConfig.model_validate({"models": {"base": zoo["base"], "experts": [zoo["experts"]["rev"]]},
                                    "fitness": {"suite": str(user_tasks / "suite.yaml"), "backend": "lm-eval"},
                                    "merge_method": "ties", "budget": {"max_candidates": 2}})
    mine = _suite(user_tasks, [REV_TASK, FACT_TASK])
    hashes = FileHashes(tmp_path / "hashes.json")
    before = fingerprint(cfg, mine, hashes)
    assert {"rev (my_rev.yaml)", "rev (_template.yaml)", "rev (helpers.py)", "fact (fact.yaml)",
            "fact (data/fact_search.jsonl)", "fact (data/fact_heldout.jsonl)"} <= set(before["suite"])
    data = user_tasks / "data" / "rev_search.jsonl"
    data.write_text(data.read_text().replace('"a a k c"', '"a a k d"'))
    (user_tasks / "tasks" / "_template.yaml").write_text(TEMPLATE.replace("max_gen_toks: 6", "max_gen_toks: 7"))
    assert changes(before, fingerprint(cfg, _suite(user_tasks, [REV_TASK, FACT_TASK]), hashes)) == [
        f"suite task rev ({data})", "suite task rev (_template.yaml)"]


@pytest.mark.parametrize("task,match", [
    ({"name": "x", "lm_eval": "nope", "include": "tasks"},
     r"task x: lm-eval task 'nope' is not known in .*tasks \(it defines: my_letter, my_rev\)"),
    ({"name": "x", "lm_eval": "nope", "include": "fact.yaml"}, r"fact.yaml defines lm-eval task 'my_fact', not 'nope'"),
    ({"name": "x", "lm_eval": "my_rev", "include": "no/such"}, r"task x: include .*no/such does not exist"),
    ({"name": "x", "data": "data/rev_search.jsonl", "kind": "generate", "metric": "exact_match",
      "include": "tasks"}, r"'include' applies to an lm-eval task"),
    ({"name": "x", "lm_eval": "my_letter", "include": "tasks", "search_split": "validation"},
     r"task x: search_split validation: lm-eval task 'my_letter' has no validation_split"),
    ({"name": "x", "lm_eval": "my_rev", "include": "tasks", "search_split": "train"},
     r"search_split train: lm-eval task 'my_rev' has no training_split"),
])
def test_bad_included_tasks_are_refused_in_one_line(user_tasks, task, match):
    with pytest.raises(SuiteError, match=match) as e:
        check_tasks(_suite(user_tasks, [task]))
    assert "\n" not in str(e.value)


def test_a_broken_task_yaml_is_named(user_tasks):
    (user_tasks / "fact.yaml").write_text(FACT + "doc_to_text: [unclosed\n")
    with pytest.raises(SuiteError, match=r"task fact: .*fact.yaml: ") as e:
        check_tasks(_suite(user_tasks, [FACT_TASK]))
    assert "\n" not in str(e.value)


def test_the_test_split_guard(user_tasks):
    """Searching on a test split is warned about, naming the split that could be searched instead;
    search_split puts the search split in the test split's place for the search only."""
    letter = {"name": "letter", "lm_eval": "my_letter", "include": "tasks", "metric": "exact_match"}
    warned = check_tasks(_suite(user_tasks, [letter, {**REV_TASK, "search_split": None}]))
    assert len(warned) == 2 and all("held-out figures from that split are not an independent estimate" in w
                                    for w in warned)
    assert "task letter: the search optimizes on the test split ('test') of lm-eval task 'my_letter';" in warned[0]
    assert "(search_split: validation searches elsewhere)" in warned[1] and "searches" not in warned[0]
    guarded = _suite(user_tasks, [REV_TASK])
    assert check_tasks(guarded) == []
    resolver = Resolver()
    search, held = resolver.config(guarded.tasks[0], search=True), resolver.config(guarded.tasks[0], search=False)
    assert search["test_split"] == "validation" and held["test_split"] == "test"
    files = search["dataset_kwargs"]["data_files"]
    assert files["validation"] == str(user_tasks / "data" / "rev_search.jsonl")  # from the YAML's directory


def test_shipped_suites_search_off_the_test_split_where_lm_eval_offers_another():
    """arc-challenge searches on validation and gsm8k on train (lm-eval's registry, no data
    loaded); MMLU configures no other split, so mmlu-stem-mini is warned about."""
    resolver = Resolver()
    assert check_tasks(Suite.load("arc-challenge"), resolver) == []
    assert check_tasks(Suite.load("gsm8k"), resolver) == []
    arc, gsm = Suite.load("arc-challenge").tasks[0], Suite.load("gsm8k").tasks[0]
    assert resolver.config(arc, search=True)["test_split"] == "validation"
    assert resolver.config(gsm, search=True)["test_split"] == "train"
    assert resolver.config(gsm, search=False)["test_split"] == "test"
    mmlu = check_tasks(Suite.load("mmlu-stem-mini"), resolver)
    assert len(mmlu) == 5 and "searches elsewhere" not in mmlu[0]


def test_search_and_export_warn_about_the_test_split(user_tasks, zoo, tmp_path, capsys):
    """The warning at the start of a search (stderr) and in the export's report and model card."""
    import yaml

    from evomerge.run.report import export
    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    suite = _suite(user_tasks, [{"name": "letter", "lm_eval": "my_letter", "include": "tasks",
                                 "metric": "same_first_letter", "n": 8, "n_heldout": 8}])
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"models": {"base": zoo["base"], "experts": [zoo["experts"]["rev"]]},
                                   "fitness": {"suite": str(suite.source), "backend": "lm-eval"},
                                   "merge_method": "ties", "budget": {"max_candidates": 2}, "seed": 0}))
    run = create_run(cfg, tmp_path / "run")
    assert "warning: suite mine, task letter: the search optimizes on the test split ('test') of lm-eval task" in \
        capsys.readouterr().err
    run_search(run, live=False)
    export(run, tmp_path / "export")
    for f in ("report.md", "model/README.md"):
        assert "**Warning:** suite mine, task letter: the search optimizes" in (tmp_path / "export" / f).read_text()


def test_a_native_search_on_included_tasks_and_its_refusal(user_tasks, zoo, tmp_path):
    """The native backend searches on included lm-eval tasks; one it cannot score is refused
    before the run directory exists."""
    import yaml

    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run

    def config(tasks: list[dict]) -> Path:
        suite = _suite(user_tasks, tasks)
        cfg = tmp_path / "native.yaml"
        cfg.write_text(yaml.safe_dump({"models": family(zoo),
                                       "fitness": {"suite": str(suite.source), "backend": "native"},
                                       "merge_method": "ties", "budget": {"max_candidates": 2}, "seed": 0}))
        return cfg

    with pytest.raises(SuiteError, match="the native scorer cannot score lm-eval task 'my_letter', on metric"):
        create_run(config([{"name": "letter", "lm_eval": "my_letter", "include": "tasks",
                            "metric": "same_first_letter"}]), tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    run = create_run(config([REV_TASK, FACT_TASK]), tmp_path / "run")
    assert run_search(run, live=False)["evaluated"] == 2
    rows = [r for r in run.db.rows() if r.counted]
    assert all(set(r.record.tasks) == {"rev", "fact"} and r.fitness is not None for r in rows)
    assert all(len(r.record.items["rev"]) == 40 for r in rows)
