"""persona_core on a GPU with random-weight models of real shapes; prints ONE JSON line.

Llama-3.2-1B and Llama-3.1-8B shapes (their published configs, built in code: no download,
random weights, the byte tokenizer), bf16 on CUDA (fp32 on CPU), each phase through the
library's own code against a plain pass of the same model over the same tokens:

* ``calibration``: `StatsRecorder.run_batch` (the statistics hooks) against a plain forward of
  the decoder body, same random token batches; ``ratio`` = plain tokens/s over statistics
  tokens/s (target <= 1.10).
* ``scoring``: `statement_scores` through an `Evaluator` (shared prefix, LM head on scored
  positions) against a plain batched forward with full logits over the same sequences;
  ``pref_vs_plain`` = plain time over scoring time (target >= 0.8).
* ``swap``: `persona_core.api.apply_mask` (dense -> mask A), the evaluator's `MaskedModel.apply`
  (A -> B, as the evaluation job swaps) and `restore` (-> dense) of random 50% masks over every
  prunable weight, against the memory-bandwidth bound: the bytes each pass must move (apply:
  read dense + read the 1-byte mask + write the weight; restore: read dense + write) over the
  bandwidth measured on this device (a large tensor copy). ``*_vs_bound`` >= 1; 1 is the bound.
* ``learner``: `MaskLearner.step` (the ffn-channel gate, straight-through top-k, Adam on the
  scores; teacher targets from `prepare_examples` / `prepare_general`, scores initialised from
  the calibration statistics) against a plain forward+backward of the same sequences with every
  weight trainable (``ratio_vs_plain``) and with frozen weights, gradients to the input
  embeddings only (``ratio_vs_frozen``). Target ratio >= 0.8.
* ``peak_gib``: peak memory per phase (``torch.cuda.max_memory_allocated`` on CUDA, reset before
  each phase; on CPU the process's peak RSS after each phase, which only grows).

Timed passes of the two sides interleave and the median (best for calibration) is kept, so
background load hits both alike. ``--small``: one scaled-down Llama-3-style shape, fp32, on CPU,
a few seconds (tests/test_benchmarks.py runs it). Logs go to stderr; never imports Ray.

    python benchmarks/gpu.py [--models 1b,8b] [--small] [--batch-size 8] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import resource
import statistics
import sys
import time
from typing import Callable, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from persona_core.api import apply_mask  # noqa: E402
from persona_core.calib.general_text import BUILTIN_GENERAL  # noqa: E402
from persona_core.calib.recorder import StatsRecorder  # noqa: E402
from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.eval.config import EvalConfig  # noqa: E402
from persona_core.eval.engine import Evaluator  # noqa: E402
from persona_core.eval.validation import STATEMENT_QUESTION, statement_scores, text_windows  # noqa: E402
from persona_core.learn.config import DataConfig, LearnConfig  # noqa: E402
from persona_core.learn.data import training_instructions  # noqa: E402
from persona_core.learn.distill import pad_sequences, prepare_examples, prepare_general  # noqa: E402
from persona_core.learn.learner import MaskLearner, initial_scores  # noqa: E402
from persona_core.models.layers import decoder_body  # noqa: E402
from persona_core.models.loading import LoadedModel  # noqa: E402
from persona_core.models.tiny import byte_tokenizer  # noqa: E402

log = logging.getLogger("bench.gpu")
GIB = 2 ** 30


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


# The published configs (config.json of meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B): 1,235,814,400
# and 8,030,261,248 parameters (tests/test_benchmarks.py counts them on the meta device).
SHAPES: dict[str, tuple[str, dict]] = {
    "1b": ("llama-3.2-1b", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                max_position_embeddings=131072, rope_parameters=_llama3_rope(32.0),
                                rms_norm_eps=1e-5, tie_word_embeddings=True)),
    "8b": ("llama-3.1-8b", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                max_position_embeddings=131072, rope_parameters=_llama3_rope(8.0),
                                rms_norm_eps=1e-5, tie_word_embeddings=False)),
}
# --small: Llama-3's layout (GQA 4:1, llama3 rope, tied embeddings) at a size a CPU runs in seconds
SMALL = ("small-llama-3", dict(vocab_size=512, hidden_size=128, intermediate_size=448, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                               max_position_embeddings=131072, rope_parameters=_llama3_rope(32.0),
                               rms_norm_eps=1e-5, tie_word_embeddings=True))


class Sizes(NamedTuple):  # a NamedTuple: tests load this file without registering it as a module
    """How much work each phase times (the defaults suit a GPU; `--small` shrinks them)."""

    batch_size: int = 8  # calibration sequences per batch
    seq_len: int = 512  # calibration tokens per sequence
    batches: int = 4  # calibration batches per timed pass
    statements: int = 64  # statements scored per timed pass
    examples: int = 8  # learner training examples
    steps: int = 3  # learner steps timed (after one warm-up step)
    repeats: int = 3  # timed passes per side (calibration, scoring, swap)
    copy_mib: int = 1024  # the bandwidth probe's tensor


SMALL_SIZES = Sizes(batch_size=2, seq_len=32, batches=2, statements=4, examples=2, steps=1, repeats=1, copy_mib=32)


def llama_config(shape: dict, tokenizer):
    from transformers import LlamaConfig  # heavy: only when a model is built

    return LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_model(name: str, shape: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A random-weight Llama of `shape`, built directly on `device` in `dtype` (no fp32 copy of an 8B
    model first), frozen, in eval mode, with the byte tokenizer (token ids < 260 of its vocabulary)."""
    from transformers import LlamaForCausalLM  # heavy: only when a model is built

    tok = byte_tokenizer()
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = LlamaForCausalLM(llama_config(shape, tok))
    model.eval().requires_grad_(False)
    return LoadedModel(f"random-{name}", f"random-{name}", model, tok, "random weights (benchmarks/gpu.py)")


