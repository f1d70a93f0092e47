"""Hostile and careless input, one test per category: resume refuses changed inputs, no code from
the run database, no secrets written, non-finite weights, one-line errors, nothing created before
the inputs are checked, pickle only behind the flag, stale temporary directories, status."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_run_config
from safetensors.torch import load_file, save_file

from evomerge.procs import HOST, process_start
from evomerge.resources import suites_dir
from evomerge.rundb.meta import STATE_KEY
from evomerge.rundb.secrets import has_secret, redact, scrub
from evomerge.run.loop import run_search
from evomerge.run.rundir import RunError, create_run, open_run

ENV = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd)


def one_line_error(proc) -> str:
    """The CLI's answer to bad input: exit 2 and exactly one line, 'evomerge: error: ...'."""
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("evomerge: error: ")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert "Traceback" not in proc.stderr
    return errors[0]


def suite_copy(tmp_path: Path) -> Path:
    """The zoo-smooth suite and its data, in a folder of this test's."""
    root = tmp_path / "suite"
    shutil.copytree(suites_dir() / "data", root / "data")
    shutil.copy(suites_dir() / "zoo-smooth.yaml", root / "zoo-smooth.yaml")
    return root / "zoo-smooth.yaml"


def config(tmp_path: Path, zoo: dict, **over) -> Path:
    return write_run_config(tmp_path / "cfg.yaml", zoo, **over)


# -- resume refuses a run whose inputs changed ------------------------------------------------------


def _edit_suite_answer(suite: Path) -> None:
    data = suite.parent / "data" / "zoo" / "rev.jsonl"
    rows = [json.loads(ln) for ln in data.read_text().splitlines()]
    first = next(r for r in rows if r["split"] == "search")
    first["answer"] = first["answer"] + " x"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _edit_suite_weight(suite: Path) -> None:
    spec = yaml.safe_load(suite.read_text())
    spec["tasks"][1]["weight"] = 3.0
    suite.write_text(yaml.safe_dump(spec))


def _edit_method(run_dir: Path) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["merge_method"] = "dare_ties"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize("change, named", [("answer", "suite task rev"), ("weight", "suite task enc"),
                                           ("method", "config key merge_method")])
def test_resume_refuses_changed_inputs(tmp_path, zoo, change, named):
    suite = suite_copy(tmp_path)
    run = create_run(config(tmp_path, zoo, fitness={"suite": str(suite)}), tmp_path / "run")
    run_search(run, live=False)
    run.db.close()
    {"answer": lambda: _edit_suite_answer(suite), "weight": lambda: _edit_suite_weight(suite),
     "method": lambda: _edit_method(tmp_path / "run")}[change]()
    with pytest.raises(RunError, match=f"inputs changed since it started: {named}"):
        run_search(open_run(tmp_path / "run"), resume=True, max_candidates=4, live=False)
    assert len(open_run(tmp_path / "run").db.rows()) == 2  # nothing was added


def _run_with_copied_models(tmp_path, zoo, **over) -> tuple[Path, Path, Path]:
    """A finished 2-candidate run whose base and rev expert are this test's copies."""
    models = tmp_path / "models"
    shutil.copytree(Path(zoo["base"]), models / "base")
    shutil.copytree(Path(zoo["experts"]["rev"]), models / "rev")
    cfg = config(tmp_path, zoo, models={"base": str(models / "base"),
                                        "experts": [str(models / "rev"), zoo["experts"]["enc"]]}, **over)
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    run.db.close()
    return tmp_path / "run", models / "base", models / "rev"


def _resume_error(run_dir: Path) -> str:
    with pytest.raises(RunError, match="inputs changed since it started") as e:
        run_search(open_run(run_dir), resume=True, max_candidates=4, live=False)
    return str(e.value)


def test_resume_refuses_new_weights_of_the_same_shapes(tmp_path, zoo):
    run_dir, _, rev = _run_with_copied_models(tmp_path, zoo)
    f = rev / "model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(f).items()}, f)  # same header, other content
    assert f"model {rev}: file model.safetensors" in _resume_error(run_dir)


@pytest.mark.parametrize("file, edit", [("config.json", lambda c: c | {"rms_norm_eps": 0.01}),
                                        ("tokenizer_config.json", lambda c: c | {"model_max_length": 7})])
