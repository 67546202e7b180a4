"""``batchllm run-batch``: ``vllm run-batch`` (the OpenAI Batch API's file flow) in one command, durable.

    batchllm run-batch -i IN.jsonl -o OUT.jsonl --model M [engine flags]

``IN`` is an OpenAI Batch API input file (one ``{"custom_id", "method", "url", "body"}`` object a line;
``/v1/chat/completions`` and ``/v1/completions``); ``IN`` and ``OUT`` are local paths or any pyarrow
filesystem URI (``s3://``, ``gs://``, ``file://``...). One execution path: the requests run as an
ordinary batchllm job (``batchllm.pipeline.run_job``) whose job folder sits beside the output,
``OUT.batchllm`` (``job_folder_for``); when the job completes, ``batchllm.jobs.export`` writes ``OUT``, one
line per successful request in input order, and the error file ``OUT``'s stem + ``.errors.jsonl``
(``errors_file_for``), one line per failed request. Both are written whole (temporary + rename locally,
one PUT on an object store), so ``OUT`` never holds a partial result.

Errors: the OpenAI Batch API convention, not vLLM's. OpenAI returns failed requests in a separate error
file (``error_file_id``); ``vllm run-batch`` writes them into the output file as lines with
``response.status_code`` 400 and ``error`` set. ``run-batch`` follows OpenAI: ``OUT`` holds only
``status_code`` 200 lines, the error file the others (``response: null``, ``error: {code, message}``).

Durable: rerunning the same command resumes the job in ``OUT.batchllm`` (finished requests are not
redone; a finished job is only exported again); a command that would change the outputs (another model,
seed, sampling default, input) is refused unless ``--overwrite``. The job folder is kept after the run
(``batchllm show`` reads it); delete it once ``OUT`` is where it should be.

Models: a request's ``body.model`` must be one of the served names (``--served-model-name``, default the
``--model`` value as given), or absent, as ``vllm run-batch`` requires (it answers other names with 404).
Here a request naming another model refuses the whole command before anything runs, naming the line:
silently running a request on a model it did not ask for is not an option. With the built-in default
model and no ``--served-model-name`` there is no name to check against and every name is echoed. Bodies
echo the request's ``model``, or the first served name when it has none.

An input given as a URI is first copied to batchllm's cache folder
(``<cache>/run-batch-inputs/<sha256 of the URI>/``; the readers and the job fingerprint read local
files), again on every run; the job still resumes when the copy's contents are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any

from batchllm.errors import BatchLLMError
from batchllm.io.storage import is_uri, open_storage

# vLLM's --dtype spellings (EngineArgs): half and float are float16 and float32
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
_COPY_CHUNK = 8 << 20


@dataclasses.dataclass
class BatchRun:
    """What ``prepare`` settled: the job to run and where its OpenAI files go."""

    config: Any  # batchllm.config.JobConfig
    input_file: str  # as given
    output_file: str
    errors_file: str
    job_dir: str
    served_names: list[str]
    response_role: str = "assistant"


def job_folder_for(output_file: str) -> str:
    """The job folder of an output file: beside it, ``OUT.batchllm``."""
    return output_file.rstrip("/") + ".batchllm"


def errors_file_for(output_file: str) -> str:
    """The error file of an output file: ``results.jsonl`` -> ``results.errors.jsonl``."""
    from batchllm.jobs.export import _errors_path

    return _errors_path(output_file)


def prepare(input_file: str, output_file: str, *, model: str | None = None, served_model_name: list[str] | None = None,
            response_role: str = "assistant", options: dict[str, Any] | None = None) -> BatchRun:
    """Check the command and build the job: every problem is a one-line ``BatchLLMError`` before anything
    runs. ``options``: further ``JobConfig`` keys (engine and sampling defaults; None values left out)."""
    from batchllm.config import JobConfig
    from batchllm.io.readers import detect_format
    from batchllm.jobs.export import _check_target

    if not input_file:
        raise BatchLLMError("no input file given (-i IN.jsonl)")
    if not output_file or output_file.endswith("/"):
        raise BatchLLMError(f"the output file must be a file name (-o OUT.jsonl), got {output_file!r}")
    if not is_uri(output_file):
        output_file = os.path.expanduser(output_file)
        if os.path.isdir(output_file):
            raise BatchLLMError(f"the output file {output_file} is a folder: name a file, e.g. {output_file.rstrip('/')}/results.jsonl")
    if _same_place(input_file, output_file):
        raise BatchLLMError(f"the output file {output_file} is the input file: name another file")
    if not response_role:
        raise BatchLLMError("--response-role must not be empty")
    served = [n for n in (served_model_name or []) if n is not None]
    if any(not n.strip() for n in served):
        raise BatchLLMError("--served-model-name must not be empty")
    job_dir = job_folder_for(output_file)
    errors_file = errors_file_for(output_file)
    names = served or ([model] if model else [])
    opts = {k: v for k, v in (options or {}).items() if v is not None}
    if "dtype" in opts:
        opts["dtype"] = DTYPE_ALIASES.get(opts["dtype"], opts["dtype"])
    if names and "served_model_name" in {f.name for f in dataclasses.fields(JobConfig)}:
        opts.setdefault("served_model_name", names[0])  # kept in the job spec: batchllm export echoes it too
    cfg = JobConfig(inputs=[input_file], output=job_dir, model=model, **opts)
    cfg.validate()  # the options first: a bad flag costs no copy or scan of the input
    for target in (output_file, errors_file):  # before the run, not hours later
        _check_target(job_dir, target)
    local = stage_input(input_file)
    if detect_format(local) != "openai":
        raise BatchLLMError(f"{input_file} is not an OpenAI batch file (each line an object with custom_id, method, url "
                            "and body): run-batch reads those; for plain prompt rows use batchllm run")
    if names:
        check_models(local, names, shown=input_file)
    cfg.inputs = [local]
    return BatchRun(cfg, input_file, output_file, errors_file, job_dir, names, response_role)


def finish(run: BatchRun):
    """Write ``OUT`` and its error file from the completed job (``IncompleteJob`` if it is not)."""
    from batchllm.jobs.export import export_job

    return export_job(run.job_dir, "openai", run.output_file, ordered=True, errors_to=run.errors_file, require_complete=True,
                      served_model_name=run.served_names[0] if run.served_names else None, response_role=run.response_role)


def check_models(path: str, served: list[str], shown: str | None = None) -> None:
    """BatchLLMError naming the first line whose ``body.model`` is set and not one of ``served``."""
    from batchllm.jobs.export import body_models

    bad, first = 0, None
    for index, m in body_models(path):
        if m not in served:
            bad += 1
            first = first or (index + 1, m)
    if bad:
        line, m = first
        names = ", ".join(repr(n) for n in served)
        more = f" (and {bad - 1:,} more line{'s' if bad > 2 else ''})" if bad > 1 else ""
        raise BatchLLMError(
            f"{shown or path} line {line}{more} asks for model {m!r}, but this run serves {names}: pass "
            f"--served-model-name {m} to answer under that name, or fix the requests (vllm run-batch answers them with 404)")


def stage_input(input_file: str) -> str:
    """A local path for the input: a path as given (``~`` expanded); a URI copied to the cache folder
    (see the module docstring), replaced whole."""
    if not is_uri(input_file):
        return os.path.expanduser(input_file)
    from batchllm.models.default_model import cache_dir

    folder, _, name = input_file.rstrip("/").rpartition("/")
    if not name or not is_uri(folder):
        raise BatchLLMError(f"the input {input_file} names no file")
    dest_dir = os.path.join(str(cache_dir()), "run-batch-inputs", hashlib.sha256(input_file.encode()).hexdigest()[:16])
    dest = os.path.join(dest_dir, name)
    tmp = os.path.join(dest_dir, f".{name}.tmp")
    try:
        storage = open_storage(folder)
        if not storage.exists(name):
            raise BatchLLMError(f"input not found: {input_file}")
        os.makedirs(dest_dir, exist_ok=True)
        with storage.open_input(name) as src, open(tmp, "wb") as out:
            while chunk := src.read(_COPY_CHUNK):
                out.write(chunk)
        os.replace(tmp, dest)
    except (OSError, ValueError) as e:  # ValueError: pyarrow's ArrowInvalid for a URI it cannot open
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise BatchLLMError(f"cannot read {input_file}: {getattr(e, 'strerror', None) or e}") from None
    return dest


def _same_place(a: str, b: str) -> bool:
    if is_uri(a) or is_uri(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
