"""--model org/name through the local Hugging Face cache, --tokenizer, --chat-template and
--served-model-name (issue 15). The cache is a fake one built in a temp folder (``HF_HUB_CACHE``, the
``models--org--name/snapshots/<hash>/`` + ``refs/main`` layout) holding a tiny safetensors model; nothing
goes to the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tests.job_utils import run_main

from batchllm.config import JobConfig, check_value, load_job_file
from batchllm.errors import BatchLLMError
from batchllm.jobs.manifest import fingerprint_changes, read_manifest
from batchllm.models import dummy, dummy_tokenizer, hf_folder, loader
from batchllm.pipeline import job_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = dummy.preset_config("tiny")


def tiny_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.05 for n, s in hf_folder.weight_shapes(TINY).items()}


def make_cached_model(cache: Path, repo: str = "org/tiny") -> Path:
    """A hub cache entry for ``repo``: refs/main naming a snapshot with config, weights and tokenizer."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    snap = entry / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(COMMIT)
    (snap / "config.json").write_text(json.dumps(TINY.to_hf()))
    save_file(tiny_state(), str(snap / "model.safetensors"), metadata={"format": "pt"})
    dummy_tokenizer.build_tokenizer(TINY).save_pretrained(str(snap))
    return snap


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty fake hub cache in HF_HUB_CACHE, offline, cwd in a temp folder (org/name is no local path)."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("BATCHLLM_CACHE_DIR", str(tmp_path / "batchllm-cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return cache


# ----------------------------------------------------------------------------------------- --model


def test_repo_id_resolves_through_the_hf_cache(hub):
    snap = make_cached_model(hub)
    src = loader.resolve_model("org/tiny")
    assert (src.kind, Path(src.path), src.display_name) == ("hf", snap, "org/tiny")
    assert loader.load_config(src).hidden_size == TINY.hidden_size
    tok = loader.load_tokenizer(src)
    assert tok("hi")["input_ids"]
    # the spec stays a name in the job spec: a resume from another folder resolves it again
    assert JobConfig(inputs=["x.jsonl"], output="o", model="org/tiny").with_absolute_paths().model == "org/tiny"


def test_repo_id_offline_and_absent_is_one_line_naming_the_cache(hub):
    with pytest.raises(BatchLLMError) as e:
        loader.resolve_model("org/absent")
    msg = str(e.value)
    assert "\n" not in msg and "'org/absent'" in msg and str(hub) in msg and "HF_HUB_OFFLINE=1" in msg


def test_repo_id_downloads_when_online(hub, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    real = huggingface_hub.snapshot_download
    asked = []

    def fake(repo_id, *, cache_dir=None, local_files_only=False, allow_patterns=None, **kw):
        asked.append((repo_id, local_files_only, allow_patterns))
        if local_files_only:
            return real(repo_id, cache_dir=cache_dir, local_files_only=True)
        if repo_id == "org/unreachable":
            raise ConnectionError("no route to host")
        make_cached_model(Path(cache_dir), repo_id)  # what a download leaves in the cache
        return real(repo_id, cache_dir=cache_dir, local_files_only=True)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    src = loader.resolve_model("org/fetched")
    assert src.display_name == "org/fetched" and Path(src.path).parent.parent.name == "models--org--fetched"
    assert ("org/fetched", False, loader.HUB_PATTERNS) in asked and not any("*.bin" in (p or []) for _, _, p in asked)
    with pytest.raises(BatchLLMError, match=r"could not be downloaded \(ConnectionError: no route to host; .*HF_HUB_OFFLINE=0\)"):
        loader.resolve_model("org/unreachable")


def test_paths_keep_their_old_messages(tmp_path):
    with pytest.raises(BatchLLMError, match="does not exist"):
        loader.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(BatchLLMError, match="does not exist"):
        loader.resolve_model("weights.gguf")


# ---------------------------------------------------------------------- --tokenizer / --chat-template


def test_overrides_change_the_fingerprint_and_leave_cached_tokenizers_alone(tmp_path):
    src = loader.resolve_model("dummy:tiny")
    cfg = JobConfig(inputs=[], output=str(tmp_path / "o"), model="dummy:tiny")
    base_tok = loader.load_tokenizer(src)
    before = base_tok.chat_template
    fp = job_fingerprint(cfg, src, base_tok, torch.float32)

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    templated = loader.load_tokenizer(src, chat_template=template)
    assert templated.chat_template == template and loader.load_tokenizer(src).chat_template == before
    assert templated.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True) == "<user>x<assistant>"
    assert fingerprint_changes(fp, job_fingerprint(cfg, src, templated, torch.float32)) == ["chat template"]

    other = tmp_path / "other-tok"
    dummy_tokenizer.build_tokenizer(dummy.preset_config("llama-3.2-1b")).save_pretrained(str(other))
    swapped = loader.load_tokenizer(src, tokenizer=str(other))
    assert "tokenizer" in fingerprint_changes(fp, job_fingerprint(cfg, src, swapped, torch.float32))


def test_chat_template_file_and_bad_templates(tmp_path):
    src = loader.resolve_model("dummy:tiny")
    f = tmp_path / "t.jinja"
    f.write_text("{{ messages[0]['content'] }}!")
    assert loader.load_tokenizer(src, chat_template=str(f)).chat_template == "{{ messages[0]['content'] }}!"
    with pytest.raises(BatchLLMError, match="no such file, and not template text"):
        loader.load_tokenizer(src, chat_template=str(tmp_path / "missing.jinja"))
    with pytest.raises(BatchLLMError) as e:
        loader.load_tokenizer(src, chat_template="{% if %}x")
    assert "not a valid Jinja template" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BatchLLMError, match="does not exist"):
        loader.load_tokenizer(src, tokenizer=str(tmp_path / "no-tok"))


def test_tokenizer_repo_id_through_the_cache(hub):
    make_cached_model(hub, "org/tok")
    src = loader.resolve_model("dummy:tiny")
    assert loader.load_tokenizer(src, tokenizer="org/tok")("hi")["input_ids"]
    with pytest.raises(BatchLLMError, match="tokenizer 'org/none' .*HF_HUB_OFFLINE=1"):
        loader.load_tokenizer(src, tokenizer="org/none")


# ----------------------------------------------------------------------------------- config and CLI


def test_new_fields_in_schema_spec_and_job_files(tmp_path):
    cfg = JobConfig(inputs=["a.jsonl"], output="o", served_model_name="my-model", tokenizer="org/tok", split="test")
    spec = cfg.to_dict()
    assert (spec["served_model_name"], spec["tokenizer"], spec["split"], spec["chat_template"]) == ("my-model", "org/tok", "test", None)
    assert JobConfig.from_spec(spec).served_model_name == "my-model"
    for key in ("served_model_name", "tokenizer", "chat_template", "split"):
        check_value(key, None)
        with pytest.raises(BatchLLMError, match=key):
            check_value(key, 3)
    job = tmp_path / "job.toml"
    (tmp_path / "t.jinja").write_text("{{ x }}")
    job.write_text('model = "org/tiny"\ntokenizer = "org/tok"\nchat_template = "t.jinja"\nserved_model_name = "m"\n')
    flat = load_job_file(str(job))
    assert (flat["model"], flat["tokenizer"], flat["chat_template"], flat["served_model_name"]) == (
        "org/tiny", "org/tok", str(tmp_path / "t.jinja"), "m")


def test_cli_run_with_a_cached_hub_model(hub, tmp_path, capsys):
    make_cached_model(hub)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    tpl = tmp_path / "chat.jinja"
    tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}=")
    out = tmp_path / "out"
    common = [str(inp), "-o", str(out), "--device", "cpu", "--dtype", "float32", "--max-tokens", "2", "-q"]
    code, err = run_main(["run", *common, "--model", "org/tiny", "--chat-template", str(tpl), "--served-model-name", "served"], capsys)
    assert code == 0, err
    job = read_manifest(str(out))["job"]
    assert (job["model"], job["served_model_name"], job["chat_template"]) == ("org/tiny", "served", str(tpl))
    # another chat template is another job: refused, in one line
    code, err = run_main(["run", *common, "--model", "org/tiny", "--chat-template", "{{ 'x' }}"], capsys)
    assert code == 1 and "chat template" in err and len(err.strip().splitlines()) == 1
    code, err = run_main(["run", *common[:2], str(tmp_path / "out2"), *common[3:], "--model", "org/absent"], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and str(hub) in lines[0]


def test_the_fingerprint_of_a_job_without_structured_output_is_the_one_earlier_versions_wrote(tmp_path):
    """Job folders written before structured output existed resume: their fingerprint's sampling section
    has exactly these keys, and a job that asks for no constraint must produce the same section."""
    src = loader.resolve_model("dummy:tiny")
    cfg = JobConfig(inputs=[], output=str(tmp_path / "o"), model="dummy:tiny")
    fp = job_fingerprint(cfg, src, loader.load_tokenizer(src), torch.float32)
    assert sorted(fp["sampling"]) == [
        "frequency_penalty", "ignore_eos", "logprobs", "max_tokens", "min_p", "min_tokens", "n", "presence_penalty",
        "repetition_penalty", "seed", "stop", "stop_token_ids", "temperature", "top_k", "top_p",
    ]
