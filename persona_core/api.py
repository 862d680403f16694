"""The public API: open a store, list and read masks, put one on a loaded model and take it off,
talk to the result, and export it as a plain Hugging Face model. (docs/using-masks.md)

    from persona_core import open_store, load_model, list_masks, read_mask, apply_mask

    store = open_store("./persona-store")
    loaded = load_model("smollm2-135m")
    introvert = read_mask(store, list_masks(store, loaded, persona="introvert")[0])
    with apply_mask(loaded, introvert):      # masked in place; the dense weights come back after
        ...

`apply_mask` is the evaluator's own mechanism (`persona_core.eval.masked.MaskedModel`): the dense
weights of each masked module are copied once per model, a second mask is written straight over
the first, and restoring is bit-exact. It works as a ``with`` block or as a call whose handle is
restored later (``h = apply_mask(m, mask); ...; h.restore()``); handles nest.

`Conversation` generates from one persona under any condition (dense, dense+prompt,
dense+fewshot, dense+steer, masked, masked+prompt), streamed; `export_mask` writes a mask as a
model folder with its card (`persona_core.masks.export`), measurements read from the results store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from persona_core.catalog import REFERENCE_PERSONA_ID, Persona
from persona_core.errors import UserError
from persona_core.eval.conditions import CONDITIONS
from persona_core.eval.config import EvalConfig
from persona_core.eval.engine import Evaluator
from persona_core.eval.masked import AppliedMask, MaskedModel, apply_masks
from persona_core.eval.steered import steering_choice
from persona_core.eval.steering import steer
from persona_core.masks.codec import MaskFile
from persona_core.masks.export import ExportInfo, export_is_current, export_model, publish_export
from persona_core.models.loading import LoadedModel, load_model, model_key
from persona_core.report.analysis import pair_separation
from persona_core.report.results import load_results
from persona_core.run import runs
from persona_core.store import layout
from persona_core.store.store import Store, open_store

log = logging.getLogger(__name__)

__all__ = ["Conversation", "Mask", "MaskRef", "Store", "apply_mask", "export_mask", "find_mask", "list_masks",
           "load_model", "measurements", "model_card", "open_store", "read_mask"]

MaskRef = layout.MaskRef


# ---------------------------------------------------------------------------- masks in a store


@dataclass(frozen=True)
class Mask:
    """One stored mask, read and verified: keep-masks by module name (True = keep) and its metadata."""

    ref: layout.MaskRef
    masks: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict = field(repr=False)
    digest: str  # the content digest of the bits read (what result rows name as mask_hash)

    @property
    def key(self) -> str:
        return self.ref.key

    @property
    def sparsity(self) -> float:
        """The fraction of masked weights actually removed."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0


def _key_of(model: str | LoadedModel | Evaluator | None, store: Store) -> str | None:
    if model is None:
        return None
    if isinstance(model, (LoadedModel, Evaluator)):
        return model.key if isinstance(model, LoadedModel) else model.model_key
    if store.list(layout.masks_prefix(model) + "/", suffix=".safetensors"):
        return model  # a model key with masks stored
    try:
        return model_key(model)
    except (ValueError, OSError) as err:
        raise UserError(f"model {model!r}: neither a model key with masks in {store.uri()} nor a model spec "
                        f"({err})") from None


def list_masks(store: str | Store, model: str | LoadedModel | Evaluator | None = None, *,
               persona: str | None = None, method: str | None = None, sparsity: float | None = None,
               budget: str | float | None = None) -> list[layout.MaskRef]:
    """The masks stored for a model (a model key, a spec, or a loaded model; None: every model), parsed
    from their keys, optionally only a persona's (its own, and the plain-pruning ones every persona
    shares: owner ``general``), a method (name or glob, e.g. ``contrastive-*``), a sparsity or a budget."""
    store = open_store(store)
    key = _key_of(model, store)
    prefix = layout.masks_prefix(key) if key else layout.MASKS
    refs = [r for r in (layout.parse_mask(k) for k in store.list(prefix + "/", suffix=".safetensors")) if r]
    if persona is not None:
        refs = [r for r in refs if r.owner in (persona, REFERENCE_PERSONA_ID)]
    if method is not None:
        refs = [r for r in refs if fnmatch.fnmatchcase(r.base, method) or fnmatch.fnmatchcase(r.method, method)]
    if sparsity is not None:
        refs = [r for r in refs if not r.budget and abs(r.sparsity - float(sparsity)) < 1e-9]
    if budget is not None:
        refs = [r for r in refs if r.budget and _budget_matches(r.budget, budget)]
    return sorted(refs, key=lambda r: (r.model_key, r.owner != persona, r.method, r.budget, r.sparsity, r.calib))


