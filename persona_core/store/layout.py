"""The store layout: every key the system writes, and the parser of each.

No other module formats or parses a store key; they call the builders here,
and read keys back with the ``parse_*`` functions. Every identifier that
becomes part of a key (model key, persona id, run id, schedule or lease name)
goes through `segment`, the one place that decides what a key segment may hold.

Layout under the store root::

    stats/model=<model-key>/persona=<id>/part-<hash>.parquet          activation statistics
    masks/model=<model-key>/[calib=<calib-hash>/]method=<segment>/sparsity=<s>/<owner>.safetensors
        (calib= for masks derived from statistics; budget=<label> in place of sparsity= if budgeted)
    results/model=<model-key>/persona=<id>/part-<what>-<hash>.parquet evaluation rows, keyed by content, reused across runs
    results/run=<run-id>/parts.json                                   which parts make up a run's results (written last)
    dense/model=<model-key>/persona=<id>/rows-<hash>.parquet          dense baseline rows, reused across runs
    runs/<run-id>/manifest.json                                       written last
    runs/<run-id>/stages/<stage>.json                                 one per finished stage
    runs/<run-id>/report.html
    runs/<run-id>/summary.txt                                         the report's summary table, as text
    runs/_latest/<schedule>.json                                      last good run of a schedule
    leases/<name>.json
    learned/model=<model-key>/persona=<id>/data-<hash>.json | ckpt-<identity>.safetensors   (learned masks)
    exports/model=<model-key>/method=<segment>/sparsity=<s>/<owner>/                         (exported models)
    _probe/<random>                                                   write probe (deleted at once)

A mask's method segment is ``<method>[@<granularity>][~<allocation>][+<params-hash>]``
(``2:4`` written ``2of4``); masks shared by every persona have the owner ``general`` (the reference
persona's id, `persona_core.catalog.personas.REFERENCE_PERSONA_ID`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from persona_core.store.ids import check_id, id_problem

STATS, MASKS, RESULTS, RUNS, LEASES, PROBE = "stats", "masks", "results", "runs", "leases", "_probe"
LEARNED, EXPORTS, DENSE = "learned", "exports", "dense"
LATEST = "_latest"
RESULTS_INDEX = "parts.json"
DEFAULT_GRANULARITY = "unstructured"
DEFAULT_ALLOCATION = "uniform"


class LayoutError(ValueError):
    """A value cannot become part of a store key."""


def segment(value: str, what: str = "id") -> str:
    """`value` checked for use as one key segment (the only gate for identifiers in keys)."""
    text = str(value)
    if not text or "/" in text or "\\" in text or text in (".", "..") or any(ord(c) < 32 for c in text):
        raise LayoutError(f"{what} {text!r} cannot be part of a store key (empty, '/', '\\\\', '.', '..' "
                          f"or a control character)")
    return text


def identifier(value: str, what: str = "id") -> str:
    """A user-given identifier (persona id, lease or schedule name) checked against the id grammar
    (`persona_core.store.ids`) before it becomes a key segment."""
    try:
        return segment(check_id(value, what), what)
    except LayoutError:
        raise
    except ValueError as err:
        raise LayoutError(str(err)) from None


def _num(x: float) -> str:
    return f"{float(x):g}"


# ---------------------------------------------------------------------------- stats


def stats_prefix(model_key: str | None = None, persona_id: str | None = None) -> str:
    """``stats``, ``stats/model=<k>`` or ``stats/model=<k>/persona=<id>``."""
    if persona_id is not None and model_key is None:
        raise ValueError("stats_prefix: persona_id needs model_key")
    if model_key is None:
        return STATS
    out = f"{STATS}/model={segment(model_key, 'model key')}"
    return out if persona_id is None else f"{out}/persona={identifier(persona_id, 'persona id')}"


def stats_part(model_key: str, persona_id: str, digest: str) -> str:
    return f"{stats_prefix(model_key, persona_id)}/part-{segment(digest, 'part hash')}.parquet"


@dataclass(frozen=True)
class StatsPartRef:
    key: str
    model_key: str
    persona_id: str
    name: str  # the file name, part-<hash>.parquet


# what `stats.part_key` names a part, and nothing else
_STATS_RE = re.compile(r"^stats/model=(?P<model>[^/]+)/persona=(?P<persona>[^/]+)/(?P<name>part-[0-9a-f]{16}\.parquet)$")


def parse_stats_part(key: str) -> StatsPartRef | None:
    """The parts of a statistics part key (`stats_part`); None for anything else (a persona outside the id grammar)."""
    m = _STATS_RE.match(key)
    if not m or id_problem(m["persona"]):
        return None
    return StatsPartRef(key, m["model"], m["persona"], m["name"])


# ---------------------------------------------------------------------------- masks


def method_segment(method: str, granularity: str = DEFAULT_GRANULARITY, allocation: str = DEFAULT_ALLOCATION,
                   params_hash: str | None = None) -> str:
    out = segment(method, "method")
    if granularity != DEFAULT_GRANULARITY:
        out += "@" + granularity.replace(":", "of")
    if allocation != DEFAULT_ALLOCATION:
        out += "~" + allocation
    if params_hash:
        out += "+" + params_hash
    return segment(out, "method segment")


def masks_prefix(model_key: str) -> str:
    return f"{MASKS}/model={segment(model_key, 'model key')}"


def mask(model_key: str, method_seg: str, sparsity: float, owner: str, budget: str | None = None,
         calib: str | None = None) -> str:
    """A mask's key; a budgeted mask has ``budget=<label>`` where others have ``sparsity=<s>``; a mask
    derived from statistics has ``calib=<calibration hash>/`` after the model."""
    level = f"budget={segment(budget, 'budget label')}" if budget else f"sparsity={_num(sparsity)}"
    config = f"calib={identifier(calib, 'calibration hash')}/" if calib else ""
    return (f"{masks_prefix(model_key)}/{config}method={segment(method_seg, 'method segment')}/{level}/"
            f"{identifier(owner, 'persona id')}.safetensors")


@dataclass(frozen=True)
class MaskRef:
    """One mask file in the store, parsed from its key."""

    key: str
    model_key: str
    method: str  # the whole method segment, e.g. contrastive-wanda@2of4+1a2b3c4d or wanda~owl
    base: str  # the method's registered name, e.g. contrastive-wanda
    sparsity: float  # NaN for a budgeted mask (its metadata holds the sparsity the search chose)
    owner: str  # a persona id, or "general" (the reference persona) for masks shared by every persona
    granularity: str = DEFAULT_GRANULARITY
    allocation: str = DEFAULT_ALLOCATION
    params_hash: str | None = None
    budget: str = ""  # the budget segment of a budgeted mask's key, e.g. ppl1.1
    calib: str = ""  # the calibration config of the statistics it derives from ("" for none, or an old key)

    @property
    def level(self) -> str:
        """What the mask was asked for: a sparsity or a budget (baselines ride along at the same level)."""
        return f"budget={self.budget}" if self.budget else f"sparsity={_num(self.sparsity)}"


_MASK_RE = re.compile(r"^masks/model=(?P<model>[^/]+)/(?:calib=(?P<calib>[^/]+)/)?method=(?P<method>[^/]+)/"
                      r"(?:sparsity=(?P<sparsity>[^/]+)|budget=(?P<budget>[^/]+))/(?P<owner>[^/]+)\.safetensors$")
_SEGMENT_RE = re.compile(r"^(?P<base>[^@~+]+)(?:@(?P<gran>[^~+]+))?(?:~(?P<alloc>[^@+]+))?(?:\+(?P<params>.+))?$")


def parse_mask(key: str) -> MaskRef | None:
    """The parts of a mask key; None for anything that is not one (e.g. a sparsity that is not a number)."""
    m = _MASK_RE.match(key)
    if not m:
        return None
    try:
        sparsity = float(m["sparsity"]) if m["sparsity"] is not None else float("nan")
    except ValueError:
        return None
    s = _SEGMENT_RE.match(m["method"])
    if not s:
        return None
    gran = s["gran"].replace("of", ":") if s["gran"] else DEFAULT_GRANULARITY
    return MaskRef(key, m["model"], m["method"], s["base"], sparsity, m["owner"], gran,
                   s["alloc"] or DEFAULT_ALLOCATION, s["params"], m["budget"] or "", m["calib"] or "")


# ---------------------------------------------------------------------------- learned masks


def learned_prefix(model_key: str, persona_id: str) -> str:
    return f"{LEARNED}/model={segment(model_key, 'model key')}/persona={identifier(persona_id, 'persona id')}"


def learned_data(model_key: str, persona_id: str, data_id: str) -> str:
    """A persona's training data for learned masks (question/answer pairs)."""
    return f"{learned_prefix(model_key, persona_id)}/data-{segment(data_id)}.json"


