"""Learned masks in the store: one persona's learning as a resumable, skippable unit of work.

Store keys (all derived from content hashes, so reruns find finished work):

    masks/model=<k>/method=learned-<objective>@ffn-channels[+<knobs>]/sparsity=<s>/<persona>.safetensors
        the result: an ordinary ffn-channels mask (same codec, same evaluator); its metadata
        holds the unit's `identity`, the knobs, and the training data's key and hash
    learned/model=<k>/persona=<p>/data-<hash>.json
        the persona's training data (question/answer pairs), shared by every objective and
        sparsity learned from the same data recipe
    learned/model=<k>/persona=<p>/ckpt-<identity>.safetensors
        the learner's state every `checkpoint_every` steps (removed once the mask is written)
    exports/model=<k>/method=.../sparsity=<s>/<persona>/
        on request, the physically smaller model (plain transformers folder)

`run_task` is what a worker calls: it skips a mask already stored with the same identity,
reuses stored training data, resumes from a checkpoint whose identity matches, and
publishes the mask last (a killed worker leaves at most a checkpoint behind).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from persona_core.calib.stored import read_persona_stats
from persona_core.catalog import REFERENCE_PERSONA_ID, Persona
from persona_core.eval.validation import text_key
from persona_core.learn.config import DataConfig, LearnConfig
from persona_core.learn.data import general_text, generate_training_data, samples_from_json, samples_hash
from persona_core.learn.gate import ChannelGate
from persona_core.learn.learner import LearnerState, identity, learn_persona
from persona_core.masks.codec import read_mask, read_mask_metadata, write_mask
from persona_core.masks.export import export_is_current, export_model, publish_export
from persona_core.masks.methods import GENERAL, METHODS, PERSONA
from persona_core.models.loading import LoadedModel
from persona_core.store import layout
from persona_core.store.hashing import content_hash
from persona_core.store.store import Store
from persona_core.versions import LEARN_VERSION

log = logging.getLogger(__name__)


def knobs_suffix(config: LearnConfig, data: DataConfig) -> str:
    """``+<hash>`` when the knobs (other than sparsity and checkpointing) or the data recipe
    differ from the defaults, else empty (as `persona_core.masks.spec.mask_key` does for method parameters)."""
    base = replace(config, sparsity=LearnConfig.sparsity, checkpoint_every=LearnConfig.checkpoint_every)
    if base == replace(LearnConfig(), objective=config.objective) and data == DataConfig():
        return ""
    knobs = {k: v for k, v in asdict(base).items() if k != "objective"}
    return "+" + content_hash(LEARN_VERSION, knobs, data.hash)[:8]


def learned_mask_key(model_key: str, config: LearnConfig, data: DataConfig, persona_id: str, calib: str | None = None
             ) -> str:
    """As every mask's key: ``calib=<c>`` names the calibration config of the statistics the scores
    started from (absent for an init that reads none, e.g. magnitude)."""
    suffix = knobs_suffix(config, data)
    segment = layout.method_segment(config.method, "ffn-channels", params_hash=suffix.removeprefix("+") or None)
    return layout.mask(model_key, segment, config.sparsity, persona_id, calib=calib)


def data_identity(model_key: str, persona: Persona, data: DataConfig, held_out) -> str:
    return content_hash(LEARN_VERSION, "data", model_key, persona.description, data.hash,
                        sorted(text_key(q) for q in held_out))


def checkpoint_key(model_key: str, persona_id: str, unit_identity: str) -> str:
    return layout.learned_checkpoint(model_key, persona_id, unit_identity)


@dataclass(frozen=True)
class LearnTask:
    """One persona, one objective, one sparsity: what a learner worker runs."""

    persona: Persona
    config: LearnConfig
    data: DataConfig
    held_out: tuple[str, ...]
    model_key: str
    stats_fingerprints: tuple[tuple[str, str], ...] = ()  # (persona id, stats fingerprint) the init reads
    export: bool = False
    calib_hash: str | None = None  # the calibration config of those statistics

    @property
    def name(self) -> str:
        return f"{self.config.method} s={self.config.sparsity:g} {self.persona.id}"

    @property
    def identity(self) -> str:
        return identity(self.model_key, self.persona, content_hash(list(self.stats_fingerprints)), self.config,
                        self.data, self.held_out, general_text()[0] if self.config.general_weight > 0 else "")

    @property
    def mask_key(self) -> str:
        return learned_mask_key(self.model_key, self.config, self.data, self.persona.id,
                        self.calib_hash if self.stats_roles else None)

    @property
    def stats_roles(self) -> list[str]:
        """Persona ids whose statistics the init method reads, in its `needs` order."""
        needs = METHODS[self.config.init].needs
        return [self.persona.id if r == PERSONA else REFERENCE_PERSONA_ID for r in needs if r in (PERSONA, GENERAL)]


def is_current(store: Store, task: LearnTask) -> bool:
    try:
        meta = read_mask_metadata(store, task.mask_key)
    except Exception as err:  # unreadable: learn it again
        log.warning("%s: unreadable (%s); learning again", task.mask_key, err)
        return False
    return bool(meta) and meta.get("identity") == task.identity and (not task.export or export_current(store, task))


def export_current(store: Store, task: LearnTask) -> bool:
    """Whether the task's stored export passes its manifest (every file's size and sha256) and was
    exported from this very unit: a truncated or edited export is not current."""
    return export_is_current(store, layout.export_prefix(task.mask_key), identity=task.identity)


def store_export(loaded: LoadedModel, store: Store, task: LearnTask, masks) -> str:
    """The physically smaller model under ``exports/``, its manifest (naming the unit) written last."""
    prefix = layout.export_prefix(task.mask_key)
    with tempfile.TemporaryDirectory() as tmp:
        info = export_model(loaded, masks, Path(tmp) / "model", require_smaller=True, manifest={
            "mask_key": task.mask_key, "identity": task.identity, "model_key": task.model_key,
            "persona": task.persona.id})
        publish_export(info.path, store, prefix, replace=True)
    return prefix


def training_data(loaded: LoadedModel, store: Store, task: LearnTask) -> tuple[list[dict[str, str]], str]:
    """The persona's stored training data for this recipe, generated and stored first if absent."""
    key = layout.learned_data(task.model_key, task.persona.id, data_identity(task.model_key, task.persona, task.data,
                                                                  task.held_out))
    if store.exists(key):
        try:
            doc = store.read_json(key)
            samples = samples_from_json(json.dumps(doc["samples"]))
            if doc.get("hash") == samples_hash(samples):
                return samples, key
            log.warning("%s: content hash does not match; generating again", key)
        except (KeyError, TypeError, ValueError) as err:
            log.warning("%s: unreadable (%s); generating again", key, err)
    samples = generate_training_data(loaded, task.persona, task.data, task.held_out)
    store.write_json(key, {"persona": task.persona.id, "model": task.model_key, "data": asdict(task.data),
                           "hash": samples_hash(samples), "samples": samples})
    return samples, key