def _budget_matches(segment: str, budget: str | float) -> bool:
    text = str(budget)
    try:
        text = f"ppl{float(budget):g}"
    except ValueError:
        pass
    return segment == text or segment.startswith(text + "-")


def describe(ref: layout.MaskRef) -> str:
    """A mask in one line: owner, method segment, level, calibration config."""
    calib = f" calib={ref.calib}" if ref.calib else ""
    return f"{ref.owner}  {ref.method}  {ref.level}{calib}"


def find_mask(store: str | Store, model: str | LoadedModel | Evaluator | None, persona: str, *,
              method: str | None = None, sparsity: float | None = None, budget: str | float | None = None,
              key: str | None = None, calib: str | None = None, methods: Sequence[str] = ()) -> layout.MaskRef:
    """The one stored mask a persona's export or chat means; UserError listing the candidates otherwise.

    `key` names it outright. Else among the persona's own masks (then the shared ones), those of
    `method`, `sparsity` or `budget`, and calibration config `calib` (preferred, not required);
    `methods` (e.g. a config's masks.methods) break a tie when nothing else is named.
    """
    store = open_store(store)
    if key:
        ref = layout.parse_mask(key)
        if ref is None:
            raise UserError(f"--mask-key {key!r} is not a mask key (masks/model=<key>/.../<persona>.safetensors)")
        if not store.exists(key):
            raise UserError(f"{store.uri(key)}: no mask there")
        return ref
    refs = list_masks(store, model, persona=persona, method=method, sparsity=sparsity, budget=budget)
    if not refs:
        named = ", ".join(f"{k} {v}" for k, v in (("method", method), ("sparsity", sparsity), ("budget", budget))
                          if v is not None) or "any method"
        raise UserError(f"no mask of persona {persona!r} ({named}) in {store.uri()} for model "
                        f"{_key_of(model, store) or 'any'}: build them first (persona-jobs run or build-masks)")
    own = [r for r in refs if r.owner == persona] or refs
    if calib and any(r.calib == calib for r in own):
        own = [r for r in own if r.calib == calib or not r.calib]
    if len(own) > 1 and method is None and methods:
        preferred = [r for r in own if any(fnmatch.fnmatchcase(r.base, m) for m in methods)]
        own = preferred or own
    if len(own) > 1:
        lines = "\n  ".join(describe(r) + f"   --mask-key {r.key}" for r in own[:20])
        raise UserError(f"{len(own)} masks fit persona {persona!r}; pick one with --method, --sparsity, --budget "
                        f"or --mask-key:\n  {lines}")
    return own[0]


def read_mask(store: str | Store, ref: layout.MaskRef | str) -> Mask:
    """A stored mask (by `MaskRef` or key), every module read and checked against its digests."""
    store = open_store(store)
    key = ref if isinstance(ref, str) else ref.key
    parsed = layout.parse_mask(key) if isinstance(ref, str) else ref
    if parsed is None:
        raise ValueError(f"{key!r} is not a mask key")
    f = MaskFile(store, key)
    masks = f.read()
    return Mask(parsed, masks, dict(f.metadata), f.read_digest or "")


def apply_mask(model: nn.Module | LoadedModel | Evaluator | MaskedModel,
               mask: Mask | dict[str, torch.Tensor]) -> AppliedMask:
    """Mask `model` in place now; the returned handle restores the dense weights bit-exactly, on
    ``restore()`` or at the end of a ``with`` block. Applying another mask while one is on swaps it
    in (restoring that handle brings the first back). An evaluator's own masks are used for an
    `Evaluator`, so user code and scoring never hold two dense copies of one model."""
    masks = mask.masks if isinstance(mask, Mask) else mask
    if isinstance(model, Evaluator):
        target: nn.Module | MaskedModel = model.masks
    elif isinstance(model, LoadedModel):
        target = model.model
    else:
        target = model
    return apply_masks(target, masks)


