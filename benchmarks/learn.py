"""Learned-mask throughput on the default model; prints ONE JSON line.

For one persona (the first of ../shared/data/persona-pruner-eval when present, else the
built-in catalog's first), with the default `LearnConfig` except ``--steps``:

* ``data_s``: generating the training data (dense model, description as system prompt);
  ``stats_s``: its statistics (the scores' training-free start); ``prepare_s``: teacher
  targets for the examples and the general-text windows.
* ``steps_per_s``: learner optimiser steps per second (median step time); ``s_per_persona``:
  data + stats + prepare + the default number of steps at that rate (measured parts summed,
  the step part extrapolated from ``--steps`` measured steps).
* ``learner_tokens_per_s`` against a plain forward+backward pass over the same batches:
  ``ratio_vs_plain`` against ``model(ids, labels=ids).loss.backward()`` with the weights
  trainable (a fine-tuning step without the optimiser), ``ratio_vs_frozen`` against the
  same forward with frozen weights and the backward only to the input embeddings (the least
  a mask learner must compute). Target ratio >= 0.8. Steps of the three kinds interleave
  (median of each), so background load hits all three alike.
* ``--gpu-shape llama-3.2-1b``: a random-weight model with Llama-3.2-1B's shape instead (on
  the GPU when there is one; speed only), and ``personas_per_hour``.

    python benchmarks/learn.py [--model smollm2-135m] [--steps 4] [--examples 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.calib.recorder import calibrate  # noqa: E402
from persona_core.calib.texts import render_samples  # noqa: E402
from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.learn.config import DataConfig, LearnConfig  # noqa: E402
from persona_core.learn.data import general_text, general_windows, generate_training_data  # noqa: E402
from persona_core.learn.distill import pad_sequences, prepare_examples, prepare_general  # noqa: E402
from persona_core.learn.learner import MaskLearner, initial_scores  # noqa: E402
from persona_core.eval.metrics import heldout_questions  # noqa: E402
from persona_core.eval.config import EvalConfig  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL, LoadedModel, load_model  # noqa: E402
from persona_core.models.tiny import byte_tokenizer  # noqa: E402

log = logging.getLogger("bench.learn")
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "persona-pruner-eval")
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                tie_word_embeddings=True, rope_theta=500000.0)


def random_llama_1b(device: str) -> LoadedModel:
    """Llama-3.2-1B's shape with random weights (speed only) and the byte tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id))
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model.to(dtype).eval().requires_grad_(False)
    return LoadedModel("random-llama-3.2-1b", "random-llama-3.2-1b", model, tok, "random")


def plain_step(loaded: LoadedModel, seqs, pad: int, trainable: bool) -> None:
    model = loaded.model
    ids, att = pad_sequences(seqs, pad, loaded.device)
    labels = ids.masked_fill(att == 0, -100)
    if trainable:
        out = model(input_ids=ids, attention_mask=att, labels=labels, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, attention_mask=att, labels=labels, use_cache=False)
    (grad,) = torch.autograd.grad(out.loss, emb)


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--steps", "1", "--examples", "2", "--max-new-tokens", "8", "--threads", "1"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--gpu-shape", choices=["llama-3.2-1b"], default=None)
    ap.add_argument("--steps", type=int, default=4, help="learner steps measured")
    ap.add_argument("--examples", type=int, default=8, help="training examples generated")
    ap.add_argument("--max-new-tokens", type=int, default=DataConfig.max_new_tokens)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    catalog = load_catalog(SHARED if os.path.isdir(SHARED) else "builtin")
    persona = next(iter(catalog))
    if args.gpu_shape:
        loaded = random_llama_1b(device)
    else:
        loaded = load_model(args.model, device=device)
    config = LearnConfig(steps=args.steps)
    data = DataConfig(examples=args.examples, max_new_tokens=args.max_new_tokens)
    held_out = heldout_questions(EvalConfig(max_questions=10_000), persona)

    t0 = time.perf_counter()
    samples = generate_training_data(loaded, persona, data, held_out)
    t1 = time.perf_counter()
    log.info("training data: %d examples in %.1f s", len(samples), t1 - t0)
    stats = calibrate(loaded, render_samples(loaded, persona, samples, CalibConfig()), CalibConfig())
    stats = {k: v.to("cpu") for k, v in stats.items()}
    t2 = time.perf_counter()
    examples = prepare_examples(loaded, persona, samples, config)
    general = prepare_general(loaded, general_windows(loaded.tokenizer, config.general_windows,
                                                      config.general_window), config)
    scores, tiebreak = initial_scores(loaded, [stats], config)
    t3 = time.perf_counter()
    log.info("stats %.1f s, teacher targets %.1f s", t2 - t1, t3 - t2)

    learner = MaskLearner(loaded, examples, general, scores, tiebreak, config)
    pad = learner.pad
    times = {"learner": [], "plain": [], "frozen": []}
    tokens = []

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    with learner.gate:
        for step in range(args.steps + 1):  # step 0 warms up every path
            persona_b, general_b = learner.batch(step)
            seqs = [e.ids for e in persona_b] + [e.ids for e in general_b]
            tokens.append(sum(len(s) for s in seqs))
            sync()
            a = time.perf_counter()
            learner.step()
            sync()
            b = time.perf_counter()
            learner.gate.values = None
            for p in loaded.model.parameters():
                p.requires_grad_(True)
            plain_step(loaded, seqs, pad, trainable=True)
            for p in loaded.model.parameters():
                p.requires_grad_(False)
            sync()
            c = time.perf_counter()
            plain_step(loaded, seqs, pad, trainable=False)
            sync()
            d = time.perf_counter()
            log.info("step %d: %d tokens, learner %.1f s, plain %.1f s, frozen %.1f s", step, tokens[-1], b - a,
                     c - b, d - c)
            if step:
                times["learner"].append(b - a)
                times["plain"].append(c - b)
                times["frozen"].append(d - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = statistics.median(tokens[1:])
    steps_per_s = 1.0 / med["learner"]
    default_steps = LearnConfig().steps
    s_per_persona = (t1 - t0) + (t2 - t1) + (t3 - t2) + default_steps / steps_per_s
    out = {
        "benchmark": "learn", "model": loaded.key, "device": device, "threads": args.threads if device == "cpu" else None,
        "persona": persona.id, "examples": len(samples), "steps_measured": args.steps,
        "default_steps": default_steps, "batch_size": config.batch_size, "general_batch": config.general_batch,
        "tokens_per_step": tok, "data_s": round(t1 - t0, 2), "stats_s": round(t2 - t1, 2),
        "prepare_s": round(t3 - t2, 2), "steps_per_s": round(steps_per_s, 4),
        "s_per_persona": round(s_per_persona, 1), "personas_per_hour": round(3600 / s_per_persona, 2),
        "learner_tokens_per_s": round(tok / med["learner"], 1),
        "plain_tokens_per_s": round(tok / med["plain"], 1), "frozen_tokens_per_s": round(tok / med["frozen"], 1),
        "ratio_vs_plain": round(med["plain"] / med["learner"], 3),
        "ratio_vs_frozen": round(med["frozen"] / med["learner"], 3),
        "general_text": general_text()[0],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