def test_resume_refuses_an_edited_model_config_or_tokenizer(tmp_path, zoo, file, edit):
    run_dir, base, _ = _run_with_copied_models(tmp_path, zoo)
    if not (base / file).exists():
        pytest.fail(f"the zoo's base has no {file}")
    (base / file).write_text(json.dumps(edit(json.loads((base / file).read_text()))))
    assert f"model {base}: file {file}" in _resume_error(run_dir)


@pytest.mark.parametrize("key, value", [("sigma0", 0.4), ("popsize", 6)])
def test_resume_refuses_changed_driver_settings_and_allows_a_new_budget(tmp_path, zoo, key, value):
    run = create_run(config(tmp_path, zoo), tmp_path / "run")
    run_search(run, live=False)
    run.db.close()
    path = tmp_path / "run" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(cfg | {"budget": {"max_candidates": 3}}))
    run_search(open_run(tmp_path / "run"), resume=True, live=False)  # the budget may change
    assert len(open_run(tmp_path / "run").db.rows()) == 3
    path.write_text(yaml.safe_dump(cfg | {"driver": cfg["driver"] | {key: value}}))
    assert f"config key driver.{key}" in _resume_error(tmp_path / "run")


def test_weight_hashes_are_cached_in_the_run_directory(tmp_path, zoo):
    run_dir, _, rev = _run_with_copied_models(tmp_path, zoo)
    cache = json.loads((run_dir / "hashes.json").read_text())
    key = str((rev / "model.safetensors").resolve())
    assert cache[key]["sha256"] == hashlib.sha256((rev / "model.safetensors").read_bytes()).hexdigest()
    cache[key]["sha256"] = "0" * 64  # a resume that trusted the cache sees a change; one that re-hashed would not
    (run_dir / "hashes.json").write_text(json.dumps(cache))
    assert f"model {rev}: file model.safetensors" in _resume_error(run_dir)
    os.utime(rev / "model.safetensors")  # a new mtime: hashed again, and the same content passes
    run_search(open_run(run_dir), resume=True, max_candidates=3, live=False)


def test_an_older_runs_fingerprint_is_compared_as_computed_then_upgraded(tmp_path, zoo):
    from evomerge.search.fingerprint import LEGACY_CONFIG_KEYS, _legacy_model_digest, digest

    run = create_run(config(tmp_path, zoo), tmp_path / "run")
    run_search(run, live=False)
    stored = run.db.metadata.get()["fingerprint"]
    cfg = run.cfg.to_dict()
    legacy = {"suite": stored["suite"], "models": {m: _legacy_model_digest(m) for m in stored["models"]},
              "config": {k: digest(cfg.get(k)) for k in LEGACY_CONFIG_KEYS}
              | {"fitness": digest({k: v for k, v in cfg["fitness"].items() if k != "suite"})}}
    run.db.metadata.set({"fingerprint": legacy})
    run.db.close()
    run_search(open_run(tmp_path / "run"), resume=True, max_candidates=3, live=False)
    assert open_run(tmp_path / "run").db.metadata.get()["fingerprint"]["version"] == 2


def test_a_changed_model_is_named(tmp_path, zoo):
    experts = tmp_path / "experts"
    shutil.copytree(Path(zoo["experts"]["rev"]), experts / "rev")
    cfg = config(tmp_path, zoo, models={"base": zoo["base"], "experts": [str(experts / "rev"), zoo["experts"]["enc"]]})
    run = create_run(cfg, tmp_path / "run")
    run_search(run, live=False)
    f = experts / "rev" / "model.safetensors"
    tensors = load_file(f)
    save_file({k: v.to(torch.float16) for k, v in tensors.items()}, f)  # same names, other dtype
    with pytest.raises(RunError, match=f"model {experts / 'rev'}"):
        run_search(open_run(tmp_path / "run"), resume=True, max_candidates=4, live=False)