class Device:
    """Synchronisation, timing and memory figures for one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], object]) -> float:
        self.sync()
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> float:
        if self.cuda:
            return round(torch.cuda.max_memory_allocated(self.device) / GIB, 3)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 3)  # Linux: KiB

    def allocated_gib(self) -> float | None:
        return round(torch.cuda.memory_allocated(self.device) / GIB, 3) if self.cuda else None

    def bandwidth(self, mib: int, repeats: int = 5) -> float:
        """Bytes per second of a large device-to-device copy (read + write counted)."""
        n = mib * 2 ** 20
        src = torch.ones(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = min(self.timed(lambda: dst.copy_(src)) for _ in range(repeats))
        return 2 * n / best


# ---------------------------------------------------------------------------- phases


def calibration_phase(loaded: LoadedModel, dev: Device, sizes: Sizes) -> tuple[dict, dict]:
    """Statistics hooks against a plain forward of the decoder body; also returns the statistics."""
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 256, (sizes.batch_size, sizes.seq_len), generator=gen).to(dev.device),
             torch.ones(sizes.batch_size, sizes.seq_len, dtype=torch.long, device=dev.device))
            for _ in range(sizes.batches)]
    tokens = sizes.batches * sizes.batch_size * sizes.seq_len
    body = decoder_body(loaded.model)
    stats = {}

    @torch.inference_mode()
    def plain() -> None:
        for ids, att in data:
            pos = (att.cumsum(-1) - 1).clamp_min(0)
            body(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False)

    def recorded() -> float:
        with StatsRecorder(loaded) as rec:
            t = dev.timed(lambda: [rec.run_batch(ids, att) for ids, att in data])
        stats.update(rec.result())
        return t

    plain(), recorded()  # warm-up
    t_plain, t_stats = [], []
    for _ in range(sizes.repeats):
        t_plain.append(dev.timed(plain))
        t_stats.append(recorded())
    p, s = tokens / min(t_plain), tokens / min(t_stats)
    return {"tokens": tokens, "batch_size": sizes.batch_size, "seq_len": sizes.seq_len,
            "plain_tokens_per_s": round(p, 1), "stats_tokens_per_s": round(s, 1), "ratio": round(p / s, 4),
            "target": 1.10}, stats


def scoring_phase(ev: Evaluator, dev: Device, sizes: Sizes) -> dict:
    """Statement-preference scoring against a plain batched forward (full logits), same sequences."""
    ev.configure(EvalConfig())
    stmts = [s for p in load_catalog("builtin") for s in p.evaluation][: sizes.statements]
    prefix = ev.encode(ev.prompt(None, STATEMENT_QUESTION))
    seqs = sorted((prefix + c for c in ev.encode_many(stmts, continuation=True)), key=len, reverse=True)
    tokens = sum(len(q) for q in seqs)

    def plain() -> None:
        for b in range(0, len(seqs), ev.batch_size):
            ev._forward(*ev._pad(seqs[b: b + ev.batch_size]))

    dev.timed(plain), dev.timed(lambda: statement_scores(ev, stmts))  # warm-up
    tp, ts = [], []
    for _ in range(sizes.repeats):
        tp.append(dev.timed(plain))
        ts.append(dev.timed(lambda: statement_scores(ev, stmts)))
    t_plain, t_ours = statistics.median(tp), statistics.median(ts)
    return {"statements": len(stmts), "tokens": tokens, "prefix_tokens": len(prefix), "batch_size": ev.batch_size,
            "plain_tokens_per_s": round(tokens / t_plain, 1), "pref_tokens_per_s": round(tokens / t_ours, 1),
            "pref_vs_plain": round(t_plain / t_ours, 3), "target": 0.8}


def swap_bytes(masks: dict[str, torch.Tensor], element_size: int) -> tuple[int, int]:
    """(bytes an apply moves, bytes a restore moves) over `masks`: apply reads the dense copy and the
    1-byte mask and writes the weight; restore reads the dense copy and writes the weight."""
    n = sum(m.numel() for m in masks.values())
    return n * (2 * element_size + 1), n * 2 * element_size


def random_masks(ev: Evaluator, seed: int) -> dict[str, torch.Tensor]:
    """A random keep-half mask over every prunable weight, made on the weight's device."""
    gen = torch.Generator(device=ev.device).manual_seed(seed)
    out = {}
    for name in ev.prunable:
        w = ev.model.get_submodule(name).weight
        out[name] = torch.rand(w.shape, generator=gen, device=w.device) < 0.5
    return out


