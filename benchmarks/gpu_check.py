"""The GPU check: what a lent GPU must show, in one run of at most 8 minutes (``gpu_check.sh``).

Stages, each recorded as ok, failed or skipped (with the reason), its seconds and its figures:

1. ``environment``: torch, the GPU, the CPU, and evomerge importing;
2. ``cuda_tests``: the engine's CUDA tests (random methods bit-identical on the CPU and the GPU; a
   GPU apply equal to a GPU merge to disk, for every cache placement; every cached tensor of every
   method moved to the GPU and to pinned memory);
3. ``engine``: the in-place engine on a random bf16 Llama of about 1B parameters with 3 experts
   (built on the device, written once to local disk): TIES and DARE-TIES apply time per candidate,
   against a plain ``copy_`` of the least bytes an apply moves;
4. ``search``: the demo's search (per-layer TIES, CMA-ES, suite zoo-smooth) on the tiny zoo on the
   GPU with the native backend, for a fixed number of candidates: rate, and merge and fitness
   milliseconds per candidate;
5. ``vllm``: where ``vllm`` imports (its wheel carried in parts, see gpu_check.sh),
   ``benchmarks/vllm_backend.py`` on the tiny zoo: vllm against native item by item, and its
   per-candidate time; else skipped, saying so.

``--dry-run`` runs every stage on the CPU with a small model and 4 candidates, so that CI keeps the
script working where no GPU is. Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``; exits 1
when a stage failed.

    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--candidates 96]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

ONE_B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16)  # 0.95B parameters
SMALL = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4)


class Skip(Exception):
    """A stage that cannot run here, and why."""


def stage_environment(args, device: str) -> dict:
    import torch

    from evomerge import machine

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device,
           "machine": machine.describe(), "python": platform.python_version()}
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": torch.cuda.get_device_name(0), "gpu_memory_gib": round(props.total_memory / 2 ** 30, 1)}
    return out


def stage_cuda_tests(args, device: str) -> dict:
    """The engine's CUDA tests (skipped by pytest itself where there is no GPU)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py",
           "-k", "cpu_and_gpu or gpu_apply or moves_with_its_state"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    if proc.returncode:
        raise RuntimeError(f"pytest exit {proc.returncode}: {tail}")
    return {"pytest": tail}