# -- no code from data ------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_pickle_in_the_run_database_is_never_loaded(tmp_path, zoo):
    import sqlalchemy as sa

    run = create_run(config(tmp_path, zoo), tmp_path / "run")
    run_search(run, live=False)
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    blob = base64.b64encode(pickle.dumps({"driver": "cma", "blob": pickle.dumps(payload)})).decode()
    with run.db.storage.engine.begin() as conn:  # what an attacker with write access to the database does
        conn.execute(sa.text("UPDATE study_system_attributes SET value_json = :v WHERE key = :k"),
                     {"v": json.dumps(blob), "k": STATE_KEY})
    proc = cli("resume", tmp_path / "run", "--max-candidates", "3")
    assert "driver state is not a JSON object" in one_line_error(proc)
    assert not marker.exists()
    with run.db.storage.engine.begin() as conn:  # a JSON state with a wrong shape: refused, naming the key
        conn.execute(sa.text("UPDATE study_system_attributes SET value_json = :v WHERE key = :k"),
                     {"v": json.dumps({"driver": "cma", "restart": 0, "generation": "__import__('os')"}),
                      "k": STATE_KEY})
    assert "'generation' is missing or not a int" in one_line_error(cli("resume", tmp_path / "run"))


# -- secrets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url, shown", [
    ("postgresql://evo:s3cr%40t@db.example:5432/runs", "postgresql://evo:***@db.example:5432/runs"),
    ("postgresql://db.example/runs?password=s3cr%40t&sslmode=require",
     "postgresql://db.example/runs?password=***&sslmode=require"),
    ("postgresql:///runs?host=db.example&user=evo&password=s3cr%40t",
     "postgresql:///runs?host=db.example&user=evo&password=***"),
    ("sqlite:////data/run:v1@v2/run.db", "sqlite:////data/run:v1@v2/run.db"),
])
def test_storage_urls_lose_their_secrets(url, shown):
    assert redact(url) == shown
    assert has_secret(url) == (shown != url)
    if shown != url:
        assert "s3cr" not in scrub(f"could not connect: password s3cr@t / s3cr%40t rejected for {url}", url)


def test_a_secret_in_an_unreachable_storage_url_is_never_printed(tmp_path, zoo):
    url = "postgresql://evo:s3cr3tpw@127.0.0.1:1/runs?connect_timeout=1"
    proc = cli("search", config(tmp_path, zoo), "--run-dir", tmp_path / "run", "--storage", url)
    line = one_line_error(proc)
    assert "s3cr3tpw" not in proc.stderr + proc.stdout and "evo:***@127.0.0.1:1" in line
    assert not (tmp_path / "run").exists()


def test_a_run_directory_with_at_sign_and_colon(tmp_path, zoo):
    run_dir = tmp_path / "run:v1@v2"
    assert cli("search", config(tmp_path, zoo), "--run-dir", run_dir).returncode == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["storage"] == "run.db" and info["storage_in_run_dir"] and not info["storage_has_password"]
    assert cli("resume", run_dir, "--max-candidates", "3").returncode == 0


# -- non-finite weights -----------------------------------------------------------------------------


def test_nan_weights_are_refused_by_the_disk_merge_and_the_search(tmp_path, zoo):
    bad = tmp_path / "nan-expert"
    shutil.copytree(Path(zoo["experts"]["enc"]), bad)
    tensors = load_file(bad / "model.safetensors")
    name = next(k for k in tensors if "mlp" in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, bad / "model.safetensors")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": zoo["base"], "models": [
        {"model": str(bad), "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": zoo["experts"]["rev"], "parameters": {"weight": 0.5, "density": 0.5}}]}))
    merged = one_line_error(cli("merge", recipe, tmp_path / "out"))
    cfg = config(tmp_path, zoo, models={"base": zoo["base"], "experts": [str(bad), zoo["experts"]["rev"]]})
    searched = one_line_error(cli("search", cfg, "--run-dir", tmp_path / "run"))
    for line in (merged, searched):
        assert f"model {bad}: tensor {name}" in line and "NaN or inf" in line
    assert not (tmp_path / "out").exists()


# -- one-line errors --------------------------------------------------------------------------------


def test_files_that_are_directories_or_not_text(tmp_path, zoo):
    (tmp_path / "dir.yaml").mkdir()
    assert f"{tmp_path / 'dir.yaml'}: is a directory" in one_line_error(cli("search", tmp_path / "dir.yaml"))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in one_line_error(cli("merge", tmp_path / "latin1.yaml", tmp_path / "out"))
    (tmp_path / "data.jsonl").write_bytes(b'{"split": "search", "prompt": "\xff", "answer": "a"}\n')
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"tasks": [{"name": "t", "data": "data.jsonl",
                                                                "kind": "generate", "metric": "exact_match"}]}))
    line = one_line_error(cli("search", config(tmp_path, zoo, fitness={"suite": str(tmp_path / "s.yaml")})))
    assert f"{tmp_path / 'data.jsonl'}: not UTF-8" in line