def swap_phase(ev: Evaluator, dev: Device, sizes: Sizes, bandwidth: float) -> dict:
    """apply (dense -> A, `api.apply_mask`), swap (A -> B, `MaskedModel.apply`), restore (-> dense)."""
    a, b = random_masks(ev, 1), random_masks(ev, 2)
    es = ev.model.get_submodule(ev.prunable[0]).weight.element_size()
    apply_b, restore_b = swap_bytes(a, es)
    apply_mask(ev, a).restore()  # warm-up; takes the dense snapshot once
    t_apply, t_swap, t_restore = [], [], []
    for _ in range(sizes.repeats):
        t_apply.append(dev.timed(lambda: apply_mask(ev, a)))
        t_swap.append(dev.timed(lambda: ev.masks.apply(b)))
        t_restore.append(dev.timed(ev.masks.restore))
    apply_s, swap_s, restore_s = (statistics.median(t) for t in (t_apply, t_swap, t_restore))
    apply_bound, restore_bound = apply_b / bandwidth, restore_b / bandwidth
    return {"weights": sum(ev.model.get_submodule(n).weight.numel() for n in ev.prunable),
            "apply_bytes": apply_b, "restore_bytes": restore_b,
            "apply_s": round(apply_s, 5), "swap_s": round(swap_s, 5), "restore_s": round(restore_s, 5),
            "apply_bound_s": round(apply_bound, 5), "restore_bound_s": round(restore_bound, 5),
            "apply_vs_bound": round(apply_s / apply_bound, 3), "swap_vs_bound": round(swap_s / apply_bound, 3),
            "restore_vs_bound": round(restore_s / restore_bound, 3)}


