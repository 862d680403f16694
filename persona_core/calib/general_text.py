"""General text: the one resolver for every place that reads persona-neutral text.

The budget search (``budget.ppl_text``), the learners' general-text term, the evaluator's
reported and validation perplexity (``evaluate.options.ppl_text`` / ``val_text``), the steering
searches and the benchmarks all name their text by a *spec*, resolved here and nowhere else:

* a file path (``../shared/data/wikitext-2/valid.txt``), read as UTF-8;
* ``builtin:general`` (``persona_core/data/general.txt``, the built-in general set) or
  ``builtin:heldout`` (``persona_core/data/heldout.txt``, the project's held-out text; what an
  unset ``ppl_text`` means);
* ``wikitext-2-valid`` / ``wikitext-2-test``: WikiText-2's ``valid.txt`` / ``test.txt`` in the folder
  named by ``$PERSONA_WIKITEXT2``, else ``../shared/data/wikitext-2`` from the working directory or
  from the install (the first that holds the file);
* an fsspec URL (``s3://bucket/wikitext-2/valid.txt``, ``memory://...``), read as UTF-8 text;
* a Hugging Face dataset, ``hf:DATASET/CONFIG:SPLIT[::FIELD]`` (the last ``/`` segment is the
  config; ``hf:DATASET/:SPLIT`` for none; FIELD defaults to ``text``), e.g.
  ``hf:wikitext/wikitext-2-raw-v1:validation``: loaded through `datasets` from its local cache, or
  from the hub when online. DATASET may also be a folder written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``).

There is no fallback: a spec that does not resolve raises `GeneralTextError` naming the spec and
how to provide the text, and configs check their specs when they are loaded (`check_general_text`).
What a run measured on is recorded as a `GeneralText.record` (spec, resolved source, SHA-256 of
the text, characters), so two results can be told apart when the same spec meant different text.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import fsspec

from persona_core.catalog.shipped import DATA, REFERENCE_TEXTS

log = logging.getLogger(__name__)

BUILTIN_GENERAL = "builtin:general"  # the built-in general set (persona_core/data/general.txt)
BUILTIN_HELDOUT = "builtin:heldout"  # the project's held-out text (persona_core/data/heldout.txt)
BUILTINS = {BUILTIN_GENERAL: REFERENCE_TEXTS, BUILTIN_HELDOUT: DATA / "heldout.txt"}
WIKITEXT_ENV = "PERSONA_WIKITEXT2"  # a folder holding WikiText-2's valid.txt and test.txt
WIKITEXT = {"wikitext-2-valid": "valid.txt", "wikitext-2-test": "test.txt"}
HF_PREFIX = "hf:"
_INSTALL_ROOT = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding persona_core

PROVIDE = (f"name a text file, {BUILTIN_GENERAL}, an fsspec URL, or an hf: dataset in its local cache; "
           f"for wikitext-2-valid/-test set ${WIKITEXT_ENV} to the folder holding valid.txt and test.txt")


DATASET_SUFFIXES = ("json", "jsonl", "parquet", "csv")  # dataset files whose texts `load_texts` reads instead


def is_dataset_file(spec: str) -> bool:
    """Whether `spec` names a dataset file (``URL::field`` or a JSON/JSONL/Parquet/CSV file) rather than a
    general text: the evaluator's extra perplexity texts may be either."""
    if spec.startswith(HF_PREFIX) or spec in BUILTINS or spec in WIKITEXT:
        return False
    return bool(spec.partition("::")[2]) or spec.rsplit(".", 1)[-1].lower() in DATASET_SUFFIXES


class GeneralTextError(ValueError):
    """A general-text spec that does not resolve to readable text (the message says how to provide it)."""


@dataclass(frozen=True)
class GeneralText:
    """A resolved general text: what was asked for, where it was read, and the text itself."""

    spec: str  # as written in the config
    source: str  # where it was read: an absolute path, a URL, a builtin:/hf: spec
    text: str

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def id(self) -> str:
        """A short name for results and logs: the spec and the start of the text's digest."""
        return f"{self.spec}@sha256:{self.sha256[:12]}"

    def record(self) -> dict[str, object]:
        """What a run stores about the text it measured on."""
        return {"spec": self.spec, "source": self.source, "sha256": self.sha256, "chars": len(self.text)}


def _wikitext_file(spec: str) -> Path:
    name = WIKITEXT[spec]
    roots: list[Path] = []
    env = os.environ.get(WIKITEXT_ENV)
    if env:
        roots.append(Path(env))
    roots += [Path.cwd().parent / "shared" / "data" / "wikitext-2",
              _INSTALL_ROOT.parent / "shared" / "data" / "wikitext-2"]
    for root in roots:
        if (root / name).is_file():
            return (root / name).resolve()
    tried = ", ".join(str(r) for r in dict.fromkeys(roots))
    raise GeneralTextError(f"general text {spec!r}: WikiText-2 {name} not found (looked in {tried}); set "
                           f"${WIKITEXT_ENV} to the folder holding it, or name a text file, {BUILTIN_GENERAL}, "
                           "an fsspec URL or an hf: dataset instead")


