"""Uniform against OWL layer allocation on the default model: what each costs in perplexity.

Prints one JSON line: held-out perplexity relative to the dense model (the project's own
held-out text, first ``--tokens`` tokens) for `wanda-general` at 50% and 60% and for the
introvert side of `contrastive-penalty` at 30% and 40%, each built with the uniform and
the OWL allocation, plus OWL's per-layer sparsities at 50%. Statistics are calibrated
here: the general reference set and both personas, ``--statements`` texts each.

    python benchmarks/allocation.py [--model smollm2-135m] [--statements 16] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.calib.recorder import calibrate_persona  # noqa: E402
from persona_core.catalog import reference_persona, heldout_text, load_catalog  # noqa: E402
from persona_core.eval.masked import MaskedModel  # noqa: E402
from persona_core.masks.allocation import owl_sparsities  # noqa: E402
from persona_core.masks.build import build_pair_masks  # noqa: E402
from persona_core.masks.inputs import LinearWeights  # noqa: E402
from persona_core.masks.spec import MaskSpec  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL, load_model  # noqa: E402

SETTINGS = (("wanda-general", 0.5), ("wanda-general", 0.6), ("contrastive-penalty", 0.3), ("contrastive-penalty", 0.4))


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--statements", "2", "--tokens", "64"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--statements", type=int, default=16, help="calibration texts per persona")
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens scored")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    t0 = time.time()
    loaded = load_model(args.model, device="cpu", dtype="float32")
    catalog = load_catalog("builtin")
    stats = {}
    for persona in (reference_persona(), catalog["introvert"], catalog["extrovert"]):
        capped = replace(persona, calibration=persona.calibration[:args.statements])
        stats[persona.id] = calibrate_persona(loaded, capped, CalibConfig(batch_size=8))[0]
    ids = loaded.tokenizer(heldout_text(), return_tensors="pt").input_ids[:, :args.tokens]

    @torch.inference_mode()
    def ppl() -> float:
        return math.exp(loaded.model(input_ids=ids, labels=ids).loss.item())

    dense = ppl()
    lw = LinearWeights.from_model(loaded)
    swap = MaskedModel(loaded.model)
    out: dict = {"benchmark": "allocation", "model": loaded.key, "tokens": int(ids.shape[1]),
                 "statements": args.statements, "dense_ppl": round(dense, 3)}
    for method, sparsity in SETTINGS:
        sides = [stats["general"]] if method == "wanda-general" else [stats["introvert"], stats["extrovert"]]
        for alloc in ("uniform", "owl"):
            masks = build_pair_masks(lw, *sides, spec=MaskSpec(method, sparsity, allocation=alloc))[0]
            with swap.masked(masks):
                out[f"{method}@{sparsity:g}/{alloc}"] = round(ppl() / dense, 3)
    out["owl_layer_sparsity@0.5"] = [round(s, 3) for s in owl_sparsities(lw, [stats["general"]], 0.5)]
    out["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