def plain_step(loaded: LoadedModel, seqs: list[list[int]], pad: int, trainable: bool) -> None:
    """The baseline: a plain LM forward+backward of `seqs`, gradients to every weight (`trainable`) or
    to the input embeddings only (frozen weights: the least a mask learner must compute)."""
    model = loaded.model
    ids, att = pad_sequences(seqs, pad, loaded.device)
    labels = ids.masked_fill(att == 0, -100)
    if trainable:
        model.requires_grad_(True)
        try:
            model(input_ids=ids, attention_mask=att, labels=labels, use_cache=False).loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            model.requires_grad_(False)
        return
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=att, labels=labels, use_cache=False)
    torch.autograd.grad(out.loss, emb)


def learner_phase(loaded: LoadedModel, stats: dict, dev: Device, sizes: Sizes) -> dict:
    """`MaskLearner` steps against plain forward+backward passes over each step's own sequences."""
    catalog = load_catalog("builtin")
    persona = next(iter(catalog))
    config = LearnConfig(steps=sizes.steps + 1, general_windows=8)
    questions = training_instructions(DataConfig(examples=sizes.examples))
    answers = [s for p in catalog for s in p.calibration]
    samples = [{"question": q, "answer": answers[i % len(answers)]} for i, q in enumerate(questions)]
    dev.reset_peak()
    t0 = time.perf_counter()
    examples = prepare_examples(loaded, persona, samples, config)
    windows = text_windows(loaded.tokenizer, BUILTIN_GENERAL, config.general_window, config.general_windows)
    general = prepare_general(loaded, windows, config)
    scores, tiebreak = initial_scores(loaded, [stats], config)
    dev.sync()
    prepare_s = time.perf_counter() - t0
    learner = MaskLearner(loaded, examples, general, scores, tiebreak, config)
    times: dict[str, list[float]] = {"learner": [], "plain": [], "frozen": []}
    peaks: dict[str, float] = {"prepare": dev.peak_gib(), **{k: 0.0 for k in times}}  # teacher targets, then per pass
    tokens = []
    with learner.gate:
        for step in range(sizes.steps + 1):  # step 0 warms every path up
            persona_b, general_b = learner.batch(learner.state.step)
            seqs = [e.ids for e in persona_b] + [e.ids for e in general_b]
            passes = {"learner": learner.step,
                      "plain": lambda: plain_step(loaded, seqs, learner.pad, trainable=True),
                      "frozen": lambda: plain_step(loaded, seqs, learner.pad, trainable=False)}
            for kind, fn in passes.items():
                learner.gate.values = None  # the plain passes run the dense model
                dev.reset_peak()
                t = dev.timed(fn)
                peaks[kind] = max(peaks[kind], dev.peak_gib())
                if step:
                    times[kind].append(t)
            if step:
                tokens.append(sum(len(s) for s in seqs))
            log.info("learner step %d: %d tokens, %s", step, sum(len(s) for s in seqs),
                     ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if v and step))
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = statistics.median(tokens)
    return {"persona": persona.id, "examples": len(examples), "general_windows": len(general),
            "batch_size": config.batch_size, "general_batch": config.general_batch, "steps_timed": sizes.steps,
            "tokens_per_step": tok, "prepare_s": round(prepare_s, 3), "steps_per_s": round(1 / med["learner"], 4),
            "learner_tokens_per_s": round(tok / med["learner"], 1), "plain_tokens_per_s": round(tok / med["plain"], 1),
            "frozen_tokens_per_s": round(tok / med["frozen"], 1),
            "ratio_vs_plain": round(med["plain"] / med["learner"], 3),
            "ratio_vs_frozen": round(med["frozen"] / med["learner"], 3), "target": 0.8,
            "peak_gib": {k: v for k, v in peaks.items()}}