def test_truncated_and_unreadable_checkpoints(tmp_path, zoo):
    cut = tmp_path / "cut"
    shutil.copytree(Path(zoo["experts"]["enc"]), cut)
    f = cut / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(cut), "parameters": {"weight": 0.5}}, {"model": zoo["experts"]["rev"], "parameters": {"weight": 0.5}}]}))
    assert f"model {cut}" in one_line_error(cli("merge", recipe, tmp_path / "out"))
    cfg = config(tmp_path, zoo, models={"base": zoo["base"], "experts": [str(cut), zoo["experts"]["rev"]]})
    assert f"model {cut}" in one_line_error(cli("search", cfg, "--run-dir", tmp_path / "run"))
    f.unlink()
    (cut / "pytorch_model.bin").write_bytes(b"not a zip file at all")
    assert f"model {cut}" in one_line_error(cli("merge", recipe, tmp_path / "out", "--allow-pickle"))


# -- nothing is created before the inputs are checked -----------------------------------------------


def test_a_failed_start_leaves_nothing_behind(tmp_path, zoo):
    suite = suite_copy(tmp_path)
    data = suite.parent / "data" / "zoo" / "fact.jsonl"
    good = data.read_text()
    data.write_text(good + '{"split": "heldout", "prompt": "p", "answer": 7, "choices": ["a", "b"]}\n')
    cfg = config(tmp_path, zoo, fitness={"suite": str(suite)})
    line = one_line_error(cli("search", cfg, "--run-dir", tmp_path / "run"))
    assert f"{data}, line" in line and "answer must be the index" in line
    assert not (tmp_path / "run").exists()
    data.write_text(good)
    assert cli("search", cfg, "--run-dir", tmp_path / "run").returncode == 0


@pytest.mark.parametrize("fitness, message", [
    ({"suite": "zoo-smooth", "backend": "lm-eval"}, "task rev: metric margin on a generate task is computed by the "
                                                    "native backend only"),
    ({"suite": "zoo", "engine": {"max_model_len": 256}}, "fitness.engine: .*apply to the vllm backend, not 'native'"),
    ({"suite": "zoo", "lm_eval": {"num_fewshot": 2}}, "fitness.lm_eval: .*apply to the lm-eval and vllm backends, "
                                                      "not 'native'"),
    ({"suite": "zoo", "backend": "lm-eval", "lm_eval": {"gen_kwargs": {"max_tokens": 3}}},
     "fitness.lm_eval.gen_kwargs.max_tokens: unknown key"),
    ({"suite": "zoo", "backend": "lm-eval", "lm_eval": {"num_fewshot": 1000000000}},
     "fitness.lm_eval.num_fewshot: Input should be less than or equal to 256"),
    ({"suite": "zoo", "backend": "lm-eval", "lm_eval": {"gen_kwargs": {"max_gen_toks": -5, "temperature": "hot",
                                                                       "until": 7}}},
     "gen_kwargs.until: .*gen_kwargs.max_gen_toks: .*greater than or equal to 1.*gen_kwargs.temperature: "
     "Input should be a valid number"),
    ({"suite": "zoo", "backend": "lm-eval", "lm_eval": {"fewshot_as_multiturn": True}},
     "fitness.lm_eval: fewshot_as_multiturn needs apply_chat_template"),
    ({"suite": "zoo", "backend": "lm-eval", "lm_eval": {"apply_chat_template": True}},
     "fitness.lm_eval.apply_chat_template: the tokenizer of .* has no chat template"),
    ({"suite": "zoo", "backend": "vllm", "engine": {"max_model_len": 4}}, "fitness.engine.max_model_len"),
])
def test_a_backend_that_cannot_score_the_suite_is_refused_at_start(tmp_path, zoo, fitness, message):
    line = one_line_error(cli("search", config(tmp_path, zoo, fitness=fitness), "--run-dir", tmp_path / "run"))
    assert re.search(message, line), line
    assert not (tmp_path / "run").exists()