def resolve_general_text(spec: str | None) -> str:
    """Where `spec` is read from (an absolute path, a URL, or the builtin:/hf: spec itself), checked
    to exist without reading it (hf: specs are checked when loaded). None means ``builtin:heldout``."""
    if spec is None:
        return BUILTIN_HELDOUT
    if not isinstance(spec, str) or not spec.strip():
        raise GeneralTextError(f"general text: expected a spec ({PROVIDE}), got {spec!r}")
    if spec in BUILTINS or spec.startswith(HF_PREFIX):
        return spec
    if spec.startswith("builtin:"):
        raise GeneralTextError(f"general text {spec!r}: unknown built-in text (known: {', '.join(BUILTINS)})")
    if spec in WIKITEXT:
        return str(_wikitext_file(spec))
    if "://" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_dir():
        raise GeneralTextError(f"general text {spec!r}: a folder; name a text file in it (e.g. wikitext-2/valid.txt)")
    if not path.is_file():
        raise GeneralTextError(f"general text {spec!r}: no such file ({PROVIDE})")
    return str(path.resolve())


def _read_url(spec: str) -> str:
    try:
        with fsspec.open(spec, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, ValueError, ImportError) as err:
        raise GeneralTextError(f"general text {spec!r}: cannot read the URL ({err}); {PROVIDE}") from None


def parse_hf(spec: str) -> tuple[str, str | None, str, str]:
    """(dataset, config or None, split, field) of an ``hf:DATASET/CONFIG:SPLIT[::FIELD]`` spec."""
    body, _, field = spec[len(HF_PREFIX):].partition("::")
    ref, sep, split = body.rpartition(":")
    if not sep or not ref or not split:
        raise GeneralTextError(f"general text {spec!r}: expected hf:DATASET/CONFIG:SPLIT[::FIELD], e.g. "
                               "hf:wikitext/wikitext-2-raw-v1:validation")
    if Path(ref).is_dir():  # a dataset saved to disk: no config
        return ref, None, split, field or "text"
    dataset, slash, config = ref.rpartition("/")
    if not slash:
        dataset, config = ref, ""
    return dataset, config or None, split, field or "text"


def _read_hf(spec: str) -> str:
    dataset, config, split, field = parse_hf(spec)
    try:
        import datasets  # heavy: only hf: specs need it
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise GeneralTextError(f"general text {spec!r}: the datasets package is missing ({err})") from None
    how = (f"provide the text another way: a file (e.g. WikiText-2's {'valid' if 'valid' in split else 'test'}.txt, "
           f"or ${WIKITEXT_ENV} with wikitext-2-valid/-test), or load the dataset once online so that it is in "
           "the local datasets cache, or save it with Dataset.save_to_disk and name that folder")
    try:
        if Path(dataset).is_dir():
            loaded = datasets.load_from_disk(dataset)
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise GeneralTextError(f"general text {spec!r}: {dataset} has no split {split!r} "
                                           f"(it has {', '.join(loaded)})")
                loaded = loaded[split]
        else:
            loaded = datasets.load_dataset(dataset, config, split=split)
    except GeneralTextError:
        raise
    except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        offline = bool(datasets.config.HF_HUB_OFFLINE)
        raise GeneralTextError(f"general text {spec!r}: cannot load dataset {dataset!r}"
                               f"{f' config {config!r}' if config else ''} split {split!r}"
                               f"{' (offline: only the local datasets cache is read)' if offline else ''}: "
                               f"{type(err).__name__}: {err}; {how}") from None
    if field not in loaded.column_names:
        raise GeneralTextError(f"general text {spec!r}: no field {field!r} (fields: {', '.join(loaded.column_names)});"
                               " name one with ::FIELD")
    return "".join(t if t.endswith("\n") else t + "\n" for t in loaded[field] if isinstance(t, str))


def _signature(source: str) -> tuple:
    """What makes a cached read stale: a file's size and modification time (other sources are fixed)."""
    if source in BUILTINS or source.startswith(HF_PREFIX) or "://" in source:
        return ()
    st = Path(source).stat()
    return (st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load(spec: str, source: str, signature: tuple) -> GeneralText:
    if source in BUILTINS:
        text = BUILTINS[source].read_text(encoding="utf-8")
    elif source.startswith(HF_PREFIX):
        text = _read_hf(source)
    elif "://" in source:
        text = _read_url(source)
    else:
        try:
            text = Path(source).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise GeneralTextError(f"general text {spec!r}: cannot read {source} ({err})") from None
    if not text.strip():
        raise GeneralTextError(f"general text {spec!r}: {source} is empty")
    return GeneralText(spec, source, text)


def load_general_text(spec: str | None) -> GeneralText:
    """The text behind `spec` (see the module docstring; None: ``builtin:heldout``), read once per
    source and version of the file; `GeneralTextError` when it cannot be resolved or read."""
    source = resolve_general_text(spec)
    try:
        signature = _signature(source)
    except OSError as err:
        raise GeneralTextError(f"general text {spec!r}: cannot read {source} ({err})") from None
    return _load(BUILTIN_HELDOUT if spec is None else spec, source, signature)


def check_general_text(spec: str | None, where: str) -> None:
    """Raise `GeneralTextError` prefixed by `where` (the config field) unless `spec` loads: configs
    call this when they are loaded, so a missing text stops a run before it starts."""
    try:
        load_general_text(spec)
    except GeneralTextError as err:
        raise GeneralTextError(f"{where}: {err}") from None


def general_text_record(spec: str | None) -> dict[str, object]:
    """`GeneralText.record` of `spec`: what results and manifests store about the text measured on."""
    return load_general_text(spec).record()
