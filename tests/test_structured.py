"""batchllm.engine.structured on its own: compile cache and errors, masks filled and applied, matchers
accepting, terminating, rolling back and restoring; random-logits decode loops over many generated JSON
schemas (nested objects, arrays, enums, numbers, optional fields) whose finished outputs must validate
with jsonschema, and regex / choice / grammar outputs that must match."""

from __future__ import annotations

import json
import pickle
import random
import re

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from batchllm.bench.schemas import random_json_schema  # noqa: E402
from batchllm.engine.structured import CompileError, Grammar, GrammarCompiler, GrammarMatcher, apply_bitmask  # noqa: E402
from batchllm.models.dummy import preset_config  # noqa: E402
from batchllm.models.dummy_tokenizer import build_tokenizer  # noqa: E402
from batchllm.sampling_params import SamplingParams, StructuredOutput  # noqa: E402


@pytest.fixture(scope="module")
def byte_level():
    """The dummy presets' byte-level tokenizer (every byte a token) with the tiny preset's vocabulary."""
    cfg = preset_config("tiny")
    tok = build_tokenizer(cfg)
    return tok, GrammarCompiler(tok, cfg.vocab_size, cfg.eos_token_ids)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    """SmolLM2's own BPE tokenizer (multi-byte tokens, merges), from the built-in GGUF."""
    from batchllm.models import loader

    src = loader.resolve_model(smollm2_gguf_path)
    tok, cfg = loader.load_tokenizer(src), loader.load_config(src)
    return tok, GrammarCompiler(tok, cfg.vocab_size, cfg.eos_token_ids)


def random_decode(compiler: GrammarCompiler, tok, specs, *, max_tokens: int = 160, seed: int = 0):
    """Decode every spec at once from random logits under its mask, as the engine's step would: fill the
    constrained rows' masks, apply them, take the argmax (a random token the grammar allows), accept it;
    EOS ends a sequence. Returns (text, ended with EOS) per spec."""
    matchers = [compiler.matcher(s) for s in specs]
    assert all(isinstance(m, GrammarMatcher) for m in matchers), matchers
    bitmask = compiler.allocate_bitmask(len(specs))
    g = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in specs]
    ended = [False] * len(specs)
    for _ in range(max_tokens):
        live = [i for i in range(len(specs)) if not ended[i]]
        if not live:
            break
        compiler.fill_bitmask([matchers[i] for i in live], bitmask)
        logits = torch.randn(len(live), compiler.vocab_size, generator=g)
        apply_bitmask(logits, bitmask)
        for row, i in enumerate(live):
            token = int(logits[row].argmax())
            assert matchers[i].accept(token), matchers[i].error
            if token in compiler.eos_token_ids:
                ended[i] = True
            else:
                outputs[i].append(token)
    return [(tok.decode(o, skip_special_tokens=True), e) for o, e in zip(outputs, ended)]


def check_json_outputs(results, schemas, min_ended: float) -> None:
    ended = 0
    for (text, done), schema in zip(results, schemas):
        if done:
            ended += 1
            jsonschema.validate(json.loads(text), schema)  # every finished output parses and validates
    assert ended >= min_ended * len(schemas), f"only {ended} of {len(schemas)} outputs finished"


# ------------------------------------------------------------------------------------- compile, errors


def test_each_distinct_spec_compiles_once(byte_level):
    _, compiler = byte_level
    before = compiler.compiled
    a = compiler.compile(StructuredOutput("regex", "[0-9]{2}x"))
    again = compiler.compile(StructuredOutput("regex", "[0-9]{2}x"))  # equal content, another object
    other = compiler.compile(StructuredOutput("regex", "[0-9]{3}x"))
    assert isinstance(a, Grammar) and again is a and other is not a
    assert compiler.compiled == before + 2
    parsed = SamplingParams.from_fields({"guided_json": {"type": "object"}}).structured
    assert pickle.loads(pickle.dumps(parsed)) == parsed and compiler.compile(parsed) is compiler.compile(parsed)