def test_a_task_asking_for_more_items_than_its_split_holds_is_refused_at_start(tmp_path, zoo):
    suite = suite_copy(tmp_path)
    spec = yaml.safe_load(suite.read_text())
    spec["tasks"][0]["n"] = 1000
    suite.write_text(yaml.safe_dump(spec))
    line = one_line_error(cli("search", config(tmp_path, zoo, fitness={"suite": str(suite)}), "--run-dir",
                              tmp_path / "run"))
    assert re.search(r"task rev: n 1000 is more than the \d+ items of its search split \(.*rev.jsonl\)", line), line
    assert not (tmp_path / "run").exists()


def test_an_option_the_backend_rejects_stops_the_run_before_it_exists(tmp_path, zoo):
    """num_fewshot 200 passes the config's checks, but lm-eval cannot draw 200 examples from the
    zoo's tasks: the dry scoring of the base finds it before the run directory is created."""
    cfg = config(tmp_path, zoo, fitness={"suite": "zoo", "backend": "lm-eval", "lm_eval": {"num_fewshot": 200}})
    line = one_line_error(cli("search", cfg, "--run-dir", tmp_path / "run"))
    assert "the lm-eval backend failed to score" in line and "on one item of each task" in line
    assert "Sample larger than population" in line
    assert not (tmp_path / "run").exists()


def test_a_run_whose_first_candidates_all_fail_alike_stops(tmp_path, zoo):
    """Merge weights near 1e30 give non-finite logits: every candidate fails the same way, but
    the base scores fine. The search stops after fail_fast candidates, not at its budget."""
    space = {"granularity": "global", "parameters": {"weight": {"low": 1e30, "high": 2e30}}}
    cfg = config(tmp_path, zoo, merge_method="task_arithmetic", space=space, budget={"max_candidates": 8},
                 fail_fast=2)
    proc = cli("search", cfg, "--run-dir", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert "the first 2 candidates of this session all failed with the same error" in proc.stderr
    assert "non-finite logits" in proc.stderr
    assert len(open_run(tmp_path / "run").db.rows()) == 2


@pytest.mark.parametrize("errors, n, stops", [(["x", "x", "x"], 3, True), (["x", "y", "x"], 3, False),
                                             ([None, "x", "x"], 3, False), (["x", "x"], 3, False),
                                             (["x", "x", "x", "x"], 3, False), (["x"], 0, False)])
def test_same_failure(errors, n, stops):
    from evomerge.run.loop import same_failure

    assert same_failure(errors, n) is stops


def test_vllm_on_cpu_refuses_a_head_dim_under_32_at_start(tmp_path, zoo, vllm_available):
    """The zoo's models with a config claiming 16-dimensional heads: refused before any weight loads."""
    models = {}
    for name, path in {"base": zoo["base"], **zoo["experts"]}.items():
        shutil.copytree(path, tmp_path / name)
        cfg_file = tmp_path / name / "config.json"
        cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"head_dim": 16}))
        models[name] = str(tmp_path / name)
    cfg = config(tmp_path, zoo, models={"base": models.pop("base"), "experts": list(models.values())},
                 fitness={"suite": "zoo", "backend": "vllm"})
    line = one_line_error(cli("search", cfg, "--run-dir", tmp_path / "run"))
    assert re.search("fitness.backend vllm: vLLM's CPU attention needs head_dim >= 32; .* has 16", line), line
    assert not (tmp_path / "run").exists()


def test_concurrent_starts_on_one_run_directory(tmp_path, zoo):
    cfg = config(tmp_path, zoo)
    procs = [subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir",
                               str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes.count(0) >= 1, outs
    for p, (_, err) in zip(procs, outs):
        if p.returncode:
            assert p.returncode == 2 and "OperationalError" not in err and "Traceback" not in err, err
            assert any(k in err for k in ("a run already lives here", "already holds a run", "just created",
                                          "exists and is not empty")), err
    assert len(open_run(tmp_path / "run").db.rows()) == 2


# -- pickle only behind the flag ---------------------------------------------------------------------


def test_eval_needs_the_flag_for_pickle_checkpoints(tmp_path, zoo):
    model = tmp_path / "bin-model"
    shutil.copytree(Path(zoo["experts"]["rev"]), model)
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    line = one_line_error(cli("eval", model, "--suite", "zoo-smooth"))
    assert f"model {model}: only pickle checkpoints" in line and "--allow-pickle" in line
    assert cli("eval", model, "--suite", "zoo-smooth", "--allow-pickle").returncode == 0


# -- stale temporary directories ---------------------------------------------------------------------


def test_a_killed_merge_leaves_a_partial_directory_that_the_next_one_sweeps(tmp_path, zoo):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".merged.partial-{HOST}-{int(dead.stdout)}-1"
    stale.mkdir()
    (stale / "model-00001.safetensors").write_bytes(b"half")
    alive = tmp_path / f".other.partial-{HOST}-{os.getpid()}-{process_start(os.getpid())}"
    alive.mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": zoo["experts"]["enc"], "parameters": {"weight": 0.5}},
        {"model": zoo["experts"]["rev"], "parameters": {"weight": 0.5}}]}))
    assert cli("merge", recipe, tmp_path / "merged").returncode == 0
    assert not stale.exists() and alive.exists()  # a live process's directory is left alone