# ---------------------------------------------------------------------------- measurements and the card


def run_ids(store: str | Store) -> list[str]:
    """Every run in the store, newest first: those with a manifest, then those with finished stages
    only (running or interrupted)."""
    store = open_store(store)
    finished = {m.get("run_id"): m.get("finished") or 0 for m in runs.list_runs(store)}
    for key in store.list(layout.RUNS + "/", suffix=".json"):
        parsed = layout.parse_stage(key)
        if parsed:
            finished.setdefault(parsed[0], 0)
    return sorted(finished, key=lambda r: finished[r], reverse=True)


def measurements(store: str | Store, mask: Mask, persona: str) -> dict[str, Any] | None:
    """What the results store measured for this mask (matched by its digest) and persona, from the
    newest run that scored it: the run, the pair's separation under ``masked`` with its 95% interval,
    and the perplexity ratio (with a normal 95% interval where the rows carry a standard error).
    None: no run scored it."""
    store = open_store(store)
    finished = {m.get("run_id"): m.get("finished") for m in runs.list_runs(store)}
    for run_id in run_ids(store):
        try:
            table = load_results(store, run_id)
        except Exception as err:  # a damaged run must not hide this mask's numbers in another one
            log.warning("run %s: results not readable (%s); skipped", run_id, err)
            continue
        if table.num_rows == 0:
            continue
        cols = ["persona", "method", "sparsity", "mask_hash", "condition", "metric", "value", "stderr"]
        rows = [r for r in table.select(cols).to_pylist() if r["mask_hash"] == mask.digest and r["persona"] == persona]
        if rows:
            return _measured(table, run_id, persona, rows, finished.get(run_id))
    return None


def _measured(table, run_id: str, persona: str, rows: list[dict], finished: float | None) -> dict[str, Any]:
    method, sparsity = rows[0]["method"], rows[0]["sparsity"]
    out: dict[str, Any] = {"run_id": run_id, "method": method, "sparsity": sparsity,
                           "date": time.strftime("%Y-%m-%d", time.gmtime(finished)) if finished else None}
    ppl = [r for r in rows if r["condition"] == "masked" and r["metric"] == "perplexity-ratio"]
    if ppl:
        v, se = float(ppl[0]["value"]), ppl[0]["stderr"]
        ok = se is not None and not math.isnan(se)
        out["perplexity_ratio"] = (v, v - 1.96 * se if ok else math.nan, v + 1.96 * se if ok else math.nan)
    try:
        sep = pair_separation(table)
    except Exception as err:  # the card still names the run; the separation is left out
        log.warning("run %s: cannot compute its separations: %s", run_id, err)
        return out
    hit = sep[((sep.a == persona) | (sep.b == persona)) & (sep.method == method) & (sep.sparsity == sparsity)
              & (sep.condition == "masked")]
    if len(hit):
        r = hit.iloc[0]
        out["separation"] = (float(r.separation), float(r.lo), float(r.hi))
        out["pair"] = r.pair
    return out


def _interval(v: tuple[float, float, float] | None) -> str:
    if v is None:
        return "not evaluated"
    value, lo, hi = v
    return f"{value:.3f}" + ("" if math.isnan(lo) else f" (95% CI {lo:.3f} to {hi:.3f})")