def _random_family(root: Path, shape: dict, device: str) -> dict:
    """A random bf16 Llama of ``shape`` and 3 experts (the base plus small dense noise), drawn on
    ``device`` and saved as safetensors under ``root``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (root / "family.json").exists():
        return json.loads((root / "family.json").read_text())
    cfg = LlamaConfig(**shape, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    paths = {"base": str(root / "base"), "experts": []}
    model.save_pretrained(root / "base")
    g = torch.Generator(device=device).manual_seed(1)
    for i in range(3):
        with torch.no_grad():
            for k, p in model.state_dict().items():
                p.copy_(base[k] + 0.02 * base[k].float().std() * torch.randn(p.shape, generator=g, device=device))
        model.save_pretrained(root / f"expert_{i}")
        paths["experts"].append(str(root / f"expert_{i}"))
    (root / "family.json").write_text(json.dumps(paths))
    return paths


def stage_engine(args, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.merging.engine import MergeEngine
    from evomerge.merging.recipe import Recipe
    from merge_speed import apply_bytes, copy_bandwidth, params_of, recipe

    shape = SMALL if args.dry_run else ONE_B
    t = time.perf_counter()
    fam = _random_family(Path(args.work) / ("family-small" if args.dry_run else "family-1b"), shape, device)
    out: dict = {"family_build_s": round(time.perf_counter() - t, 1)}
    model = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.bfloat16).to(device)
    n = params_of(model)
    out["parameters"] = n
    copy_bw = copy_bandwidth(device)
    out["copy_tb_s"] = round(copy_bw / 1e12, 3)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for method in ("ties", "dare_ties"):
        t = time.perf_counter()
        engine = MergeEngine(Recipe.from_dict(recipe(method, fam)), device=device)
        build = time.perf_counter() - t
        times = []
        for i in range(4):
            r = Recipe.from_dict(recipe(method, fam, density=0.3 + 0.1 * i, weights=(0.4 + 0.05 * i, 0.3, 0.2)))
            sync()
            t = time.perf_counter()
            engine.apply(r, model)
            sync()
            times.append(time.perf_counter() - t)
        apply_s = statistics.median(times[1:])  # the first apply compiles
        moved = apply_bytes(n, method)
        out[method] = {"engine_build_s": round(build, 2), "apply_ms": round(apply_s * 1e3, 2),
                       "copy_of_same_bytes_ms": round(moved / copy_bw * 1e3, 2),
                       "share_of_copy_bandwidth": round(moved / apply_s / copy_bw, 4),
                       "placement": engine.placement}
        del engine
    return out


def _tiny_zoo(args) -> dict:
    from evomerge.zoo import load_or_build_zoo

    zoo, _ = load_or_build_zoo(args.zoo or Path(args.work) / "zoo-tiny", "tiny", seed=0)
    return zoo


def stage_search(args, device: str) -> dict:
    import yaml

    from evomerge.run.loop import run_search
    from evomerge.run.rundir import create_run
    from evomerge.zoo import family

    zoo = _tiny_zoo(args)
    n = 4 if args.dry_run else args.candidates
    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "per_layer", "fitness": {"suite": "zoo-smooth"}, "references": False, "device": device,
           "driver": {"name": "cma", "popsize": 8}, "budget": {"max_candidates": n}, "seed": 0}
    work = Path(tempfile.mkdtemp(prefix="search-", dir=args.work))
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    run = create_run(work / "cfg.yaml", work / "run")
    t = time.perf_counter()
    summary = run_search(run, live=False)
    wall = time.perf_counter() - t
    rows = [run.db.row(s.trial_id) for s in run.db.scores() if s.state == "complete"]
    steady = rows[8:] or rows
    run.db.close()
    if len(rows) != n:
        raise RuntimeError(f"{len(rows)} of {n} candidates completed ({summary['stopped_by']})")
    return {"candidates": n, "wall_s": round(wall, 1), "per_minute": round(n / wall * 60, 1),
            "merge_ms": round(statistics.median(r.record.merge_s for r in steady) * 1e3, 1),
            "fitness_ms": round(statistics.median(r.record.eval_s for r in steady) * 1e3, 1),
            "best_fitness": round(max(r.fitness for r in rows), 4)}


def stage_vllm(args, device: str) -> dict:
    try:
        import vllm
    except ImportError:
        raise Skip("vllm does not import here: scripts/device_wheels.sh does not carry vllm==0.25.0 and its "
                   "dependencies yet")
    zoo = _tiny_zoo(args)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_backend.py"), "--zoo", zoo["root"], "--size", "tiny",
           "--suite", "zoo", "--candidates", "2" if args.dry_run else "5"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"vllm_backend.py exit {proc.returncode}: {proc.stderr.strip()[-400:]}")
    lines = proc.stdout.strip().splitlines()
    if not any("equal across backends: True" in x for x in lines):
        raise RuntimeError(f"vllm differs from native: {lines[-1]}")
    return {"vllm": vllm.__version__, "report": lines[-8:]}


STAGES: dict[str, Callable] = {"environment": stage_environment, "cuda_tests": stage_cuda_tests,
                               "engine": stage_engine, "search": stage_search, "vllm": stage_vllm}


def markdown(summary: dict) -> str:
    lines = [f"# evomerge GPU check ({'dry run, CPU' if summary['dry_run'] else summary['device']})", "",
             f"{summary['started']}, {summary['total_s']:.0f} s in all", "",
             "| stage | result | seconds | figures |", "|---|---|---|---|"]
    for name, st in summary["stages"].items():
        figures = st.get("figures") or st.get("reason") or st.get("error") or ""
        text = json.dumps(figures, separators=(", ", ": ")) if isinstance(figures, (dict, list)) else str(figures)
        lines.append(f"| {name} | {st['result']} | {st['seconds']:.1f} | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every stage on the CPU, small (what CI runs)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    ap.add_argument("--work", help="where models and runs are written (default: $TMPDIR/evomerge-gpu-check)")
    ap.add_argument("--candidates", type=int, default=96, help="the search stage's candidates")
    ap.add_argument("--zoo", help="a tiny zoo to search (default: built under --work)")
    ap.add_argument("--stages", nargs="+", choices=list(STAGES), default=list(STAGES))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import torch

    if args.dry_run:
        device = "cpu"
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("evomerge: error: gpu_check: no CUDA device here (use --dry-run for the CPU)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.work = args.work or str(Path(os.environ.get("TMPDIR", "/tmp")) / "evomerge-gpu-check")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    summary = {"dry_run": args.dry_run, "device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
               "stages": {}}
    for name in args.stages:
        t = time.perf_counter()
        try:
            st = {"result": "ok", "figures": STAGES[name](args, device)}
        except Skip as e:
            st = {"result": "skipped", "reason": str(e)}
        except Exception as e:  # a stage's failure is recorded, and the next stage still runs
            traceback.print_exc()
            st = {"result": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        st["seconds"] = round(time.perf_counter() - t, 1)
        summary["stages"][name] = st
        print(f"gpu_check: {name}: {st['result']} in {st['seconds']:.1f} s "
              f"{json.dumps(st.get('figures') or st.get('reason') or st.get('error'))}", flush=True)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    (out / "gpu_check.md").write_text(markdown(summary))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 1 if any(st["result"] == "failed" for st in summary["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