# -- status ------------------------------------------------------------------------------------------


def test_status_shows_a_running_candidate_as_running(tmp_path, zoo):
    from evomerge.rundb.leases import Owner
    from evomerge.run.report import status_text

    run = create_run(config(tmp_path, zoo), tmp_path / "run")
    run_search(run, live=False)
    with run.db.lock():
        run.db.leases.claim({n: 0.5 for n in run.space.names}, Owner.this_process(1))
    text = status_text(open_run(tmp_path / "run"))
    assert "1 running" in text
    last = text.strip().splitlines()[-1]
    assert "running" in last and "failed" not in last


# -- a full disk ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB filesystem (tmpfs, mounted as root): writes to it run out of space for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    yield mnt
    subprocess.run(["umount", "--lazy", str(mnt)], capture_output=True)


def test_a_full_disk_during_a_merge(tmp_path, zoo, small_disk):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": zoo["experts"]["enc"], "parameters": {"weight": 0.5}},
        {"model": zoo["experts"]["rev"], "parameters": {"weight": 0.5}}]}))
    line = one_line_error(cli("merge", recipe, small_disk / "merged"))
    assert "No space left on device" in line and "free some space" in line
    assert list(small_disk.iterdir()) == []  # no output, no partial directory


def test_a_full_disk_during_a_search_says_how_to_resume(tmp_path, zoo, small_disk):
    cfg = config(tmp_path, zoo, budget={"max_candidates": 10000}, space="per_layer_per_module")
    line = one_line_error(cli("search", cfg, "--run-dir", small_disk / "run"))
    assert "disk is full" in line or "No space left" in line
    assert "evomerge resume" in line
    run = open_run(small_disk / "run")
    done = len(run.db.rows())
    run.db.close()
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    assert cli("resume", small_disk / "run", "--max-candidates", str(done + 3)).returncode == 0
    run = open_run(small_disk / "run")
    rows = run.db.rows()
    run.db.close()
    assert sum(r.counted for r in rows) == done + 3 and all(r.state != "running" for r in rows)


@pytest.fixture
def unprivileged(tmp_path):
    """A folder an unprivileged user can reach, and the command prefix that runs as that user."""
    import tempfile

    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run a command as another user (CI runs as root)")
    d = Path(tempfile.mkdtemp(prefix="evomerge-perm-"))
    d.chmod(0o777)
    yield d, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    shutil.rmtree(d, ignore_errors=True)


def test_permission_denied_names_the_file(zoo, unprivileged):
    d, as_nobody = unprivileged
    for name in ("enc", "rev"):  # readable by that user (pytest's own folders are not)
        shutil.copytree(zoo["experts"][name], d / name)
    subprocess.run(["chmod", "-R", "a+rX", str(d)], check=True)
    recipe = d / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(d / "enc"), "parameters": {"weight": 0.5}},
        {"model": str(d / "rev"), "parameters": {"weight": 0.5}}]}))
    recipe.chmod(0o000)
    env = ENV | {"HF_HOME": str(d / "hf"), "HOME": str(d)}
    proc = subprocess.run([*as_nobody, sys.executable, "-m", "evomerge.cli", "merge", str(recipe), str(d / "out")],
                          capture_output=True, text=True, env=env)
    assert f"{recipe}: cannot read (Permission denied)" in one_line_error(proc)
    recipe.chmod(0o644)
    locked = d / "locked"
    locked.mkdir(mode=0o555)
    proc = subprocess.run([*as_nobody, sys.executable, "-m", "evomerge.cli", "merge", str(recipe), str(locked / "out")],
                          capture_output=True, text=True, env=env)
    assert "Permission denied" in one_line_error(proc) and str(locked) in proc.stderr