def model_card(loaded: LoadedModel, mask: Mask, persona: Persona | None, info: ExportInfo | None,
               measured: dict[str, Any] | None) -> str:
    """The export's README.md: base model, method and parameters, calibration data, digest, measurements."""
    meta, ref = mask.metadata, mask.ref
    pid = persona.id if persona else ref.owner
    level = f"budget {ref.budget}" if ref.budget else f"sparsity {ref.sparsity:g}"
    chosen = ((meta.get("budget_search") or {}).get("search") or {}).get("chosen") or {}
    params = meta.get("params") or meta.get("config") or {}
    roles = meta.get("roles") or {}
    stats = meta.get("stats_versions") or {}
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [persona-subnetworks, pruning]",
        "---", "", f"# {pid}: a persona subnetwork of {loaded.spec}", "",
        (persona.description if persona and persona.description else ""), "",
        "Made by persona-subnetworks: a mask over the weights of the base model, applied and saved as a "
        "plain model (`AutoModelForCausalLM.from_pretrained` loads it; no code of ours needed).", "",
        "| | |", "|---|---|",
        f"| base model | `{loaded.spec}` (model key `{loaded.key}`) |",
        f"| method | `{ref.base}` (key segment `{ref.method}`), granularity `{ref.granularity}`, "
        f"allocation `{ref.allocation}` |",
        f"| level | {level}" + (f"; the budget search chose sparsity {chosen.get('sparsity')}" if chosen else "")
        + f"; {100 * mask.sparsity:.1f}% of the masked weights removed |",
        "| parameters | " + (", ".join(f"`{k}={v}`" for k, v in sorted(params.items())) if isinstance(params, dict)
                             else f"`{params}`") + " |" if params else "| parameters | the method's defaults |",
        "| calibration data | " + (", ".join(f"{role}: `{p}`" for role, p in roles.items()) or "none (no statistics)")
        + (f"; calibration config `{ref.calib}`" if ref.calib else "")
        + ("; persona hashes " + ", ".join(f"`{p}` {v.get('persona_hash', '?')}" for p, v in stats.items())
           if stats else "") + " |",
        f"| mask | `{ref.key}`, digest `{mask.digest}` |",
        f"| weights | {str(loaded.model.dtype).replace('torch.', '')} |",
    ]
    if info is not None:
        why = info.reason if ref.granularity == "ffn-channels" else f"a {ref.granularity} mask removes no whole channels"
        size = (f"smaller: intermediate_size {info.dense_intermediate_size} -> {info.intermediate_size}, "
                f"{info.parameters:,} of {info.dense_parameters:,} parameters" if info.smaller else
                f"dense shapes, the removed weights stored as zeros ({why})")
        lines.append(f"| export | {size} |")
    if measured:
        lines += [f"| measured in | run `{measured['run_id']}`" + (f" ({measured['date']})" if measured.get("date")
                                                                      else "") + " |",
                  f"| separation{' of ' + measured['pair'] if measured.get('pair') else ''} | "
                  f"{_interval(measured.get('separation'))} |",
                  f"| perplexity ratio (general text) | {_interval(measured.get('perplexity_ratio'))} |"]
    else:
        lines += ["| separation | not evaluated |", "| perplexity ratio | not evaluated |"]
    lines += ["", "Separation: how much more the pair's two subnetworks prefer their own persona's held-out "
              "statements than the other's (0 for the dense model); perplexity ratio: general-text perplexity "
              "against the dense model's. Both from the project's evaluator; see its docs/evaluation.md.", ""]
    return "\n".join(lines)


def export_mask(store: str | Store, loaded: LoadedModel, mask: Mask, dest: str, *, persona: Persona | None = None,
                replace: bool = False) -> tuple[str, ExportInfo | None]:
    """Write `mask` on `loaded` as a Hugging Face model folder at `dest` (a local path or any fsspec
    URL), with its card and a manifest naming the mask digest; built in a temporary folder and
    published last. An export of the same mask already verified there is left as it is (info None)."""
    store = open_store(store)
    if loaded.key != mask.ref.model_key:
        raise UserError(f"{mask.key} belongs to model {mask.ref.model_key}, not {loaded.key} ({loaded.spec})")
    dtype = str(loaded.model.dtype).replace("torch.", "")
    if export_is_current(dest, mask_digest=mask.digest, model_key=loaded.key, dtype=dtype):
        log.info("%s: already an export of this mask (verified)", dest)
        return dest, None
    pid = persona.id if persona else mask.ref.owner
    measured = measurements(store, mask, pid)
    with tempfile.TemporaryDirectory() as tmp:
        info = export_model(loaded, mask.masks, Path(tmp) / "model",
                            card=lambda i: model_card(loaded, mask, persona, i, measured), manifest={
                                "mask_key": mask.key, "mask_digest": mask.digest, "model_key": loaded.key,
                                "model": loaded.spec, "persona": pid, "method": mask.ref.method, "dtype": dtype,
                                "measured_in": (measured or {}).get("run_id")})
        url = publish_export(info.path, dest, replace=replace)
    return url, dataclasses.replace(info, path=Path(url)) if "://" not in url else info


