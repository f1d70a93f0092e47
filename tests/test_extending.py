"""The README's extension guide, followed in a test: a fitness backend and a search driver defined
and registered here, by what they can do, run a search and its resume like the shipped ones; the
config asks their capabilities, never their names."""

import random

import pytest
import torch
import yaml

from evomerge.config import ConfigError, RunConfig
from evomerge.fitness.base import BACKENDS, BackendEntry, register_backend
from evomerge.fitness.result import FitnessResult, ItemResult, TaskResult, combine
from evomerge.search.drivers import Driver, Proposal
from evomerge.run.loop import run_search
from evomerge.run.rundir import create_run, open_run
from evomerge.search.registry import DRIVERS, DriverEntry, register_driver
from evomerge.zoo import family


class FirstTokenBackend:
    """Scores an item right when the model's greedy next token is the first token of its answer."""

    name = "first-token"

    def __init__(self, batch_size: int = 32):
        self.batch_size = batch_size

    @torch.inference_mode()
    def score(self, model, tokenizer, suite, split="search"):
        tasks = {}
        for task in suite.tasks:
            items = []
            for it in task.items(split):
                answer = it.choices[it.answer] if it.choices else it.answer
                ids = torch.tensor([tokenizer.encode(it.prompt)])
                want = tokenizer.encode(it.delimiter + answer, add_special_tokens=False)[0]
                ok = int(model(input_ids=ids).logits[0, -1].argmax()) == want
                items.append(ItemResult(it.id, ok, float(ok)))
            value = sum(i.value for i in items) / len(items)
            tasks[task.name] = TaskResult(task.name, "first_token", value, task.spec.weight,
                                          {"first_token": value}, items)
        return FitnessResult(combine(tasks), tasks, split=split, backend=self.name)


class RandomDriver(Driver):
    """Random search, one stream per process: a pure ask/tell class whose state is plain JSON."""

    kind = "toy-random"

    def initial_state(self, last_trial_id):
        return {"driver": self.kind, "asked": 0}

    def load(self, state):
        self._check(state, {"asked": int})
        self.asked = state["asked"]

    def ask(self, rows):
        rng = random.Random(f"{self.seed}-{self.slot}-{self.asked}")
        self.asked += 1
        return Proposal([rng.random() for _ in self.names])

    def tell(self, proposal, values, rows, last_trial_id):
        return {"driver": self.kind, "asked": self.asked}


@pytest.fixture
def registered():
    register_backend(BackendEntry("first-token", __name__, "FirstTokenBackend"))
    register_driver(DriverEntry("toy-random", __name__, "RandomDriver", requeue=True))
    yield
    BACKENDS.pop("first-token")
    DRIVERS.pop("toy-random")


def test_a_backend_and_a_driver_of_ones_own_run_a_search(registered, zoo, tmp_path):
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "global", "fitness": {"suite": "zoo", "backend": "first-token"},
           "driver": {"name": "toy-random"}, "budget": {"max_candidates": 4}, "seed": 5}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run = create_run(tmp_path / "run.yaml", tmp_path / "run")
    assert run_search(run, live=False)["evaluated"] == 4
    run_search(open_run(tmp_path / "run"), resume=True, max_candidates=6, live=False)
    rows = [r for r in open_run(tmp_path / "run").db.rows() if r.counted]
    assert len(rows) == 6 and all(r.state == "complete" and 0 <= r.fitness <= 1 for r in rows)
    assert {r.record.tasks["rev"].metric for r in rows} == {"first_token"}
    assert len({tuple(r.params.values()) for r in rows}) == 6  # the resumed driver went on from its state
    assert open_run(tmp_path / "run").db.metadata.driver_state() == {"driver": "toy-random", "asked": 6}


@pytest.mark.parametrize("over,match", [
    ({"driver": {"name": "toy-random", "sampler": "tpe"}}, "sampler applies to driver optuna only, not toy-random"),
    ({"driver": {"name": "toy-random", "restarts": 2}}, "restarts applies to driver cma only, not toy-random"),
    ({"fitness": {"suite": "zoo", "backend": "first-token", "lm_eval": {"num_fewshot": 1}}},
     "lm-eval options apply to the lm-eval and vllm backends, not 'first-token'"),
    ({"fitness": {"suite": "zoo", "backend": "first-token", "engine": {"max_model_len": 64}}},
     "engine arguments apply to the vllm backend"),
])
def test_the_config_asks_capabilities(registered, zoo, tmp_path, over, match):
    cfg = {"models": family(zoo), "merge_method": "ties",
           "fitness": {"suite": "zoo", "backend": "first-token"}, "budget": {"max_candidates": 4}} | over
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(cfg, source=None)


def test_a_name_registered_twice_is_refused(registered):
    from evomerge.errors import EvomergeError

    with pytest.raises(EvomergeError, match="two backends are named 'first-token'"):
        register_backend(BackendEntry("first-token", __name__, "FirstTokenBackend"))
    with pytest.raises(EvomergeError, match="two drivers are named 'toy-random'"):
        register_driver(DriverEntry("toy-random", __name__, "RandomDriver"))
