"""Fitness suites and backends on the trained zoo: native equals lm-eval, items are fixed, bad
input is named, broken candidates fail cleanly."""

import json
import subprocess
import sys

import pytest
import torch

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
])
def test_bad_suites_name_the_suite_file_and_line(tmp_path, task, lines, match):
    f = write_suite(tmp_path, task, lines)
    with pytest.raises(SuiteError, match=match):
        s = Suite.load(f)
        s.tasks[0].items("search")


def test_unknown_lm_eval_task_is_named(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("name: s\ntasks:\n  - {name: x, lm_eval: no_such_task_anywhere, metric: acc}\n")
    with pytest.raises(SuiteError, match="lm-eval does not know task.*no_such_task_anywhere"):
        get_backend("lm-eval").task_dict(Suite.load(f))


def test_native_refuses_lm_eval_tasks_and_tokenizers_without_pad(tmp_path, zoo_model):
    model, tok = zoo_model("base")
    f = tmp_path / "s.yaml"
    f.write_text("name: s\ntasks:\n  - {name: x, lm_eval: arc_easy, metric: acc}\n")
    with pytest.raises(SuiteError, match="needs --backend lm-eval or vllm"):
        NativeBackend().score(model, tok, Suite.load(f))
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


# -- vLLM (GPU only) --------------------------------------------------------------------------------

def _vllm_missing() -> str:
    if not torch.cuda.is_available():
        return "the vllm backend needs a CUDA GPU; none on this machine"
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "the vllm extra is not installed (pip install 'evomerge[vllm]')"
    return ""


@pytest.mark.skipif(bool(_vllm_missing()), reason=_vllm_missing() or "ready")
def test_vllm_matches_native(suite, zoo, zoo_model):
    model, tok = zoo_model("rev")
    backend = get_backend("vllm", model_dir=zoo["base"])
    v = backend.score(model, tok, suite)
    n = get_backend("native").score(model, tok, suite)
    assert v.tasks["rev"].value == pytest.approx(n.tasks["rev"].value, abs=0.05)
    # a second candidate, applied in place into the same engine
    base, _ = zoo_model("base")
    assert backend.score(base, tok, suite).tasks["rev"].value <= 0.05