# ---------------------------------------------------------------------------- talking to a persona


class _Printer:
    """A transformers streamer: decoded text, as it is generated, to a callback."""

    def __init__(self, tokenizer, on_text: Callable[[str], None]):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.ids: list[int] = []
        self.shown = 0
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.shown and not text.endswith("\ufffd"):  # never half a UTF-8 character
            self.on_text(text[self.shown:])
            self.shown = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.shown:
            self.on_text(text[self.shown:])
            self.shown = len(text)


STATS_STEERING = "dense+steer"  # the steering condition a conversation can apply (from calibration statistics)


def talk_conditions() -> tuple[str, ...]:
    """The conditions a `Conversation` applies: every registered one but steering it cannot reproduce
    (only ``dense+steer``'s vectors come from the stored statistics)."""
    return tuple(n for n, c in CONDITIONS.items() if not c.steered or n == STATS_STEERING)


class Conversation:
    """One persona on one loaded model, under a condition of `persona_core.eval.conditions` (`talk_conditions`).

    ``masked`` and ``masked+prompt`` need `mask`; ``dense+steer`` needs the calibration statistics
    (`stats`, persona id -> `PersonaStats` of the persona and its opposite, as the evaluator reads
    them) and picks its layer and strength on validation data once, as the evaluator does.
    """

    def __init__(self, model: LoadedModel | Evaluator, persona: Persona, opposite: Persona | None = None,
                 mask: Mask | None = None, *, config: EvalConfig | None = None, stats: dict | None = None):
        self.ev = model if isinstance(model, Evaluator) else Evaluator(model)
        self.persona, self.opposite, self.mask, self.stats = persona, opposite, mask, stats
        self.config = config or EvalConfig()
        self.history: list[dict[str, str]] = []

    @contextlib.contextmanager
    def condition(self, name: str) -> Iterator[str | None]:
        """Inside the block the model is in condition `name`; yields the system prompt for `question`."""
        cond = CONDITIONS[name]
        if name not in talk_conditions():
            raise UserError(f"condition {name!r} cannot be applied outside an evaluation; "
                            f"these can: {', '.join(talk_conditions())}")
        if cond.masked and self.mask is None:
            raise UserError(f"condition {name!r} needs a mask of {self.persona.id!r}")
        with contextlib.ExitStack() as stack:
            if cond.masked:
                stack.enter_context(apply_mask(self.ev, self.mask))
            if cond.steered:
                vectors, choice = steering_choice(self.ev, self.persona, self.opposite, self.config, self.stats)
                stack.enter_context(steer(self.ev.model, choice.layer, vectors[choice.layer], choice.alpha))
            yield cond

    def _system(self, cond, question: str) -> str | None:
        few = cond.fewshot(self.persona, self.opposite, self.config.fewshot_k, self.config.seed)
        return few.system(question) if few is not None else cond.system(self.persona)

    def reply(self, condition: str, message: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
              top_p: float = 1.0, seed: int | None = None, on_text: Callable[[str], None] | None = None,
              keep: bool = False) -> str:
        """The model's answer to `message` under `condition` (greedy at temperature 0, else sampled
        with `seed`), streamed to `on_text`; with `keep`, the turn joins the conversation's history."""
        with self.condition(condition) as cond:
            system = self._system(cond, message)
            msgs = ([{"role": "system", "content": system}] if system else []) + self.history + [
                {"role": "user", "content": message}]
            tok = self.ev.tokenizer
            if self.ev.has_chat_template:
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=False)
            else:
                ids = tok(self.ev.prompt(system, message), return_tensors="pt")["input_ids"]
            ids = torch.as_tensor(ids).to(self.ev.device)
            kwargs: dict[str, Any] = {"do_sample": False}
            if temperature > 0:
                if seed is not None:
                    torch.manual_seed(seed)
                kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p}
            printer = _Printer(tok, on_text) if on_text else None
            with torch.inference_mode():
                out = self.ev.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                             eos_token_id=tok.eos_token_id, streamer=printer, **kwargs)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        if keep:
            self.history += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
        return answer
