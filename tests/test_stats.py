"""Stats Parquet: round trips (local, S3), merging, errors naming files, open_stats, the stats CLI."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest
import torch

from persona_jobs.cli import main as cli_main
from persona_core.calib.parts import StatsError, part_key, part_metadata, write_stats
from persona_core.calib.stats import GroupStats, PersonaStats, Shard
from persona_core.calib.stored import list_parts, open_stats, read_generated, read_persona_stats, stats_exist, stats_summary
from persona_core.store.store import open_store

MODEL = "toy-model-0123abcd"
WIDTHS = {"attn_in": 8, "attn_out": 8, "mlp_in": 8, "mlp_out": 16}


def fake_groups(seed: int, layers: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for name, w in WIDTHS.items():
            r = lambda: torch.rand(w, generator=g, dtype=torch.float64) * 10  # noqa: E731
            out[(layer, name)] = GroupStats(100 + seed, r() - 5, r(), r(), 4 + seed, r(), r())
    return out


def fake(persona: str, seed: int, persona_hash: str = "p1", calib_hash: str = "c1") -> PersonaStats:
    return PersonaStats(MODEL, persona, persona_hash, fake_groups(seed), calib_hash)


def assert_groups_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k].tokens, a[k].samples) == (b[k].tokens, b[k].samples)
        for f in ("sum", "sumsq", "sumabs", "norm_sum", "norm_sumsq"):
            torch.testing.assert_close(getattr(a[k], f), getattr(b[k], f), rtol=1e-12, atol=1e-12)


def roundtrip(url: str) -> None:
    store = open_store(url)
    a, b = fake("introvert", 1), fake("introvert", 2)
    k0 = write_stats(store, a, Shard(0, 2, 10), generated=[{"question": "Q1", "answer": "A1"}])
    k1 = write_stats(store, b, Shard(1, 2, 10), generated=[{"question": "Q2", "answer": "A2"}])
    assert k0 != k1 and k0 == part_key(MODEL, "introvert", "p1", "c1", Shard(0, 2, 10))
    assert k0.startswith(f"stats/model={MODEL}/persona=introvert/part-") and k0.endswith(".parquet")
    assert list_parts(store, MODEL, "introvert") == sorted([k0, k1])
    merged = read_persona_stats(store, MODEL, "introvert")
    assert (merged.persona_hash, merged.calib_hash) == ("p1", "c1")
    assert_groups_equal(merged.groups, a.merge(b).groups)
    assert stats_exist(store, MODEL, "introvert") and not stats_exist(store, MODEL, "extrovert")
    assert read_generated(store, MODEL, "introvert") == [{"question": "Q1", "answer": "A1"},
                                                         {"question": "Q2", "answer": "A2"}]
    assert part_metadata(store, k0)["persona_id"] == "introvert"


def test_roundtrip_local(tmp_path):
    roundtrip(str(tmp_path / "store"))


def test_roundtrip_s3(s3_url):
    roundtrip(s3_url)
    ds = open_stats(s3_url)
    assert ds.count_rows(filter=pads.field("persona") == "introvert") == 2 * 3 * sum(WIDTHS.values())


def test_write_is_idempotent(tmp_path):
    store = open_store(str(tmp_path))
    key = write_stats(store, fake("a", 1))
    before = store.read_bytes(key)
    assert write_stats(store, fake("a", 5)) == key  # same inputs' hashes: left as it is
    assert store.read_bytes(key) == before
    assert list_parts(store, MODEL, "a") == [key]


def test_corrupt_part_is_named(tmp_path):
    store = open_store(str(tmp_path))
    write_stats(store, fake("a", 1), Shard(0, 2, 5))
    bad = write_stats(store, fake("a", 2), Shard(1, 2, 5))
    store.write_bytes(bad, b"PAR1 not really parquet")
    with pytest.raises(StatsError, match=bad.rsplit("/", 1)[-1]):
        read_persona_stats(store, MODEL, "a")


def test_versions_and_missing_shards_are_errors(tmp_path):
    store = open_store(str(tmp_path))
    write_stats(store, fake("a", 1, persona_hash="old"))
    write_stats(store, fake("a", 2, persona_hash="new"), Shard(0, 2, 5))
    with pytest.raises(StatsError, match="different versions"):
        read_persona_stats(store, MODEL, "a")
    assert read_persona_stats(store, MODEL, "a", persona_hash="old").persona_hash == "old"
    with pytest.raises(StatsError, match="incomplete"):
        read_persona_stats(store, MODEL, "a", persona_hash="new")
    assert not stats_exist(store, MODEL, "a", persona_hash="new")
    with pytest.raises(FileNotFoundError, match="persona=b"):
        read_persona_stats(store, MODEL, "b")


def test_schema_and_sort_order(tmp_path):
    store = open_store(str(tmp_path))
    key = write_stats(store, fake("a", 1))
    table = store.read_parquet(key)
    assert table.schema.field("layer").type == pa.int16()
    assert pa.types.is_dictionary(table.schema.field("group").type)
    rows = list(zip(table.column("layer").to_pylist(), table.column("group").to_pylist(),
                    table.column("channel").to_pylist()))
    assert rows == sorted(rows) and len(rows) == 3 * sum(WIDTHS.values())


@pytest.fixture
def two_personas(tmp_path):
    store = open_store(str(tmp_path / "store"))
    for i, pid in enumerate(["introvert", "extrovert"]):
        write_stats(store, fake(pid, i + 1), Shard(0, 2, 5))
        write_stats(store, fake(pid, i + 3), Shard(1, 2, 5))
    return store


def test_open_stats_filters(two_personas):
    ds = open_stats(two_personas.url)
    assert {"model", "persona", "layer", "group", "channel", "sumsq"} <= set(ds.schema.names)
    f = ((pads.field("model") == MODEL) & (pads.field("persona") == "extrovert")
         & (pads.field("layer") == 2) & (pads.field("group") == "mlp_out"))
    t = ds.to_table(filter=f)
    assert t.num_rows == 2 * WIDTHS["mlp_out"]  # two shards
    assert set(t.column("persona").to_pylist()) == {"extrovert"}
    assert set(t.column("group").to_pylist()) == {"mlp_out"}
    assert open_stats(two_personas.uri("stats")).count_rows() == ds.count_rows()


def test_readme_query_top_channels(two_personas):
    """The documented first query (docs/calibration.md, pyarrow only) agrees with the tensors."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "calibration.md").read_text()
    block = text.split("```python run\n", 1)[1].split("```", 1)[0]
    query = block[block.index("# 1."):block.index("# 2.")]
    assert "(pads.field(\"layer\") == 12)" in query
    scope = {"ds": open_stats(two_personas.url), "pads": pads, "pc": pc, "pa": pa}
    exec(query.replace("(pads.field(\"layer\") == 12)", "(pads.field(\"layer\") == 1)"), scope)  # the toy model has 3 layers
    top = scope["top20"].slice(0, 5)["channel"].to_pylist()
    ia = read_persona_stats(two_personas, MODEL, "introvert")[(1, "mlp_in")]
    ea = read_persona_stats(two_personas, MODEL, "extrovert")[(1, "mlp_in")]
    assert top == torch.topk((ia.mean - ea.mean).abs(), 5).indices.tolist()