def checkpoint_owner(task: LearnTask, unit_id: str) -> dict[str, str]:
    """The fields a checkpoint of this task must carry to be resumed (checked with its digest)."""
    return {"identity": unit_id, "model_key": task.model_key, "persona": task.persona.id, "task": task.name}


def run_task(loaded: LoadedModel, store: Store, task: LearnTask,
             on_step: Callable[[LearnerState], None] | None = None) -> dict:
    """Learn one task's mask (resuming a matching checkpoint) and store it; skip it if current.

    `on_step` (tests: a simulated kill) runs after every checkpoint is written.
    """
    start = time.time()
    if loaded.key != task.model_key:
        raise ValueError(f"{task.name}: planned for model {task.model_key}, worker holds {loaded.key}")
    if is_current(store, task):
        return {"task": task.name, "status": "current", "key": task.mask_key, "seconds": 0.0}
    meta = read_mask_metadata(store, task.mask_key) if task.export else None
    if meta and meta.get("identity") == task.identity:  # the mask is current, its export is not: export again
        masks, _ = read_mask(store, task.mask_key)
        store_export(loaded, store, task, masks)
        return {"task": task.name, "status": "done", "exported_only": True, "key": task.mask_key,
                "seconds": round(time.time() - start, 2)}
    unit_id = task.identity
    samples, dkey = training_data(loaded, store, task)
    stats = [read_persona_stats(store, task.model_key, pid, calib_hash=task.calib_hash) for pid in task.stats_roles]
    ckey = checkpoint_key(task.model_key, task.persona.id, unit_id)
    owner = checkpoint_owner(task, unit_id)
    state = None
    if store.exists(ckey):
        try:
            state, _ = LearnerState.from_bytes(store.read_bytes(ckey), owner, ChannelGate(loaded.model).shape,
                                               task.config.steps)
            log.info("%s: resuming from step %d", task.name, state.step)
        except ValueError as err:  # ours (the key is this unit's): delete it and start over
            log.warning("%s: checkpoint %s refused (%s); deleting it and learning from step 0", task.name, ckey, err)
            store.delete(ckey)
            state = None

    def checkpoint(st: LearnerState) -> None:
        store.write_bytes(ckey, st.to_bytes(owner))
        if on_step is not None:
            on_step(st)

    resumed_from = state.step if state is not None else 0
    result = learn_persona(loaded, task.persona, stats, task.config, task.data, held_out=task.held_out,
                           samples=samples, state=state, on_checkpoint=checkpoint)
    meta = dict(result.metadata, model_key=task.model_key, persona=task.persona.id, identity=unit_id,
                calib_hash=task.calib_hash or "",
                code_version=LEARN_VERSION, data_key=dkey, stats=dict(task.stats_fingerprints),
                resumed_from=resumed_from, evaluation_questions=len(task.held_out))
    if task.export:
        meta["export"] = store_export(loaded, store, task, result.masks)
    write_mask(store, task.mask_key, result.masks, meta)
    if store.exists(ckey):
        store.delete(ckey)
    return {"task": task.name, "status": "done", "key": task.mask_key, "seconds": round(time.time() - start, 2),
            "tokens": result.metadata["learner_tokens"], "resumed_from": resumed_from}
