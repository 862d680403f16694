"""Cost of the statistics path over a plain forward pass (prints one JSON line).

The same pre-tokenised batches (builtin catalog statements, rendered as persona
replies) go through the decoder without hooks and through `StatsRecorder`
(hooks on every shared linear input). Runs are interleaved and the best of
`--repeats` is kept for each, which suits a noisy shared machine. `ratio` is
plain tokens/s over statistics tokens/s (target <= 1.10). Both run the decoder
body: the statistics path never computes logits, so comparing it with a forward
that includes the LM head would hide the hooks' cost.

    .venv/bin/python benchmarks/calibration.py [--model smollm2-135m] [--texts 64] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from persona_core.calib.config import CalibConfig  # noqa: E402
from persona_core.calib.recorder import StatsRecorder  # noqa: E402
from persona_core.calib.texts import batches, render_reply  # noqa: E402
from persona_core.catalog import load_catalog  # noqa: E402
from persona_core.models.layers import decoder_body  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL, load_model  # noqa: E402


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--texts", "4", "--batch-size", "2", "--max-length", "32", "--repeats", "1"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--texts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    config = CalibConfig(batch_size=args.batch_size, max_length=args.max_length)
    statements = [s for p in load_catalog("builtin") for s in p.calibration][: args.texts]
    texts = [render_reply(loaded.tokenizer, s, config) for s in statements]
    data = list(batches(loaded, texts, config))
    tokens = sum(int(m.sum()) for _, m in data)
    body = decoder_body(loaded.model)

    def sync():
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def plain(module) -> float:
        sync()
        t = time.perf_counter()
        for ids, mask in data:
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
            module(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
        sync()
        return time.perf_counter() - t

    def stats() -> float:
        with StatsRecorder(loaded) as rec:
            sync()
            t = time.perf_counter()
            for ids, mask in data:
                rec.run_batch(ids, mask)
            sync()
            return time.perf_counter() - t

    plain(body), stats()  # warm-up
    t_plain, t_stats = [], []
    for _ in range(args.repeats):
        t_plain.append(plain(body))
        t_stats.append(stats())
    plain_tps, stats_tps = tokens / min(t_plain), tokens / min(t_stats)
    print(json.dumps({
        "benchmark": "calibration", "model": loaded.key, "device": str(loaded.device),
        "dtype": str(next(loaded.model.parameters()).dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "texts": len(texts), "batches": len(data), "tokens": tokens,
        "plain_tokens_per_s": round(plain_tps, 1), "stats_tokens_per_s": round(stats_tps, 1),
        "ratio": round(plain_tps / stats_tps, 4), "target": 1.10,
    }))


if __name__ == "__main__":
    main()
