"""batchllm as an lm-evaluation-harness model (``lm-eval`` on PyPI, an optional dependency).

``BatchLLMLM`` implements lm-eval's ``LM`` interface on batchllm's plan and engine: ``loglikelihood`` and
``loglikelihood_rolling`` through ``batchllm.score`` (lm-eval's tokenization, so the context /
continuation split is HFLM's; every request of a call is planned together, so a few-shot context shared by
all questions, and a question shared by its options, is computed once), ``generate_until`` through the
same plan and engine with greedy or sampled decoding and the task's stop strings. Importing this module
registers it under the name ``batchllm`` (lm-eval finds models only in its registry, so the import comes
first)::

    import lm_eval
    import batchllm.lm_eval_adapter  # noqa: F401  registers "batchllm"

    lm_eval.simple_evaluate(model="batchllm", model_args="model=./Llama-3.2-1B,device=cuda", tasks=["hellaswag"])

Importing this module imports lm-eval; nothing else in batchllm does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from batchllm.build import LoadedModel, load_model, make_engine, model_max_len
from batchllm.config import JobConfig
from batchllm.execute import EngineCallbacks, run_plan
from batchllm.io.requests import Request
from batchllm.plan.plan import plan_requests
from batchllm.sampling_params import SamplingParams
from batchllm.score import Pair, encode_pair, prefix_token_id, rolling_windows, score_pairs


@register_model("batchllm")
class BatchLLMLM(LM):
    """lm-eval's ``LM`` on batchllm. ``model``, ``device``, ``dtype``, ``kv_cache_tokens``,
    ``max_num_batched_tokens``, ``max_model_len`` and ``page_size`` are ``JobConfig``'s; ``max_length``:
    the input tokens of a rolling window (default: the model's context less the sampled token);
    ``loaded``: an already loaded model (in-process use and tests)."""

    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 kv_cache_tokens: int | None = None, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, page_size: int = 16, max_length: int | None = None,
                 loaded: LoadedModel | None = None, **_: Any):
        super().__init__()
        self.cfg = JobConfig(model=model, device=device, dtype=dtype, kv_cache_tokens=_opt_int(kv_cache_tokens),
                             max_num_batched_tokens=_opt_int(max_num_batched_tokens),
                             max_model_len=_opt_int(max_model_len), page_size=int(page_size))
        self.lm = loaded or load_model(self.cfg)
        limit = model_max_len(self.cfg, self.lm.config) - 2  # a window is max_length + 1 tokens, then one sampled
        self.max_length = min(_opt_int(max_length) or limit, limit)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        tok = self.lm.tokenizer
        return [(r.logprob, r.is_greedy) for r in self._score([encode_pair(tok, *req.args[:2]) for req in requests])]

    def loglikelihood_rolling(self, requests) -> list[float]:
        tok = self.lm.tokenizer
        prefix = prefix_token_id(tok)
        windows = [rolling_windows(tok(req.args[0], add_special_tokens=False)["input_ids"], prefix, self.max_length)
                   for req in requests]
        scores = self._score([p for ws in windows for p in ws])
        out, pos = [], 0
        for ws in windows:
            out.append(sum(s.logprob for s in scores[pos : pos + len(ws)]))
            pos += len(ws)
        return out

    def generate_until(self, requests) -> list[str]:
        tok = self.lm.tokenizer
        reqs = []
        for i, req in enumerate(requests):
            context, kwargs = req.args[0], dict(req.args[1])
            until = kwargs.get("until") or []
            params = SamplingParams(
                max_tokens=int(kwargs.get("max_gen_toks", 256)),
                temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
                stop=tuple([until] if isinstance(until, str) else until))
            ids = np.asarray(tok(context, add_special_tokens=False)["input_ids"], dtype=np.int32)
            reqs.append(Request(str(i), "lm_eval", i, params, prompt_token_ids=ids, token_ids=ids))
        engine, eos = make_engine(self.cfg, self.lm, model_max_len(self.cfg, self.lm.config))
        plan = plan_requests(reqs, "batchllm", engine.cfg.max_model_len, self.cfg.page_size)
        texts: list[str | None] = [None] * len(reqs)

        def finished(index, req, seq, row) -> None:
            texts[index] = seq.text

        def too_long(req, err) -> None:
            raise ValueError(err.error_message)

        run_plan(engine, eos, reqs, plan, seed=self.cfg.seed, page_size=self.cfg.page_size, preview=0,
                 callbacks=EngineCallbacks(too_long, finished, lambda stats: None, lambda: False))
        return [t or "" for t in texts]

    def _score(self, pairs: list[Pair]):
        if not pairs:
            return []
        results = score_pairs(self.lm, self.cfg, pairs).results
        if any(r is None for r in results):
            raise ValueError("a context + continuation does not fit the model's context (raise max_model_len)")
        return results


def _opt_int(v: Any) -> int | None:
    """lm-eval's ``--model_args`` give strings."""
    return None if v is None or v == "" or v == "None" else int(v)
