"""What verification costs on a read: a whole mask of the default model, and a stats part.

Prints one JSON line:
* ``mask_read_s`` / ``mask_unverified_s``: `MaskFile.read()` of a 50% mask over every prunable
  linear module of the default model (header and payload digests, size bounds, the content digest
  of the decoded masks) against the same reader with the payload and content digest checks left
  out; best of ``--repeats``. ``mask_overhead`` is their ratio minus 1. ``delta_*``: the same for the opposing
  persona's mask delta-coded against it (its base is read and verified too). The two sides of
  each pair run alternately. Both readers check that the header names the owner its key names
  (issue 24 item 3); ``owner_check_s`` is that check alone. ``within_2x``: whether both verified
  reads stay within twice the unverified ones (issue 24's bound).
* ``part_read_s`` / ``part_unverified_s``: `stats.read_part` of one persona's statistics part
  (schema, owner and every column's digest) against a plain Parquet read of the same bytes.

    python benchmarks/verify.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from persona_core.masks.codec import MaskFile, owner_problem, unpack, write_mask  # noqa: E402
from persona_core.masks.inputs import LinearWeights  # noqa: E402
from persona_core.models.loading import DEFAULT_MODEL, load_model  # noqa: E402
from persona_core.calib.parts import read_part, write_stats  # noqa: E402
from persona_core.calib.stats import GroupStats, PersonaStats  # noqa: E402
from persona_core.store import layout  # noqa: E402
from persona_core.store.store import open_store, parquet_file  # noqa: E402


def best_pair(a, b, repeats: int) -> tuple[float, float]:
    """Best times of `a` and `b`, run alternately (a shared machine drifts between blocks of runs)."""
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(ta), min(tb)


class UnverifiedMaskFile(MaskFile):
    """The same reader with the payload and content digest checks left out (the baseline)."""

    def _raw(self, name: str) -> np.ndarray:
        start, end = self._entries[name]
        return np.frombuffer(self.store.fs.cat_file(self.store.path(self.key), start=self._offset + start,
                                                    end=self._offset + end), dtype=np.uint8)

    def read(self, names=None) -> dict:
        return {name: unpack(self.packed(name), self.shapes[name]) for name in (names or self.names)}


# The smallest run, on the tiny random model: tests/test_benchmarks.py runs it (make test), so a benchmark
# cannot rot unseen between studies.
SMOKE = ["--model", "tiny-random-llama", "--repeats", "1"]


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--repeats", type=int, default=5)
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(args.model, device="cpu")
    weights = LinearWeights.from_model(loaded)
    g = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(w.shape, generator=g) < 0.5 for name, w in weights.tensors.items()}
    other = {name: m ^ (torch.rand(m.shape, generator=g) < 0.05) for name, m in masks.items()}
    numel = sum(m.numel() for m in masks.values())
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(tmp)
        # keys as the store layout builds them (a persona's mask and its opposite's)
        a, b = (layout.mask(loaded.key, "bench", 0.5, who, calib="c") for who in ("introvert", "extrovert"))
        write_mask(store, a, masks, {"bench": "a"})
        write_mask(store, b, other, {"bench": "b"}, base_key=a)
        mask_read, mask_plain = best_pair(lambda: MaskFile(store, a).read(),
                                          lambda: UnverifiedMaskFile(store, a).read(), args.repeats)
        delta_read, delta_plain = best_pair(lambda: MaskFile(store, b).read(),
                                            lambda: UnverifiedMaskFile(store, b).read(), args.repeats)
        f = MaskFile(store, a)
        owner_check, _ = best_pair(lambda: owner_problem(a, f.header, f.metadata), lambda: None, args.repeats)

        groups = {}
        for grp in weights.groups:
            width = weights.tensors[grp.modules[0]].shape[1]
            r = lambda: torch.rand(width, generator=g, dtype=torch.float64)  # noqa: E731
            groups[(grp.layer, grp.name)] = GroupStats(1000, r(), r(), r(), 10, r(), r())
        key = write_stats(store, PersonaStats(loaded.key, "introvert", "p", groups, "c"))
        part_read, part_plain = best_pair(lambda: read_part(store, key),
                                          lambda: parquet_file(store.read_bytes(key)).read(), args.repeats)
    print(json.dumps({
        "benchmark": "verify", "model": loaded.key, "weights": numel, "mask_bytes": (numel + 7) // 8,
        "mask_read_s": round(mask_read, 4), "mask_unverified_s": round(mask_plain, 4),
        "mask_overhead": round(mask_read / mask_plain - 1, 3), "delta_read_s": round(delta_read, 4),
        "delta_unverified_s": round(delta_plain, 4), "owner_check_s": round(owner_check, 6),
        "within_2x": mask_read <= 2 * mask_plain and delta_read <= 2 * delta_plain,
        "part_rows": sum(x.width for x in groups.values()),
        "part_read_s": round(part_read, 4), "part_unverified_s": round(part_plain, 4),
        "part_overhead": round(part_read / part_plain - 1, 3), "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
