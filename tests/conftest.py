import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from evomerge.tiny import TinySpec, build_family  # noqa: E402


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