def test_summary_and_cli(two_personas, capsys):
    rows = stats_summary(two_personas)
    assert [(r["persona"], r["parts"], r["shards"], r["tokens"]) for r in rows] == [
        ("extrovert", 2, 2, 102 + 104), ("introvert", 2, 2, 101 + 103)]
    url = two_personas.url
    assert cli_main(["stats", "list", "--store", url, "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["persona"] for r in listed] == ["extrovert", "introvert"]
    assert cli_main(["stats", "show", "--store", url, "--persona", "introvert", "--layer", "0", "--json"]) == 0
    shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["layer"], r["group"], r["width"]) for r in shown] == [(0, g, w) for g, w in WIDTHS.items()]
    assert cli_main(["stats", "diff", "--store", url, "introvert", "extrovert", "--layer", "1", "--top", "3",
                     "--json"]) == 0
    diff = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(diff) == 3 and abs(diff[0]["z"]) >= abs(diff[-1]["z"])
    assert cli_main(["stats", "show", "--store", url, "--persona", "nobody"]) == 2
    assert "persona=nobody" in capsys.readouterr().err


# ---------------------------------------------------------------------------- verification (issue 12, items 3, 5)


def _rewrite_part(store, key, change):
    """Rewrite a part through pyarrow with `change(table) -> table` (a valid Parquet file)."""
    import pyarrow.parquet as pq

    table = pq.read_table(pa.BufferReader(store.read_bytes(key)))
    store.write_parquet(key, change(table))


def _set_column(table, name, values):
    return table.set_column(table.schema.get_field_index(name), table.schema.field(name), values)


def test_valid_parquet_with_the_wrong_schema_is_refused(tmp_path):
    store = open_store(str(tmp_path))
    key = write_stats(store, fake("introvert", 1))
    # same columns, one type changed (float64 -> float32): a valid Parquet file, the wrong schema
    _rewrite_part(store, key, lambda t: t.set_column(t.schema.get_field_index("sum"), pa.field("sum", pa.float32()),
                                                     pc.cast(t.column("sum"), pa.float32())))
    with pytest.raises(StatsError, match=r"column sum is float.*expected double.*--repair"):
        read_persona_stats(store, MODEL, "introvert")
    assert not stats_exist(store, MODEL, "introvert")
    with pytest.raises(StatsError, match="column sum"):
        part_metadata(store, key)
    _rewrite_part(store, key, lambda t: t.append_column("extra", pa.array([1] * t.num_rows)))
    with pytest.raises(StatsError, match="unexpected column"):
        stats_summary(store)