@pytest.mark.parametrize("spec,message", [
    (StructuredOutput("regex", "[a-"), "unclosed character class"),
    (StructuredOutput("json", '{"type":"foo"}'), "Invalid type: foo"),
    (StructuredOutput("json", '{"$ref":"#/defs/x"}'), "Pointer '/defs/x' does not exist"),
    (StructuredOutput("json", '{"type":"string","format":"weird"}'), "Unknown format: weird"),
    (StructuredOutput("grammar", "root ::= missing"), "Rule 'missing' not found"),
    (StructuredOutput("grammar", "start: missing"), 'unknown name: "missing"'),
])
def test_invalid_spec_is_a_compile_error_with_the_engine_message(byte_level, spec, message):
    _, compiler = byte_level
    result = compiler.compile(spec)
    assert isinstance(result, CompileError) and message in result.message and "\n" not in result.message
    assert compiler.matcher(spec) is result  # cached too: the error is reported once per spec, per row


# ----------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the numpy path, the torch one
def test_apply_bitmask_touches_the_constrained_rows_only(dtype):
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    logits = torch.randn(6, vocab, generator=g).to(dtype)
    before = logits.clone()
    rows = [4, 0, 2]
    apply_bitmask(logits, bitmask, rows)
    for i, r in enumerate(rows):
        allowed = torch.tensor([(int(bitmask[i, t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)])
        assert torch.equal(logits[r][allowed], before[r][allowed]) and bool((logits[r][~allowed] == float("-inf")).all())
    for r in (1, 3, 5):
        assert torch.equal(logits[r], before[r])
    whole = before.clone()[:3]
    apply_bitmask(whole, bitmask)
    assert torch.equal(torch.isinf(whole), torch.isinf(logits[rows]))  # bitmask row i -> logits row i


@pytest.mark.parametrize("threads", [1, 2])
def test_async_fill_equals_the_batch_fill_and_the_single_fill(byte_level, threads):
    tok, _ = byte_level
    cfg = preset_config("tiny")
    compiler = GrammarCompiler(tok, cfg.vocab_size, cfg.eos_token_ids, threads=threads)
    specs = [StructuredOutput("json", json.dumps(random_json_schema(random.Random(i)))) for i in range(8)]
    matchers = [compiler.matcher(s) for s in specs]
    (brace,) = tok.encode("{", add_special_tokens=False)
    for m in matchers[::2]:
        assert m.accept(brace)
    a, b, c = (compiler.allocate_bitmask(8) for _ in range(3))
    compiler.fill_bitmask(matchers, a)
    compiler.fill_bitmask_async(matchers, b).result()
    for i, m in enumerate(matchers):
        m.fill_bitmask(c, i)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a[0], a[1])
    compiler.close()


# --------------------------------------------------------------------------------------------- matchers


def masks_along(compiler, matcher, tokens):
    """The mask before each of ``tokens`` and after the last, accepting them one by one."""
    out = []
    for t in [*tokens, None]:
        bm = compiler.allocate_bitmask(1)
        matcher.fill_bitmask(bm, 0)
        out.append(bm[0].clone())
        if t is not None:
            assert matcher.accept(t), matcher.error
    return out


def test_terminated_matcher_forces_eos(byte_level):
    tok, compiler = byte_level
    m = compiler.matcher(StructuredOutput("choice", '["yes", "no"]'))
    for t in tok.encode("yes", add_special_tokens=False):
        assert m.accept(t)
    assert m.terminated
    bm = compiler.allocate_bitmask(1)
    m.fill_bitmask(bm, 0)
    allowed = {t for t in range(compiler.vocab_size) if (int(bm[0, t // 32]) >> (t % 32)) & 1}
    assert allowed == set(compiler.eos_token_ids)
    eos = min(compiler.eos_token_ids)
    assert m.accept(eos) and m.accept(eos) and m.num_tokens == 5  # ignore_eos: forced EOS, again and again
    assert not m.accept(tok.encode("x", add_special_tokens=False)[0])


def test_rollback_restore_and_reset_give_back_earlier_states(byte_level):
    tok, compiler = byte_level
    spec = StructuredOutput("json", json.dumps({"type": "object", "properties": {"n": {"type": "integer"},
                                                "s": {"enum": ["ab", "cd"]}}, "required": ["n", "s"]}), False)
    tokens = tok.encode('{"n":42,"s":"cd"}', add_special_tokens=False) + [min(compiler.eos_token_ids)] * 2
    m = compiler.matcher(spec)
    masks = masks_along(compiler, m, tokens)
    assert m.terminated and m.num_tokens == len(tokens)
    for back in (1, 3, 9):  # forced EOS only, EOS and grammar tokens, grammar tokens
        m.rollback(back)
        assert m.num_tokens == len(tokens) - back and torch.equal(masks_along(compiler, m, [])[0], masks[-1 - back])
        assert all(m.accept(t) for t in tokens[len(tokens) - back:])
    # a sequence preempted and recomputed restores to its output, whatever the matcher accepted meanwhile
    other = tok.encode('{"n":7', add_special_tokens=False)
    m.restore(other)
    assert m.num_tokens == len(other)
    assert m.restore(tokens[:5]) and torch.equal(masks_along(compiler, m, [])[0], masks[5])
    assert not m.accept(tok.encode("x", add_special_tokens=False)[0]) and m.error is not None  # a token outside the mask: an error state...
    assert m.restore(tokens[:7]) and m.error is None and torch.equal(masks_along(compiler, m, [])[0], masks[7])
    m.reset()
    assert m.num_tokens == 0 and torch.equal(masks_along(compiler, m, [])[0], masks[0])


# --------------------------------------------------------------------------------------- decode loops


@pytest.mark.parametrize("any_whitespace", [False, True])
def test_random_decoding_under_json_schemas_validates(byte_level, any_whitespace):
    tok, compiler = byte_level
    rng = random.Random(17 + any_whitespace)
    # any whitespace: a random walk pads with it, so fewer schemas and fewer finish (a model would not)
    schemas = [random_json_schema(rng) for _ in range(40 if any_whitespace else 100)]
    specs = [StructuredOutput("json", json.dumps(s), any_whitespace) for s in schemas]
    results = []
    for start in range(0, len(specs), 50):  # batches of 50 sequences, each with its own schema
        results += random_decode(compiler, tok, specs[start:start + 50], max_tokens=200, seed=start)
    check_json_outputs(results, schemas, min_ended=0.5 if any_whitespace else 0.95)


def test_random_decoding_on_smollm2_tokens_validates(smollm2):
    tok, compiler = smollm2
    rng = random.Random(5)
    schemas = [random_json_schema(rng) for _ in range(40)]
    specs = [StructuredOutput("json", json.dumps(s), False) for s in schemas]
    check_json_outputs(random_decode(compiler, tok, specs, max_tokens=200), schemas, min_ended=0.8)
    objects = random_decode(compiler, tok, [StructuredOutput("json", '{"type":"object"}', False)] * 4, max_tokens=300)
    assert all(isinstance(json.loads(text), dict) for text, done in objects if done)


GRAMMARS = [  # (spec, a Python regex the whole output must match)
    (StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,4}"), r"[0-9]{3}-[a-z]{2,4}"),
    (StructuredOutput("regex", r"(cat|dog)s? (run|sleep)"), r"(cat|dog)s? (run|sleep)"),
    (StructuredOutput("choice", '["positive", "negative", "neutral"]'), r"positive|negative|neutral"),
    (StructuredOutput("grammar", 'root ::= "(" item ("," item)* ")"\nitem ::= [a-c] | "x" [0-9]'),
     r"\((?:[a-c]|x[0-9])(?:,(?:[a-c]|x[0-9]))*\)"),
    (StructuredOutput("grammar", 'start: "<" WORD (";" WORD)? ">"\nWORD: /[a-z]{1,5}/'), r"<[a-z]{1,5}(?:;[a-z]{1,5})?>"),
]


@pytest.mark.parametrize("spec,pattern", GRAMMARS)
def test_regex_choice_and_grammar_outputs_match(byte_level, smollm2, spec, pattern):
    for tok, compiler in (byte_level, smollm2):
        results = random_decode(compiler, tok, [spec] * 16, max_tokens=120, seed=3)
        assert sum(done for _, done in results) >= 12
        for text, done in results:
            if done:
                assert re.fullmatch(pattern, text), text
