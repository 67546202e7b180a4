"""Random JSON schemas for structured-output tests and ``scripts/bench_structured.py``.

An object at the top; nested objects with required and optional properties, arrays, enums, integers
with bounds, numbers, booleans, nullable values, bounded or patterned strings. Everything is bounded,
so a random walk over the tokens a schema allows ends.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def random_json_schema(rng: random.Random, depth: int = 0, *, max_string_len: int = 8,
                       names: Sequence[str] | None = None) -> dict:
    """A random schema drawn from ``rng`` (the same draws give the same schema).

    ``max_string_len``: the largest ``maxLength`` of a bounded string. ``names``: property names are
    ``NAME_{depth}{i}`` with NAME drawn from it; None: ``k{depth}_{i}`` (no draw).
    """
    kinds = ["string", "integer", "number", "boolean", "enum", "array", "object", "nullable"]
    kind = "object" if depth == 0 else rng.choice(kinds[:5] if depth >= 3 else kinds)

    def inner() -> dict:
        return random_json_schema(rng, depth + 1, max_string_len=max_string_len, names=names)

    if kind == "string":
        return {"type": "string", "pattern": "^[a-z]{1,6}$"} if rng.random() < 0.2 else \
               {"type": "string", "minLength": rng.randint(0, 2), "maxLength": rng.randint(2, max_string_len)}
    if kind == "integer":
        low = rng.randint(-50, 50)
        return {"type": "integer", "minimum": low, "maximum": low + rng.randint(0, 1000)} if rng.random() < 0.5 else \
               {"type": "integer"}
    if kind == "number":
        return {"type": "number"}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "a \"quoted\" one", 1, 2.5, None, True], rng.randint(1, 4))}
    if kind == "nullable":
        return {"anyOf": [{"type": "null"}, inner()]}
    if kind == "array":
        most = rng.randint(1, 4)
        return {"type": "array", "items": inner(), "minItems": rng.randint(0, most), "maxItems": most}
    props = {(f"{rng.choice(names)}_{depth}{i}" if names else f"k{depth}_{i}"): inner() for i in range(rng.randint(1, 5))}
    return {"type": "object", "properties": props, "required": [p for p in props if rng.random() < 0.6],
            "additionalProperties": False}
