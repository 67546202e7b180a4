"""The synthetic benchmark workloads of ``docs/benchmarks.md``, reproducible from a seed.

Five workloads, each a function of a few shape parameters (defaults = the table in benchmarks.md;
where that table leaves a size open, the default is chosen here and documented in ``WORKLOADS``):

- ``shared-prefix``: ``groups`` x ``per_group`` requests; each group shares a ``prefix_len`` prefix, each
  request adds ``suffix_len`` own tokens; ``output_len`` outputs (SGLang's generated-shared-prefix).
- ``prefix-grid``: a grid of shared-prefix cells, prefix length x share degree x output length, with
  ``requests`` requests per cell (``requests // share`` groups). Each cell is its own run; the harness
  reports the geometric mean of the per-cell ratios.
- ``no-sharing``: ``requests`` prompts of ``suffix_len`` random tokens each (nothing shared).
- ``decode-heavy-mix``: shared-prefix groups, even groups with ``short_output_len`` outputs, odd groups
  with ``output_len``.
- ``nested``: one ``prefix_len`` system prompt shared by all, ``groups`` sub-prefixes of
  ``sub_prefix_len`` tokens under it, ``per_group`` requests under each.

Token ids are drawn uniformly from ``[TOKEN_LOW, min(vocab_size, TOKEN_HIGH))``, which every preset and
common model covers, so one seed gives the same requests on every model. The first token after each
branch point (group prefixes, sub-prefixes, suffixes) is drawn without replacement among its siblings,
so shared prefixes are exactly as long as the parameters say (no accidental one-token overlaps). Rows
are shuffled by default: users' files are not sorted by prefix, and the streaming baseline sees input
order. Every request ignores EOS, so output lengths are exact.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Any

import numpy as np

from batchllm.errors import BatchLLMError

TOKEN_LOW, TOKEN_HIGH = 16, 32000  # skip the low ids, where tokenizers keep special tokens

# name -> default shape; list values are grid axes.
WORKLOADS: dict[str, dict[str, Any]] = {
    "shared-prefix": dict(groups=8, per_group=64, prefix_len=1024, suffix_len=64, output_len=128),
    # benchmarks.md fixes the axes and the 128 distinct tokens; 128 requests per cell is our choice
    "prefix-grid": dict(prefix_lens=[512, 2048, 8192], share_degrees=[4, 16, 64], output_lens=[32, 256], suffix_len=128, requests=128),
    "no-sharing": dict(requests=1024, suffix_len=512, output_len=256),
    # group count, sizes and prefix follow shared-prefix (benchmarks.md fixes only the 16 / 1024 outputs)
    "decode-heavy-mix": dict(groups=8, per_group=64, prefix_len=1024, suffix_len=64, output_len=1024, short_output_len=16),
    # the 64 own tokens and 128 outputs per request are our choice, as in shared-prefix
    "nested": dict(prefix_len=2048, groups=16, sub_prefix_len=512, per_group=32, suffix_len=64, output_len=128),
}
COMMON = dict(seed=0, shuffle=True)
# a scalar override of a grid axis restricts that axis to one value
GRID_ALIASES = {"prefix_len": "prefix_lens", "per_group": "share_degrees", "output_len": "output_lens"}
MAY_BE_ZERO = {"prefix_len", "prefix_lens", "sub_prefix_len"}


@dataclasses.dataclass
class Cell:
    """One run's request set: ``rows`` are JSONL-ready dicts (custom_id, prompt_token_ids, max_tokens,
    ignore_eos), in file order."""

    label: str
    params: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r["prompt_token_ids"]) for r in self.rows)

    @property
    def output_tokens(self) -> int:
        return sum(r["max_tokens"] for r in self.rows)


@dataclasses.dataclass
class Workload:
    name: str
    params: dict[str, Any]  # the resolved shape (defaults + overrides)
    cells: list[Cell]


def resolve_params(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults of workload ``name`` with ``overrides`` applied (None values ignored).

    BatchLLMError for an unknown workload, a parameter the workload does not have, or a bad value.
    """
    if name not in WORKLOADS:
        raise BatchLLMError(f"unknown workload {name!r}; known workloads: {', '.join(WORKLOADS)}")
    params = {**WORKLOADS[name], **COMMON}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if name == "prefix-grid" and key in GRID_ALIASES:
            key, value = GRID_ALIASES[key], [value]
        if key not in params:
            accepted = ", ".join(k.replace("_", "-") for k in params)
            raise BatchLLMError(f"workload {name} has no parameter {key.replace('_', '-')} (it has: {accepted})")
        params[key] = list(value) if isinstance(params[key], list) else value
    for key, value in params.items():
        if key == "shuffle":
            if not isinstance(value, bool):
                raise BatchLLMError(f"workload parameter shuffle must be true or false, got {value!r}")
            continue
        values = value if isinstance(value, list) else [value]
        low = 0 if key in MAY_BE_ZERO or key == "seed" else 1
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values):
            raise BatchLLMError(f"workload parameter {key.replace('_', '-')} must be {'a list of ' if isinstance(value, list) else ''}integer(s) >= {low}, got {value!r}")
    return params