def test_changed_values_fail_the_column_digest(tmp_path):
    store = open_store(str(tmp_path))
    key = write_stats(store, fake("introvert", 1))

    def bump(t):  # one value changed, metadata (with the digests) kept as written
        vals = t.column("sumsq").to_numpy().copy()
        vals[7] += 1.0
        return _set_column(t, "sumsq", pa.array(vals))

    _rewrite_part(store, key, bump)
    with pytest.raises(StatsError, match="sumsq fail their digest"):
        read_persona_stats(store, MODEL, "introvert")
    stats_summary(store)  # reads other columns only: those verify; sumsq is never used there


def test_part_in_another_personas_folder_is_refused(tmp_path):
    store = open_store(str(tmp_path))
    key = write_stats(store, fake("introvert", 1))
    moved = key.replace("persona=introvert", "persona=extrovert")
    store.write_bytes(moved, store.read_bytes(key))
    with pytest.raises(StatsError, match="persona_id 'introvert', stored under persona=extrovert"):
        read_persona_stats(store, MODEL, "extrovert")


def test_part_without_digests_is_unverifiable(tmp_path):
    store = open_store(str(tmp_path))
    key = write_stats(store, fake("introvert", 1))

    def strip(t):
        meta = {k: v for k, v in t.schema.metadata.items() if k != b"persona.column_digests"}
        return t.replace_schema_metadata(meta)

    _rewrite_part(store, key, strip)
    with pytest.raises(StatsError, match="without column digests"):
        read_persona_stats(store, MODEL, "introvert")


def test_column_digest_ignores_chunking_and_dictionary_width():
    from persona_core.calib.parts import column_digest

    a = pa.array(["x", "y", "x", "z"])
    d8 = pa.DictionaryArray.from_arrays(pa.array([0, 1, 0, 2], pa.int8()), ["x", "y", "z"])
    d32 = pa.DictionaryArray.from_arrays(pa.array([1, 2, 1, 0], pa.int32()), ["z", "x", "y"])
    chunked = pa.chunked_array([a.slice(0, 1), a.slice(1)])
    assert column_digest(a) == column_digest(d8) == column_digest(d32) == column_digest(chunked)
    assert column_digest(a) != column_digest(pa.array(["x", "y", "z", "x"]))
    assert column_digest(pa.array([1.0, 2.0])) != column_digest(pa.array([1.0, 2.5]))


@pytest.mark.slow  # 12 CLI processes
def test_stats_list_exits_cleanly_every_time(tmp_path):
    """Issue 12 item 10: `stats list` aborted at exit ~1 run in 3 (`terminate called without an
    active exception`, exit 134): an Arrow pool thread dropped the last reference to a
    Python-owned input buffer after the interpreter began to finalize. Run it many times."""
    import os
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor

    store = open_store(str(tmp_path / "store"))
    widths = {"attn_in": 576, "attn_out": 576, "mlp_in": 576, "mlp_out": 1536}  # the default model's
    g = torch.Generator().manual_seed(0)
    for persona in ("introvert", "extrovert"):
        for i in range(4):
            groups = {(layer, n): GroupStats(100, *(torch.rand(w, generator=g, dtype=torch.float64) for _ in range(3)),
                                             4, *(torch.rand(w, generator=g, dtype=torch.float64) for _ in range(2)))
                      for layer in range(8) for n, w in widths.items()}
            write_stats(store, PersonaStats(MODEL, persona, "p1", groups, "c1"), Shard(i, 4, 10))
    cmd = [sys.executable, "-m", "persona_jobs", "stats", "list", "--store", store.url]
    env = {**os.environ, "PERSONA_PROGRESS": "0"}

    def once(_):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)

    with ThreadPoolExecutor(2) as pool:  # old code: ~1 run in 5 aborted with these parts
        done = list(pool.map(once, range(12)))
    bad = [(d.returncode, d.stderr[-300:]) for d in done if d.returncode != 0 or "terminate called" in d.stderr]
    assert not bad, f"{len(bad)} of {len(done)} runs failed: {bad[:2]}"
    assert all("introvert" in d.stdout and "extrovert" in d.stdout for d in done)


def test_open_stats_refuses_a_part_with_the_wrong_schema(two_personas):
    store = two_personas
    key = list_parts(store, MODEL, "introvert")[0]
    _rewrite_part(store, key, lambda t: t.drop_columns(["norm_sumsq"]))
    with pytest.raises(StatsError, match=r"part-.*missing column norm_sumsq"):
        open_stats(store.url)
    with pytest.raises(StatsError, match="missing column norm_sumsq"):
        open_stats(store.uri("stats"))
    store.write_bytes(key, b"not parquet at all")
    with pytest.raises(StatsError, match="no Parquet footer"):
        open_stats(store.url)