def run_model(name: str, shape: dict, dev: Device, dtype: torch.dtype, sizes: Sizes, bandwidth: float) -> dict:
    """Every phase on one random-weight model; the figures, with peak memory per phase."""
    t0 = time.perf_counter()
    loaded = random_model(name, shape, dev.device, dtype)
    out: dict = {"params": sum(p.numel() for p in loaded.model.parameters()), "build_s": round(time.perf_counter() - t0, 2),
                 "weights_gib": dev.allocated_gib(), "peak_gib": {}}
    log.info("%s: %d parameters built in %.1f s", name, out["params"], out["build_s"])
    ev = Evaluator(loaded, device=dev.device.type)
    phases: list[tuple[str, Callable[[], dict]]] = [
        ("calibration", lambda: calibration_phase(loaded, dev, sizes)),
        ("scoring", lambda: scoring_phase(ev, dev, sizes)),
        ("swap", lambda: swap_phase(ev, dev, sizes, bandwidth)),
        ("learner", lambda: learner_phase(loaded, stats, dev, sizes)),
    ]
    stats: dict = {}
    for phase, fn in phases:
        dev.reset_peak()
        t = time.perf_counter()
        result = fn()
        if phase == "calibration":
            result, stats = result
        out[phase] = result
        # the learner resets the peak per pass (its own figures): the phase's peak is the largest of them
        out["peak_gib"][phase] = max(result["peak_gib"].values()) if phase == "learner" else dev.peak_gib()
        log.info("%s %s: %.1f s %s", name, phase, time.perf_counter() - t, json.dumps(result))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="1b,8b", help=f"comma-separated shapes: {', '.join(SHAPES)}")
    ap.add_argument("--small", action="store_true",
                    help="one scaled-down Llama-3 shape, fp32, on CPU, small sizes (a smoke run of seconds)")
    for f, default in Sizes()._asdict().items():
        ap.add_argument(f"--{f.replace('_', '-')}", type=int, default=None, help=f"default {default} (--small: "
                        f"{getattr(SMALL_SIZES, f)})")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap


# The smallest run: tests/test_benchmarks.py runs it (make test), so this benchmark cannot rot without a GPU.
SMOKE = ["--small", "--threads", "1"]


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = SMALL_SIZES if args.small else Sizes()
    sizes = Sizes(**{f: getattr(args, f) if getattr(args, f) is not None else v for f, v in base._asdict().items()})
    bad = [f for f, v in sizes._asdict().items() if v < 1]
    if bad:
        raise SystemExit(f"gpu.py: {', '.join('--' + f.replace('_', '-') for f in bad)} must be >= 1")
    if args.small:
        models = [SMALL]
        device = torch.device("cpu")
    else:
        keys = [k.strip() for k in args.models.split(",") if k.strip()]
        unknown = [k for k in keys if k not in SHAPES]
        if unknown or not keys:
            raise SystemExit(f"gpu.py --models: unknown shape(s) {unknown or keys} (known: {', '.join(SHAPES)})")
        models = [SHAPES[k] for k in keys]
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            log.warning("no GPU: the full shapes on CPU in fp32 take long and need ~10x the weights in memory; "
                        "--small is the CPU smoke run")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dev = Device(device)
    bandwidth = dev.bandwidth(sizes.copy_mib)
    log.info("device %s, copy bandwidth %.1f GB/s", device, bandwidth / 1e9)
    out: dict = {"benchmark": "gpu", "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if dev.cuda else "cpu",
                 "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
                 "torch": torch.__version__, "small": args.small, "sizes": sizes._asdict(),
                 "bandwidth_gb_s": round(bandwidth / 1e9, 2), "models": {}}
    for name, shape in models:
        try:
            out["models"][name] = run_model(name, shape, dev, dtype, sizes, bandwidth)
        except torch.cuda.OutOfMemoryError as err:  # keep the other shapes' figures
            log.error("%s: out of memory: %s", name, err)
            out["models"][name] = {"error": f"out of memory: {str(err).splitlines()[0]}"}
        gc.collect()
        if dev.cuda:
            torch.cuda.empty_cache()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