def make_workload(name: str, overrides: dict[str, Any] | None = None, vocab_size: int = TOKEN_HIGH) -> Workload:
    """Build workload ``name`` (see the module docstring); deterministic in (params, vocab_size)."""
    params = resolve_params(name, overrides)
    high = min(vocab_size, TOKEN_HIGH)
    if high - TOKEN_LOW < 2:
        raise BatchLLMError(f"vocabulary of {vocab_size} ids is too small for random-token workloads")
    if name == "prefix-grid":
        cells = []
        axes = itertools.product(params["prefix_lens"], params["share_degrees"], params["output_lens"])
        for i, (plen, share, olen) in enumerate(axes):
            shape = dict(groups=max(1, params["requests"] // share), per_group=share, prefix_len=plen,
                         suffix_len=params["suffix_len"], output_len=olen)
            rng = np.random.default_rng([params["seed"], i])
            rows = _grouped(rng, high, [shape["prefix_len"]] * shape["groups"], shape["per_group"], shape["suffix_len"], [olen] * shape["groups"])
            cells.append(Cell(f"prefix {plen} x share {share} x out {olen}", shape, _finish(rows, rng, params["shuffle"])))
        return Workload(name, params, cells)
    rng = np.random.default_rng([params["seed"], 0])
    p = params
    if name == "shared-prefix":
        rows = _grouped(rng, high, [p["prefix_len"]] * p["groups"], p["per_group"], p["suffix_len"], [p["output_len"]] * p["groups"])
    elif name == "no-sharing":
        rows = _grouped(rng, high, [0], p["requests"], p["suffix_len"], [p["output_len"]])
    elif name == "decode-heavy-mix":
        outs = [p["short_output_len"] if g % 2 == 0 else p["output_len"] for g in range(p["groups"])]
        rows = _grouped(rng, high, [p["prefix_len"]] * p["groups"], p["per_group"], p["suffix_len"], outs)
    else:  # nested: system prompt + sub-prefix groups
        system = _tokens(rng, high, p["prefix_len"])
        rows = _grouped(rng, high, [p["sub_prefix_len"]] * p["groups"], p["per_group"], p["suffix_len"], [p["output_len"]] * p["groups"], head=system)
    return Workload(name, params, [Cell(name, {k: v for k, v in params.items() if k not in COMMON}, _finish(rows, rng, p["shuffle"]))])


def write_jsonl(rows: list[dict[str, Any]], path: str) -> None:
    """Write request rows as a JSONL file ``batchllm run`` reads."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")


def _tokens(rng: np.random.Generator, high: int, n: int) -> np.ndarray:
    return rng.integers(TOKEN_LOW, high, size=n, dtype=np.int64)


def _distinct_first(rng: np.random.Generator, high: int, n: int) -> np.ndarray:
    """``n`` first tokens of sibling branches: distinct when the id range allows it."""
    return rng.choice(np.arange(TOKEN_LOW, high), size=n, replace=n > high - TOKEN_LOW)


def _grouped(rng, high, prefix_lens, per_group, suffix_len, output_lens, head=None) -> list[dict[str, Any]]:
    """Rows of groups: group g = ``head`` + its own prefix of ``prefix_lens[g]`` tokens, then
    ``per_group`` requests of ``suffix_len`` own tokens each, with ``output_lens[g]`` outputs."""
    head = np.zeros(0, dtype=np.int64) if head is None else head
    g_first = _distinct_first(rng, high, len(prefix_lens))
    rows = []
    for g, (plen, olen) in enumerate(zip(prefix_lens, output_lens)):
        prefix = _tokens(rng, high, plen)
        if plen:
            prefix[0] = g_first[g]
        suffixes = _tokens(rng, high, per_group * suffix_len).reshape(per_group, suffix_len)
        suffixes[:, 0] = _distinct_first(rng, high, per_group)
        for m in range(per_group):
            ids = np.concatenate([head, prefix, suffixes[m]])
            rows.append({"custom_id": f"g{g}-r{m}", "prompt_token_ids": ids.tolist(), "max_tokens": int(olen), "ignore_eos": True})
    return rows


def _finish(rows: list[dict[str, Any]], rng: np.random.Generator, shuffle: bool) -> list[dict[str, Any]]:
    if shuffle:
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows
