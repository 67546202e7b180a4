"""The ``batchllm`` command line (typer + rich).

``batchllm run INPUT... --output DIR`` runs a batch job; rerun on the same folder, or
``batchllm resume DIR``, it continues where it stopped. ``batchllm show DIR`` summarises a job,
``batchllm export DIR`` merges its shards.

Exit status: 0 when the job finished, failed rows included (they are error records in the output);
1 for a job-level failure (``BatchLLMError``: unreadable input, unknown model, unwritable or full
output folder, a mismatched resume), printed as one line (``--verbose`` adds the traceback); 2 for
usage errors; 128 + signal number after SIGINT / SIGTERM, once complete work is committed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from batchllm.bench.command import bench
from batchllm.errors import BatchLLMError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # a bug shows a plain traceback; user errors never reach it
    help="Offline batch inference for LLMs with global prefix sharing.",
)
console = Console(stderr=True)
out = Console()


app.command()(bench)  # batchllm bench: the benchmark harness (batchllm.bench)


@app.callback()
def _root() -> None:
    """Offline batch inference for LLMs with global prefix sharing (BatchLLM)."""


class _TokensPerSecond(ProgressColumn):
    def render(self, task) -> Text:
        tps = task.fields.get("tok_s")
        return Text(f"{tps:,.0f} tok/s" if tps else "- tok/s", style="cyan")


@app.command()
def run(
    inputs: List[str] = typer.Argument(None, help="Prompt files: JSONL, Parquet, OpenAI batch JSONL, or an HF datasets folder/file."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Output folder for Parquet shards and the manifest: a path or a pyarrow filesystem URI (s3://, gs://, ...). Task score: the output file."),
    task: Optional[str] = typer.Option(None, "--task", help="generate (completions into a job folder; the default) | score (what batchllm score runs: log-likelihoods of one input file's continuations and texts into one output file)."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Task score: input tokens per rolling window (default: the model's context)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model folder, .gguf file, or dummy:PRESET. Default: built-in SmolLM2-135M-Instruct."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer to use instead of the model's: a folder or a Hugging Face repo id (org/name)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat template replacing the model's: a Jinja file or the template text."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model name the outputs report (OpenAI export; default: the model's name)."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a dataset-dict input (a saved DatasetDict folder or a hub dataset); required when it has several."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 (float) | bfloat16 | float16 (half)"),
    max_tokens: Optional[int] = typer.Option(None, help="Default max output tokens per sample (rows override)."),
    temperature: Optional[float] = typer.Option(None, help="Default temperature (0 = greedy)."),
    top_p: Optional[float] = typer.Option(None, help="Default nucleus sampling p."),
    top_k: Optional[int] = typer.Option(None, help="Default top-k (-1 = off)."),
    min_p: Optional[float] = typer.Option(None, help="Default min-p."),
    seed: Optional[int] = typer.Option(None, help="Job seed; per-sample seeds derive from it, the custom_id and the sample index."),
    response_format: Optional[str] = typer.Option(None, "--response-format", help='Default structured output, OpenAI\'s response_format as JSON, e.g. \'{"type": "json_object"}\' (rows override).'),
    guided_json: Optional[str] = typer.Option(None, "--guided-json", help="Default structured output: a JSON schema (JSON text) every completion follows (rows override)."),
    guided_regex: Optional[str] = typer.Option(None, "--guided-regex", help="Default structured output: a regular expression every completion matches (rows override)."),
    guided_choice: Optional[str] = typer.Option(None, "--guided-choice", help='Default structured output: a JSON list of strings, one of which every completion is (rows override).'),
    guided_grammar: Optional[str] = typer.Option(None, "--guided-grammar", help="Default structured output: a GBNF grammar every completion follows (rows override)."),
    job: Optional[str] = typer.Option(None, "--job", help="TOML job file; flags given here override it."),
    id_column: Optional[str] = typer.Option(None, help="Column holding the custom_id."),
    prompt_column: Optional[str] = typer.Option(None, help="Column holding raw prompt text."),
    messages_column: Optional[str] = typer.Option(None, help="Column holding chat messages."),
    prompt_template: Optional[str] = typer.Option(None, help="str.format template over the row's fields, e.g. 'Summarise: {article}'."),
    system_prompt: Optional[str] = typer.Option(None, help="System message added to chat rows that have none."),
    chat: Optional[bool] = typer.Option(None, "--chat/--no-chat", help="Send raw prompts and --prompt-template renderings through the model's chat template as a user message (after --system-prompt). Default: off."),
    keep_columns: Optional[str] = typer.Option(None, "--keep-columns", help="Input columns to carry into the output rows: A,B or all."),
    policy: Optional[str] = typer.Option(None, help="batchllm (global prefix plan) | fcfs-lru (streaming baseline)."),
    attention: Optional[str] = typer.Option(None, help="Attention backend: auto | torch | triton."),
    sampler: Optional[str] = typer.Option(None, help="Sampler backend: auto (the Triton kernel for CUDA logits) | torch | triton."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="Token budget per engine step."),
    max_num_seqs: Optional[int] = typer.Option(None, help="Cap on running sequences (default: KV memory only)."),
    max_model_len: Optional[int] = typer.Option(None, help="Context limit (prompt + output)."),
    kv_cache_tokens: Optional[int] = typer.Option(None, help="KV pool size in tokens (default: from free memory)."),
    kv_cache_dtype: Optional[str] = typer.Option(None, "--kv-cache-dtype", help="KV cache storage: auto (the model's dtype) | fp8 (e4m3, one byte per element: twice the tokens; alias fp8_e4m3)."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="Fraction of the GPU's total memory this job may use (default 0.9); the KV pool gets what the weights, a profiled step and CUDA graphs leave."),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--cuda-graphs", help="Run every step eagerly (no CUDA graphs for decode steps; default: graphs on CUDA)."),
    page_size: Optional[int] = typer.Option(None, help="Tokens per KV page."),
    shard_rows: Optional[int] = typer.Option(None, help="Rows per output shard, the unit of commit (default 10,000)."),
    preview: Optional[int] = typer.Option(None, help="Completions to print after the run."),
    replicas: Optional[int] = typer.Option(None, help="Engine replicas on Ray, one GPU each (CPU with --device cpu); needs pip install 'batchllm[ray]'."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run the replicas on ('auto': the running cluster; default: a local Ray when --replicas > 1)."),
    ray_start_timeout: Optional[float] = typer.Option(None, help="Seconds Ray may take to start or connect before the job fails (default 300)."),
    replica_start_timeout: Optional[float] = typer.Option(None, help="Seconds the Ray replicas may take to start and load the model before the job fails (default 1800)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete a previous job's results in the output folder instead of resuming it."),
    verify: bool = typer.Option(False, "--verify", help="When the output folder holds a job to continue, check every committed shard's sha256 first (default: sizes only)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or preview."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and library logs."),
) -> None:
    """Run a batch job: prompts in, completions out as Parquet shards.

    If the output folder holds this same job (same model, tokenizer, sampling defaults, seed, columns
    and inputs), it resumes; if it holds a different one, it refuses unless --overwrite."""
    from batchllm.config import load_job_file, merge

    _set_verbose(verbose)
    flags = dict(
        task=task, max_length=max_length, response_format=_json_flag("--response-format", response_format),
        guided_json=guided_json, guided_regex=guided_regex, guided_choice=_json_flag("--guided-choice", guided_choice),
        guided_grammar=guided_grammar,
        inputs=inputs or None, output=output, model=model, tokenizer=tokenizer, chat_template=chat_template,
        served_model_name=served_model_name, split=split, device=device, dtype=dtype, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed, id_column=id_column,
        prompt_column=prompt_column, messages_column=messages_column, prompt_template=prompt_template,
        system_prompt=system_prompt, chat=chat, keep_columns=keep_columns, policy=policy, attention=attention,
        sampler=sampler, max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens, kv_cache_dtype=kv_cache_dtype,
        page_size=page_size,
        gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
        shard_rows=shard_rows, preview=preview, replicas=replicas, ray_address=ray_address,
        ray_start_timeout=ray_start_timeout, replica_start_timeout=replica_start_timeout,
    )
    cfg = merge(load_job_file(job) if job else {}, flags)
    cfg.validate()
    if cfg.task == "score":
        _score_and_report(cfg)  # one output file, written whole: nothing to resume, verify or overwrite
        return
    if verify and not overwrite:
        from batchllm.jobs.integrity import verify_job
        from batchllm.jobs.manifest import read_manifest

        if read_manifest(cfg.output) is not None:  # a job to continue: its shards' bytes first
            verify_job(cfg.output, full=True)
    _run_and_report(cfg, quiet, overwrite=overwrite)


@app.command()
def resume(
    output_dir: str = typer.Argument(..., help="The job's output folder."),
    device: Optional[str] = typer.Option(None, help="Run on another device than the job started on: auto | cpu | cuda."),
    shard_rows: Optional[int] = typer.Option(None, help="Rows per shard from now on."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="Token budget per engine step."),
    kv_cache_tokens: Optional[int] = typer.Option(None, help="KV pool size in tokens."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="Fraction of the GPU's total memory this job may use."),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--cuda-graphs", help="Run every step eagerly (no CUDA graphs)."),
    replicas: Optional[int] = typer.Option(None, help="Engine replicas on Ray (may differ from the first run)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run the replicas on ('auto': the running cluster)."),
    ray_start_timeout: Optional[float] = typer.Option(None, help="Seconds Ray may take to start or connect (default 300)."),
    replica_start_timeout: Optional[float] = typer.Option(None, help="Seconds the replicas may take to load the model (default 1800)."),
    verify: bool = typer.Option(False, "--verify", help="Check every committed shard's sha256 first (default: sizes only)."),
    repair: bool = typer.Option(False, "--repair", help="Drop committed shards that are missing or fail the sha256 check from the manifest, then rerun exactly their rows."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or preview."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and library logs."),
) -> None:
    """Continue a stopped or killed job from its manifest alone; finished requests are not redone.

    Only options that do not change outputs may be given here. A damaged job (a committed shard lost or
    changed) is refused with the repair command; --repair reruns the lost rows."""
    from batchllm.config import JobConfig
    from batchllm.jobs.manifest import read_manifest

    _set_verbose(verbose)
    manifest = read_manifest(output_dir)
    if manifest is None or not manifest.get("job"):
        raise BatchLLMError(f"{output_dir} holds no batchllm job to resume (no .manifest.json)")
    cfg = JobConfig.from_spec(manifest["job"])
    cfg.output = output_dir
    for name, value in (("device", device), ("shard_rows", shard_rows), ("max_num_batched_tokens", max_num_batched_tokens),
                        ("kv_cache_tokens", kv_cache_tokens), ("gpu_memory_utilization", gpu_memory_utilization),
                        ("enforce_eager", enforce_eager), ("replicas", replicas), ("ray_address", ray_address),
                        ("ray_start_timeout", ray_start_timeout), ("replica_start_timeout", replica_start_timeout)):
        if value is not None:
            setattr(cfg, name, value)
    cfg.validate()
    if repair:
        from batchllm.jobs.integrity import repair_job

        dropped = repair_job(output_dir)
        if dropped:
            console.print(f"repaired {output_dir}: dropped {len(dropped)} damaged shards "
                          f"({', '.join(d.file for d in dropped[:3])}{' ...' if len(dropped) > 3 else ''}); "
                          f"rerunning their {sum(d.rows for d in dropped):,} rows", highlight=False, soft_wrap=True)
        elif not quiet:
            console.print(f"{output_dir}: every committed shard matches its sha256; nothing to repair")
    elif verify:
        from batchllm.jobs.integrity import verify_job

        verify_job(output_dir, full=True)
    _run_and_report(cfg, quiet)


@app.command()
def show(
    output_dir: str = typer.Argument(..., help="The job's output folder."),
    verify: bool = typer.Option(False, "--verify", help="Check every committed shard's sha256 (default: sizes only)."),
) -> None:
    """Summarise a job, running or finished: progress, throughput, errors by code, prefix reuse.

    Exits 1 with the repair command when a committed shard is missing or does not match the manifest."""
    from batchllm.io.writer import DamagedJob
    from batchllm.jobs.show import show_job

    s = show_job(output_dir, out, verify=verify)
    if s["damage_message"]:
        raise DamagedJob(s["damage_message"])


@app.command()
def export(
    output_dir: str = typer.Argument(..., help="The job's output folder."),
    to: str = typer.Option(..., "--to", help="File to write."),
    fmt: str = typer.Option("parquet", "--format", "-f", help="parquet | jsonl | openai (OpenAI Batch output file, plus <stem>.errors.jsonl)."),
    ordered: bool = typer.Option(False, "--ordered", help="In input order (input file, row, sample) instead of commit order."),
    errors_to: Optional[str] = typer.Option(None, "--errors-to", help="openai format: where to write the error file."),
    allow_partial: bool = typer.Option(False, "--allow-partial", help="Export a job that has not completed (running, interrupted, cancelled, failed): the requests committed so far."),
) -> None:
    """Merge a job's committed shards into one file (every shard's size and sha256 checked first).

    The target may not be inside a job folder; a damaged job is refused with the repair command. A job
    that has not completed is refused (exit 1) unless --allow-partial, which exports what is committed
    with a warning."""
    from batchllm.jobs.export import export_job

    res = export_job(output_dir, fmt, to, ordered=ordered, errors_to=errors_to, require_complete=not allow_partial)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    if res.state != "completed":
        console.print(f"[yellow]warning:[/] the job is not complete ({res.state}): the export holds only the requests "
                      f"committed so far", highlight=False, soft_wrap=True)
    console.print(f"exported {res.requests:,} requests ({res.failed:,} failed, {res.rows:,} rows) to {', '.join(res.paths)}")


@app.command("run-batch")
def run_batch(
    input_file: str = typer.Option(..., "--input-file", "-i", help="OpenAI Batch API input file (JSONL: custom_id, method, url, body): a path or a pyarrow filesystem URI."),
    output_file: str = typer.Option(..., "--output-file", "-o", help="OpenAI Batch output file to write when the job completes (errors go to <stem>.errors.jsonl beside it): a path or a URI."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model folder, .gguf file, or dummy:PRESET. Default: built-in SmolLM2-135M-Instruct."),
    served_model_name: Optional[List[str]] = typer.Option(None, "--served-model-name", help="Model name(s) requests may ask for and bodies report (repeat the flag for several; default: the --model value)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer to use instead of the model's: a folder or a Hugging Face repo id (org/name)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat template replacing the model's: a Jinja file or the template text."),
    response_role: str = typer.Option("assistant", "--response-role", help="Role of the chat messages in the output bodies."),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 (float) | bfloat16 | float16 (half)"),
    seed: Optional[int] = typer.Option(None, help="Job seed; per-sample seeds derive from it, the custom_id and the sample index."),
    max_model_len: Optional[int] = typer.Option(None, help="Context limit (prompt + output)."),
    max_num_seqs: Optional[int] = typer.Option(None, help="Cap on running sequences (default: KV memory only)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="Token budget per engine step."),
    gpu_memory_utilization: Optional[float] = typer.Option(None, help="Fraction of the GPU's total memory this job may use (default 0.9)."),
    enforce_eager: Optional[bool] = typer.Option(None, "--enforce-eager/--cuda-graphs", help="Run every step eagerly (no CUDA graphs)."),
    kv_cache_tokens: Optional[int] = typer.Option(None, help="KV pool size in tokens (default: from free memory)."),
    kv_cache_dtype: Optional[str] = typer.Option(None, "--kv-cache-dtype", help="KV cache storage: auto | fp8 (e4m3, one byte per element; alias fp8_e4m3)."),
    max_tokens: Optional[int] = typer.Option(None, help="max_tokens of requests that set none (default 256; vLLM: the rest of the context)."),
    temperature: Optional[float] = typer.Option(None, help="temperature of requests that set none (default 1.0, as OpenAI)."),
    top_p: Optional[float] = typer.Option(None, help="top_p of requests that set none (default 1.0)."),
    top_k: Optional[int] = typer.Option(None, help="top_k of requests that set none (default -1: off)."),
    min_p: Optional[float] = typer.Option(None, help="min_p of requests that set none (default 0)."),
    policy: Optional[str] = typer.Option(None, help="batchllm (global prefix plan) | fcfs-lru (streaming baseline)."),
    attention: Optional[str] = typer.Option(None, help="Attention backend: auto | torch | triton."),
    shard_rows: Optional[int] = typer.Option(None, help="Rows per committed shard in the job folder (default 10,000)."),
    replicas: Optional[int] = typer.Option(None, help="Engine replicas on Ray; needs pip install 'batchllm[ray]'."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster to run the replicas on ('auto': the running cluster)."),
    enable_prompt_tokens_details: bool = typer.Option(False, "--enable-prompt-tokens-details", help="Accepted for vLLM command lines: usage always has prompt_tokens_details here."),
    enable_force_include_usage: bool = typer.Option(False, "--enable-force-include-usage", help="Accepted for vLLM command lines: every body always has usage here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over: delete the results of a different earlier job in OUT.batchllm instead of refusing."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or preview."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and library logs."),
) -> None:
    """vllm run-batch, durable: run an OpenAI Batch API input file, write the OpenAI output file.

    The job runs in OUT.batchllm beside the output (batchllm show reads it); rerun the same command to
    resume after a stop. OUT (status 200 lines, input order) and OUT's stem + .errors.jsonl (failed
    requests, as OpenAI's error file) are written whole when the job completes."""
    from batchllm.jobs import run_batch as rb
    from batchllm.jobs.signals import JobInterrupted

    _set_verbose(verbose)
    options = dict(
        tokenizer=tokenizer, chat_template=chat_template,
        device=device, dtype=dtype, seed=seed, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager, kv_cache_tokens=kv_cache_tokens, kv_cache_dtype=kv_cache_dtype, max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p, top_k=top_k, min_p=min_p, policy=policy, attention=attention, shard_rows=shard_rows,
        replicas=replicas, ray_address=ray_address, preview=0,
    )
    batch = rb.prepare(input_file, output_file, model=model, served_model_name=served_model_name,
                       response_role=response_role, options=options)
    try:
        _run_and_report(batch.config, quiet, overwrite=overwrite)
    except JobInterrupted as e:
        if e.output_dir is not None:  # batchllm resume would continue the job but not write the output file
            e.args = (str(e).replace(f"resume with: batchllm resume {e.output_dir}",
                                     f"run the same command again to continue and write {batch.output_file}"),)
        raise
    res = rb.finish(batch)
    for w in res.warnings:
        console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    console.print(f"wrote {res.requests - res.failed:,} results to {batch.output_file} and {res.failed:,} errors to "
                  f"{batch.errors_file} (job folder {batch.job_dir})", highlight=False, soft_wrap=True)


def _run_and_report(cfg, quiet: bool, overwrite: bool = False) -> None:
    from batchllm.pipeline import run_job  # torch import deferred until the flags are known good

    view = None if quiet else _ProgressView()
    try:
        summary = run_job(cfg, progress=view.hook if view else None, overwrite=overwrite)
    finally:
        if view is not None:
            view.close()
    if summary.samples == 0 and summary.errors == 0 and summary.done_before:
        console.print(f"nothing left to do: all {summary.done_before:,} requests of this job are done "
                      f"(see batchllm show {cfg.output}, or --overwrite to start over)")
        if not quiet and cfg.preview:
            _print_preview(_committed_preview(cfg.output, cfg.preview))
        return
    _print_summary(cfg, summary)
    if not quiet and summary.preview:
        _print_preview(summary.preview)


def _json_flag(flag: str, value: str | None):
    """A flag's JSON value, parsed; BatchLLMError in one line when it is not JSON."""
    import json

    if value is None:
        return None
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise BatchLLMError(f"{flag} must be JSON ({e.msg} at character {e.pos}), got {value!r}") from None


def _committed_preview(output_dir: str, n: int) -> list[dict]:
    """The first ``n`` completions already committed in a job folder, for a finished job's rerun."""
    from batchllm.io.writer import read_results

    rows = read_results(output_dir).select(["custom_id", "text", "error_code"]).slice(0, 10 * n).to_pylist()
    return [{"custom_id": r["custom_id"], "prompt": "", "text": r["text"]} for r in rows if r["error_code"] is None][:n]


@app.command()
def score(
    input_file: str = typer.Argument(..., help='JSONL rows: {"context", "continuations": [...]} (or "continuation"), or {"text"} for a rolling log-likelihood; optional "id".'),
    output: str = typer.Option(..., "--output", "-o", help="Output file: JSONL, or Parquet for a .parquet name; one row per continuation / text."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF model folder, .gguf file, or dummy:PRESET. Default: built-in SmolLM2-135M-Instruct."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    dtype: str = typer.Option("auto", help="auto | float32 (float) | bfloat16 | float16 (half)"),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="Input tokens per rolling window (default: the model's context)."),
    max_model_len: Optional[int] = typer.Option(None, help="Context limit (context + continuation + 1)."),
    max_num_batched_tokens: Optional[int] = typer.Option(None, help="Token budget per engine step."),
    kv_cache_tokens: Optional[int] = typer.Option(None, help="KV pool size in tokens (default: from free memory)."),
    page_size: int = typer.Option(16, help="Tokens per KV page."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tracebacks and library logs."),
) -> None:
    """Log-likelihoods of continuations given contexts (lm-evaluation-harness's loglikelihood: summed
    logprob, token count, is_greedy) and rolling log-likelihoods of texts; shared contexts computed once."""
    from batchllm.config import JobConfig

    _set_verbose(verbose)
    cfg = JobConfig(task="score", inputs=[input_file], output=output, model=model, device=device, dtype=dtype,
                    max_model_len=max_model_len, max_num_batched_tokens=max_num_batched_tokens,
                    kv_cache_tokens=kv_cache_tokens, page_size=page_size, max_length=max_length)
    cfg.validate()
    _score_and_report(cfg)


def _score_and_report(cfg) -> None:
    """Run a validated ``task = "score"`` config (``batchllm score``, or a job file's task) and print its line."""
    from batchllm.score import score_file

    output = cfg.output
    written, errors, run = score_file(cfg, cfg.inputs[0], output, max_length=cfg.max_length)
    typer.echo(f"{written} rows ({errors} errors) -> {output}; prefill saving {run.achieved_saving:.1%} "
               f"(planned {run.planned_saving:.1%}): {run.prompt_tokens_computed} of {run.prompt_tokens} prompt tokens computed")


@app.command()
def stats(
    inputs: List[str] = typer.Argument(..., help="Prompt files, as for run."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model whose tokenizer and KV size to use (weights are not loaded)."),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="Tokenizer to use instead of the model's (a folder or a repo id)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Chat template replacing the model's: a Jinja file or the template text."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of a dataset-dict input, as for run."),
    max_tokens: Optional[int] = typer.Option(None, help="Default max output tokens (for the KV estimate and ordering)."),
    dtype: str = typer.Option("bfloat16", help="KV cache dtype for the memory estimate."),
    kv_cache_dtype: str = typer.Option("auto", "--kv-cache-dtype", help="auto (--dtype) | fp8 / fp8_e4m3: the estimate at one byte per element."),
    id_column: Optional[str] = typer.Option(None),
    prompt_column: Optional[str] = typer.Option(None),
    messages_column: Optional[str] = typer.Option(None),
    prompt_template: Optional[str] = typer.Option(None),
    system_prompt: Optional[str] = typer.Option(None),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="Wrap prompt rows and template output in the chat template, as for run."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write group size / prefix length distributions to this PNG."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """How much prefix sharing a prompt file offers and what the BatchLLM plan gets (no GPU, no weights)."""
    import json

    from batchllm.config import DTYPE_ALIASES, JobConfig, check_value
    from batchllm.build import DTYPES
    from batchllm.pipeline import job_stats

    _set_verbose(verbose)
    dtype = DTYPE_ALIASES.get(dtype, dtype)  # vLLM's spellings: half, float
    if dtype not in DTYPES:
        raise BatchLLMError(f"unknown dtype {dtype!r}: use float32 (float), bfloat16 or float16 (half)")
    check_value("kv_cache_dtype", kv_cache_dtype)
    cfg = JobConfig(
        inputs=list(inputs), output="-", model=model, tokenizer=tokenizer, chat_template=chat_template, split=split,
        id_column=id_column, prompt_column=prompt_column,
        messages_column=messages_column, prompt_template=prompt_template, system_prompt=system_prompt, chat=chat,
        kv_cache_dtype=kv_cache_dtype, **({"max_tokens": max_tokens} if max_tokens is not None else {}),
    )
    with console.status("tokenizing and planning..."):
        result = job_stats(cfg, kv_dtype_bytes=DTYPES[dtype].itemsize)
    if plot:
        _plot_stats(result, plot)
    if as_json:
        out.print_json(json.dumps(result))
        return
    t = Table(title="batchllm stats", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("requests", f"{result['requests']:,}" + (f"  (+{result['row_errors']:,} row errors)" if result["row_errors"] else ""))
    t.add_row("logical prompt tokens", f"{result['logical_prompt_tokens']:,}")
    t.add_row("unique prompt tokens", f"{result['unique_prompt_tokens']:,}")
    t.add_row("planned prompt tokens", f"{result['planned_prompt_tokens']:,}")
    t.add_row("saving (plan)", f"{result['saving']:.1%}")
    t.add_row("max saving (any cache)", f"{result['max_saving']:.1%}")
    t.add_row("prefix groups", f"{result['num_groups']:,}  ({result['shared_groups']:,} shared, {result['requests_in_shared_groups']:,} requests in them)")
    t.add_row("outer prefixes", f"{result['outer_prefixes']:,}  (shared heads of groups)")
    for key, label in (("group_size", "group size"), ("prefix_len", "shared prefix length"), ("distinct_len", "distinct tokens per request")):
        d = result[key]
        t.add_row(label, f"min {d['min']:g} / p50 {d['p50']:g} / p90 {d['p90']:g} / max {d['max']:g}")
    t.add_row("peak KV memory (plan)", f"{result['peak_kv_gb']:.2f} GB ({result['peak_kv_tokens']:,} tokens, {dtype if kv_cache_dtype == 'auto' else 'fp8_e4m3'}, {result['model']})")
    out.print(t)
    if plot:
        console.print(f"plot written to {plot}")


def _plot_stats(result: dict, path: str) -> None:
    from batchllm.plotting import pyplot, save_figure

    fig, axes = pyplot().subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "group_size_hist", "requests per group"), (axes[1], "prefix_len_hist", "shared prefix length (tokens)")):
        h = result[key]
        edges, counts = h["edges"], h["counts"]
        labels = [f"{int(edges[i])}-{int(edges[i + 1]) - 1}" if edges[i + 1] - edges[i] > 1 else f"{int(edges[i])}" for i in range(len(counts))]
        ax.bar(range(len(counts)), counts)
        ax.set_xticks(range(len(counts)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("groups")
    fig.suptitle(f"{result['requests']:,} requests: plan saves {result['saving']:.1%} of prompt tokens (max {result['max_saving']:.1%})")
    save_figure(fig, path)


class _ProgressView:
    """Progress of one job on stderr.

    On a terminal: a status line while loading, then a bar over the job's output token budget (every
    sample's max_tokens; a sample that stops early releases the rest of its budget), so it moves with
    every generated token even when all requests run at once, beside samples done, output tok/s, elapsed
    time and ETA. When stderr is not a terminal (a log file, a pipe): plain lines, one when generation
    starts and one every ``interval`` seconds (done / total, tokens, tok/s, ETA), as ``vllm run-batch``
    logs, and a last one at the end; nothing before generation, so an error stays one line."""

    def __init__(self, interval: float | None = None) -> None:
        self.tty = console.is_terminal
        self.interval = PROGRESS_LOG_INTERVAL_S if interval is None else interval
        self.progress: Progress | None = None
        self.task = None
        self.samples_total = self.samples_done = 0
        self.budget = self.budget_done = 0
        self.tokens = self.prompt_tokens = 0
        self.t0 = 0.0
        self._last_line: float | None = None
        self.ready = 0
        self.loaded = ""
        self.status = console.status("reading and tokenizing inputs...") if self.tty else None
        if self.status is not None:
            self.status.start()

    def _line(self, text: str) -> None:
        console.print(f"batchllm: {text}", markup=False, highlight=False, soft_wrap=True)

    def _say(self, text: str) -> None:
        # a log gets no line per start-up stage: an error then stays the one line on stderr
        if self.status is not None:
            self.status.update(text + "...")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.status is not None:
            self.status.stop()

    def fraction(self) -> float:
        """How much of the generation is done: the token budget's share, or the samples' when larger
        (a distributed run reports no released budget)."""
        f = self.budget_done / self.budget if self.budget else 0.0
        if self.samples_total:
            f = max(f, self.samples_done / self.samples_total)
        return min(1.0, f)

    def line(self) -> str:
        """The plain progress line: samples done / total, tokens, rates, elapsed and ETA."""
        dt = time.perf_counter() - self.t0
        f = self.fraction()
        eta = _clock(dt * (1 - f) / f) if f > 0 else "-"
        return (f"generating: {self.samples_done:,}/{self.samples_total:,} samples done ({100 * f:.1f}%), "
                f"{self.tokens:,} output tokens ({self.tokens / dt if dt > 0 else 0.0:,.0f} tok/s), "
                f"{self.prompt_tokens:,} prompt tokens computed, elapsed {_clock(dt)}, eta {eta}")

    def hook(self, event: str, info: dict) -> None:
        if event == "ray_starting":
            where = f"connecting to Ray at {info['address']}" if info["address"] else "starting a local Ray instance"
            self._say(f"{where} for {info['replicas']} replica(s) (can take a minute on a busy machine)")
        elif event == "resumed":
            console.print(f"resuming the job in {info['output']}: {info['done']:,} requests already done", markup=False, highlight=False)
        elif event == "replica_ready":
            self.ready += 1
            self._say(f"loading the model on Ray replicas ({self.ready} ready)")
        elif event == "read" and info["requests"]:
            self._say(f"loading {info['model']} ({info['requests']:,} requests to run)")
        elif event == "loaded":
            self.loaded = f"{info['model']} on {info['device']}, {info['dtype']}"
            self._say(f"planning ({self.loaded})")
        elif event == "planned":
            self.samples_total = info["samples"]
            self.budget = info.get("token_budget") or 0
            self.t0 = time.perf_counter()
            if self.status is None:
                model = f", {self.loaded}" if self.loaded else ""
                self._line(f"generating {self.samples_total:,} samples ({info['requests']:,} requests{model})")
                return
            self.status.stop()
            self.progress = Progress(
                TextColumn("[bold]generating"), BarColumn(), TaskProgressColumn(), TextColumn("{task.fields[samples]}"),
                _TokensPerSecond(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("gen", total=1000, tok_s=0.0, samples=self._samples())
        elif event == "step":
            self.samples_done += info.get("finished", 0)
            self.tokens += info.get("new_tokens", 0)
            self.prompt_tokens += info.get("prompt_tokens", 0)
            self.budget_done += info.get("new_tokens", 0) + info.get("released", 0)
            dt = time.perf_counter() - self.t0
            if self.progress is not None:
                self.progress.update(self.task, completed=1000 * self.fraction(), samples=self._samples(),
                                     tok_s=self.tokens / dt if dt > 0 else 0.0)
            elif self.status is None:
                now = time.monotonic()
                if self._last_line is None or now - self._last_line >= self.interval:
                    self._last_line = now
                    self._line(self.line())
        elif event == "done":
            if self.status is None and self.samples_total:
                self._line(self.line())  # the last word, whatever the interval
            self.close()

    def _samples(self) -> str:
        return f"{self.samples_done:,}/{self.samples_total:,} samples"


PROGRESS_LOG_INTERVAL_S = 5.0  # seconds between plain progress lines when stderr is not a terminal


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def _print_summary(cfg, s) -> None:
    t = Table(title=f"batchllm run -> {cfg.output}", show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("requests", f"{s.requests:,}" + (f"  ({s.done_before:,} done in earlier runs)" if s.done_before else ""))
    t.add_row("errors", f"{s.errors:,}" + (f"  ({', '.join(f'{k}: {v}' for k, v in sorted(s.errors_by_code.items()))})" if s.errors else ""))
    t.add_row("samples completed", f"{s.samples:,}")
    t.add_row("prompt tokens", f"{s.prompt_tokens:,}  ({s.cached_tokens:,} reused from shared prefixes)")
    planned = f", planned {s.planned_saving:.1%} of at most {s.max_saving:.1%}" if s.planned_saving is not None else ""
    t.add_row("prefill saving", f"{s.achieved_saving:.1%} achieved{planned}")
    t.add_row("output tokens", f"{s.output_tokens:,}")
    t.add_row("model load", f"{s.load_seconds:.1f} s")
    t.add_row("wall time", f"{s.wall_seconds:.1f} s")
    t.add_row("throughput", f"{s.output_tok_s:,.1f} output tok/s, {s.total_tok_s:,.1f} total tok/s")
    t.add_row("steps", f"{s.num_steps:,}  (seqs/step min {s.batch_seqs[0]} / median {s.batch_seqs[1]:g} / max {s.batch_seqs[2]}; preemptions {s.num_preemptions})")
    console.print(t)


def _print_preview(preview: list[dict]) -> None:
    for p in preview:
        out.print(f"[bold cyan]{p['custom_id']}[/] [dim]{_clip(p['prompt'], 100)}[/]")
        out.print(f"  {p['text']}\n", markup=False, highlight=False)


def _clip(s: str, n: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _set_verbose(verbose: bool) -> None:
    global _VERBOSE
    _VERBOSE = verbose
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger("transformers").setLevel(logging.ERROR)


_VERBOSE = False


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line for user errors, the traceback only with --verbose.

    Usage errors (an unknown flag, a value that does not parse, a missing argument) are one ``error:``
    line naming the problem and ``batchllm COMMAND --help``, exit status 2 (no box, no guessed
    suggestion). A signal outside a job's generation (start-up, shutdown) is one line too, with exit
    status 128 + signal. ``argv`` (default: sys.argv) lets tests run the command line in-process.
    """
    from batchllm.jobs.signals import JobInterrupted, raise_on_signals

    click = _click_exceptions()
    raise_on_signals()
    try:
        code = _command().main(args=argv, prog_name="batchllm", standalone_mode=False)
    except click.NoArgsIsHelpError as e:  # `batchllm` or `batchllm COMMAND` alone: the help
        text = e.format_message()  # typer has printed the help already; click's own returns it
        if text:
            print(text, file=sys.stderr)
        sys.exit(2)
    except click.UsageError as e:
        console.print(f"[bold red]error:[/] {escape(_usage_message(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.ClickException as e:
        console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except typer.Abort:
        console.print("[yellow]aborted[/]")
        sys.exit(1)
    except JobInterrupted as e:
        console.print(f"[yellow]{e}[/]", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except BatchLLMError as e:
        if _VERBOSE:
            console.print_exception()
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except MemoryError:
        if _VERBOSE:
            console.print_exception()
        console.print("[bold red]error:[/] out of memory: lower --kv-cache-tokens or --max-num-batched-tokens, or "
                      "give the process more memory (committed work is kept; rerun to continue)", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


def _usage_message(e) -> str:
    """One line for a click usage error: the problem (an unknown option named as typed, without click's
    close-match guess) and where the options are listed."""
    if isinstance(e, _click_exceptions().NoSuchOption):
        what = f"no such option: {e.option_name}"
    else:
        what = e.format_message().strip().replace("\n", " ")
    where = e.ctx.command_path if e.ctx is not None else "batchllm"
    return f"{what} (see {where} --help)"


def _click_exceptions():
    """The exceptions of the click typer runs on (typer >= 0.26 vendors its own copy as ``typer._click``)."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def _command():
    """``app`` as a click command whose help renders as written: rich markup in help texts is escaped
    (``batchllm[ray]`` stays ``batchllm[ray]``), and ``run``'s options that default to the job's
    defaults (``JobConfig``) show them."""
    from rich.markup import escape as esc

    from batchllm.config import JobConfig

    cmd = typer.main.get_command(app)
    defaults = {f.name: f.default for f in dataclasses.fields(JobConfig) if f.default is not dataclasses.MISSING}
    for sub in [cmd, *getattr(cmd, "commands", {}).values()]:
        for attr in ("help", "short_help", "epilog"):
            if getattr(sub, attr, None):
                setattr(sub, attr, esc(getattr(sub, attr)))
        for p in sub.params:
            text = getattr(p, "help", None) or ""
            d = defaults.get(p.name)
            if (sub.name == "run" and p.default is None and d is not None and not isinstance(d, bool)
                    and "(default" not in text.lower() and "default:" not in text.lower()):
                text = f"{text} [default: {d}]".strip()
            if text:
                p.help = esc(text)
    return cmd


if __name__ == "__main__":
    main()