def learned_checkpoint(model_key: str, persona_id: str, unit_identity: str) -> str:
    """A learner's resumable state (removed once its mask is written)."""
    return f"{learned_prefix(model_key, persona_id)}/ckpt-{segment(unit_identity)}.safetensors"


def export_prefix(mask_key: str) -> str:
    """Where the physically smaller model exported from a mask goes: its mask key under ``exports/``."""
    if parse_mask(mask_key) is None:
        raise LayoutError(f"{mask_key!r} is not a mask key")
    return f"{EXPORTS}/" + mask_key.removeprefix(f"{MASKS}/").removesuffix(".safetensors")


# ---------------------------------------------------------------------------- results and runs


def results_prefix(run_id: str) -> str:
    """``results/run=<id>``: a run's results index (and, in stores written before results were keyed by
    content, its parts)."""
    return f"{RESULTS}/run={identifier(run_id, 'run id')}"


def results_index(run_id: str) -> str:
    """``results/run=<id>/parts.json``: which result parts make up the run's results table (written last)."""
    return f"{results_prefix(run_id)}/{RESULTS_INDEX}"


def safe_name(text: str) -> str:
    """A free-form name squeezed into file-name characters (not reversible; hashes keep keys apart)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def results_persona_prefix(model_key: str, persona_id: str | None = None) -> str:
    """``results/model=<k>`` or ``results/model=<k>/persona=<id>``: result parts keyed by content."""
    out = f"{RESULTS}/model={segment(model_key, 'model key')}"
    return out if persona_id is None else f"{out}/persona={identifier(persona_id, 'persona id')}"


def result_part(model_key: str, persona_id: str, what: str, ident: str) -> str:
    """``results/model=<k>/persona=<id>/part-<what>-<ident>.parquet``: one (persona, mask) unit's rows.

    `what` is ``<method>-s<sparsity>``, ``<method>-b<budget>`` or ``dense`` (`result_what`); `ident`
    (16 hex digits) hashes everything the rows depend on (`persona_core.run.units.result_ident`), so
    every run that asks for the same unit finds the same part. The persona id follows the id grammar."""
    if not _RESULT_IDENT_RE.fullmatch(str(ident)):
        raise LayoutError(f"result part hash {ident!r} is not 16 hex digits")
    name = safe_name(what)
    if not name.strip("._-"):
        raise LayoutError(f"result part name {what!r} has no file-name characters")
    return f"{results_persona_prefix(model_key, persona_id)}/part-{name}-{ident}.parquet"


@dataclass(frozen=True)
class ResultPartRef:
    """One result part in the store, parsed from its key."""

    key: str
    model_key: str
    persona_id: str
    what: str
    ident: str


_RESULT_IDENT_RE = re.compile(r"[0-9a-f]{16}")
_RESULT_RE = re.compile(r"^results/model=(?P<model>[^/]+)/persona=(?P<persona>[^/]+)/"
                        r"part-(?P<what>[A-Za-z0-9._-]+)-(?P<ident>[0-9a-f]{16})\.parquet$")
_LEGACY_RESULT_RE = re.compile(r"^results/run=(?P<run>[^/]+)/part-[^/]+\.parquet$")


def parse_result_part(key: str) -> ResultPartRef | None:
    """The parts of a result part key (`result_part`); None for anything else."""
    m = _RESULT_RE.match(key)
    if not m or id_problem(m["persona"]):
        return None
    return ResultPartRef(key, m["model"], m["persona"], m["what"], m["ident"])


def is_legacy_result_part(key: str) -> bool:
    """A part of a store written before results were keyed by content: ``results/run=<id>/part-*.parquet``."""
    return _LEGACY_RESULT_RE.match(key) is not None


def dense_rows(model_key: str, persona_id: str, ident: str) -> str:
    """``dense/model=<k>/persona=<id>/rows-<ident>.parquet``: one persona's dense-condition rows (prompt,
    few-shot, steering...) under one evaluation config, shared by every run that asks for the same.
    The persona id follows the id grammar; `ident` is 16 hex digits (`persona_core.eval.dense_cache.dense_ident`)."""
    if not _DENSE_IDENT_RE.fullmatch(str(ident)):
        raise LayoutError(f"dense rows hash {ident!r} is not 16 hex digits")
    return f"{DENSE}/model={segment(model_key, 'model key')}/persona={identifier(persona_id, 'persona id')}/rows-{ident}.parquet"


_DENSE_IDENT_RE = re.compile(r"[0-9a-f]{16}")


def result_what(method_seg: str | None, sparsity: float | None, budget: str = "") -> str:
    """``<method>-s<sparsity>``, ``<method>-b<budget>`` for a budgeted mask, or ``dense``."""
    if not method_seg:
        return "dense"
    return f"{safe_name(method_seg)}-" + (f"b{safe_name(budget)}" if budget else f"s{_num(sparsity)}")


def run_prefix(run_id: str) -> str:
    return f"{RUNS}/{segment(run_id, 'run id')}"


def manifest(run_id: str) -> str:
    return f"{run_prefix(run_id)}/manifest.json"


def stages_prefix(run_id: str) -> str:
    return f"{run_prefix(run_id)}/stages"


def stage(run_id: str, name: str) -> str:
    return f"{stages_prefix(run_id)}/{segment(name, 'stage')}.json"


def report(run_id: str) -> str:
    return f"{run_prefix(run_id)}/report.html"


def summary_table(run_id: str) -> str:
    return f"{run_prefix(run_id)}/summary.txt"


def latest(schedule: str) -> str:
    return f"{RUNS}/{LATEST}/{identifier(schedule, 'schedule name')}.json"


def parse_stage(key: str) -> tuple[str, str] | None:
    """(run id, stage name) of a stage marker key."""
    m = re.match(r"^runs/(?P<run>[^/]+)/stages/(?P<stage>[^/]+)\.json$", key)
    return (m["run"], m["stage"]) if m else None


def is_manifest(key: str) -> bool:
    return re.match(r"^runs/[^/]+/manifest\.json$", key) is not None


def lease(name: str) -> str:
    return f"{LEASES}/{identifier(name, 'lease name')}.json"


def lease_probe(token: str) -> str:
    """A lease store's one-off probe object (see `lease`)."""
    return f"{LEASES}/_probe-{segment(token)}"


def probe(token: str) -> str:
    return f"{PROBE}/{segment(token)}"


# ---------------------------------------------------------------------------- what the system wrote


def parse_artifact(key: str) -> StatsPartRef | MaskRef | ResultPartRef | None:
    """A statistics part, mask or result part key exactly as this module builds them, parsed; None for
    anything else (a README, a backup folder, a name outside the id grammar). What `--repair` may delete
    is what this parses (`persona_core.run.execution.repair`)."""
    if key.startswith(f"{STATS}/"):
        return parse_stats_part(key)
    if key.startswith(f"{MASKS}/"):
        ref = parse_mask(key)
        if ref is None or id_problem(ref.owner) or any(s in (".", "..") for s in key.split("/")):
            return None
        return ref
    if key.startswith(f"{RESULTS}/"):
        return parse_result_part(key)
    return None
