"""Issue 24, second trust pass: hostile inputs are refused before they cost anything.

Findings 2 (credentials in a store URL), 7 (YAML alias bombs), 8 (Parquet decompression bombs),
10 (a budget with the default baselines) and the rough edges of 11 (ids on the command line, a
read-only store for standalone `evaluate`, a corrupt part in `stats list`, a missing bucket,
every problem of an `options` section). Each test is the issue's reproduction, scaled down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from persona_core.calib.parts import SCHEMA, verify_part, write_stats
from persona_core.calib.stats import GroupStats, PersonaStats, Shard
from persona_core.catalog import CatalogError, load_catalog
from persona_core.run.config import ConfigError, parse_config
from persona_core.store import layout
from persona_core.store.store import StoreError, open_store
from persona_jobs.cli import main as cli_main

MODEL = "toy-model-0123abcd"
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and everything printed (argparse errors exit through SystemExit)."""
    try:
        code = cli_main(argv)
    except SystemExit as done:
        code = done.code
    out = capsys.readouterr()
    return code, out.out + out.err


# ---------------------------------------------------------------------------- 2: credentials in a store URL


def test_store_url_with_credentials_is_refused_and_never_echoed(capsys):
    code, text = run_cli(["stats", "list", "--store", f"s3://{ACCESS_KEY}:{SECRET}@bucket/x"], capsys)
    assert code == 2
    assert ACCESS_KEY not in text and "wJal" not in text and "K7MD" not in text and "EXAMPLEKEY" not in text
    assert "AWS_ACCESS_KEY_ID" in text and "AWS_PROFILE" in text  # says where credentials go instead
    assert "Traceback" not in text


def test_config_store_with_credentials_is_refused_and_never_echoed():
    with pytest.raises(ConfigError) as err:
        parse_config(f"store: s3://{ACCESS_KEY}:{SECRET}@bucket/prefix\n", "x.yaml")
    text = str(err.value)
    assert text.startswith("x.yaml:1: store: ") and "AWS_ACCESS_KEY_ID" in text
    assert ACCESS_KEY not in text and "wJal" not in text and "EXAMPLEKEY" not in text


def test_catalog_url_with_credentials_is_refused_and_never_echoed(capsys):
    url = f"s3://{ACCESS_KEY}:{SECRET}@bucket/catalog.yaml"
    with pytest.raises(ConfigError) as err:
        parse_config(f"catalog: {url}\n", "x.yaml")
    assert "x.yaml:1: catalog: catalog URL s3://***@bucket/" in str(err.value)
    code, text = run_cli(["catalog", "validate", url], capsys)
    assert code == 2 and "AWS_ACCESS_KEY_ID" in text
    for shown in (str(err.value), text):
        assert ACCESS_KEY not in shown and "wJal" not in shown and "EXAMPLEKEY" not in shown


def test_store_refuses_credentials_whoever_opens_it():
    with pytest.raises(StoreError) as err:
        open_store(f"s3://{ACCESS_KEY}:{SECRET}@bucket/x").list("stats")
    assert ACCESS_KEY not in str(err.value) and "wJal" not in str(err.value)
    assert parse_config("store: s3://bucket/a@b/c\n").store == "s3://bucket/a@b/c"  # an '@' in a prefix is fine


# ---------------------------------------------------------------------------- 7: YAML alias bombs


def alias_bomb(levels: int, width: int = 10, key: str = "a") -> str:
    """`levels` anchors, each a list of `width` aliases of the one before: width**levels leaves."""
    lines = [f"{key}0: &{key}0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"{key}{i}: &{key}{i} [" + ", ".join([f"*{key}{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_config_alias_bomb_is_refused_before_expanding():
    # 5 levels: 100,000 leaves (the 9 levels exhaust memory; old code expands these then
    # fails on the unknown keys, or never returns)
    text = "model: tiny-random-llama\nbomb:\n" + textwrap.indent(alias_bomb(5), "  ")
    with pytest.raises(ConfigError) as err:
        parse_config(text, "bomb.yaml")
    assert len(err.value.problems) == 1
    assert "bomb.yaml" in err.value.problems[0] and "alias" in err.value.problems[0]
    assert "unknown key" not in str(err.value)


def test_config_alias_bomb_of_nine_levels_is_cheap():
    """The issue's 515-byte, nine-level bomb: refused in well under a second, without memory growth."""
    script = textwrap.dedent(f"""
        import resource, time
        from persona_core.run.config import ConfigError, parse_config
        text = {alias_bomb(9)!r}
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            parse_config(text, "bomb.yaml")
        except ConfigError as err:
            print("refused", "alias" in str(err))
        print("grew_kb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "refused True" in out.stdout, out.stdout + out.stderr[-2000:]
    grew = int(out.stdout.split("grew_kb")[1].split()[0])
    assert grew < 50_000, f"config loading grew by {grew} KB"


def test_recursive_alias_and_deep_nesting_are_config_errors():
    with pytest.raises(ConfigError, match="alias"):
        parse_config("model: &m [*m]\n", "r.yaml")
    deep = "model: " + "[" * 5000 + "]" * 5000 + "\n"
    with pytest.raises(ConfigError, match="nested"):
        parse_config(deep, "d.yaml")


def test_a_few_aliases_still_work():
    text = "personas: &p [introvert]\nmasks:\n  methods: [wanda]\n  baselines: *p\n"
    with pytest.raises(ConfigError, match="unknown method 'introvert'"):  # expanded as written, then validated
        parse_config(text)


CATALOG = """\
format: persona-catalog/v1
name: {name}
personas:
  - id: a
    description: A.
    opposite: b
    statements: [one, two, three, four]
  - id: b
    description: B.
    opposite: a
    statements: [uno, dos, tres, cuatro]
"""


def test_catalog_alias_bomb_is_refused(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(6, key="n") + CATALOG.format(name="*n5"))
    with pytest.raises(CatalogError) as err:
        load_catalog(str(path))
    assert any("alias" in p for p in err.value.problems)
    code, text = run_cli(["catalog", "show", str(path)], capsys)
    assert code == 1 and "alias" in text and len(text) < 2000


@pytest.mark.parametrize("name", ["[a, b]", "{x: 1}", "42", "''", "'" + "n" * 300 + "'"])
def test_catalog_name_must_be_a_short_string(tmp_path, name):
    path = tmp_path / "cat.yaml"
    path.write_text(CATALOG.format(name=name))
    with pytest.raises(CatalogError, match=r"cat.yaml:2: field 'name'"):
        load_catalog(str(path))


def test_catalog_name_is_kept(tmp_path):
    path = tmp_path / "cat.yaml"
    path.write_text(CATALOG.format(name="my-personas"))
    assert load_catalog(str(path)).name == "my-personas"


# ---------------------------------------------------------------------------- 8: Parquet decompression bombs


def write_bomb(store, persona: str = "introvert", rows: int = 2_000_000) -> str:
    """A stats part with the right schema and metadata whose footer says `rows` rows: constant
    columns, so the file stays small (a few hundred KB) while its rows take hundreds of MB."""
    key = layout.stats_part(MODEL, persona, "0123456789abcdef")
    path = store.path(key)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"model_key": MODEL, "persona_id": persona, "persona_hash": "p1", "calib_hash": "c1",
            "code_version": "x", "shard": json.dumps({"index": 0, "count": 1, "size": 1}),
            "column_digests": "{}"}
    schema = SCHEMA.with_metadata({f"persona.{k}": v for k, v in meta.items()})
    batch = 200_000
    cols = {}
    for f in SCHEMA:
        if pa.types.is_dictionary(f.type):
            cols[f.name] = pa.DictionaryArray.from_arrays(pa.array([0] * batch, pa.int8()), ["v"])
        else:
            cols[f.name] = pa.array([0] * batch, f.type)
    chunk = pa.Table.from_pydict(cols, schema=schema)
    with pq.ParquetWriter(path, schema, compression="zstd") as w:
        for _ in range(rows // batch):
            w.write_table(chunk)
    return key


def measured(script: str) -> dict:
    """Run `script` in a fresh interpreter; it prints one JSON line of measurements last."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd(), "PERSONA_PROGRESS": "0"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_stats_part_bomb_is_refused_from_its_footer(tmp_path):
    store = open_store(str(tmp_path / "store"))
    key = write_bomb(store)
    assert os.path.getsize(store.path(key)) < 1_000_000
    got = measured(f"""
        import json, resource
        import pyarrow as pa
        from persona_core.calib.parts import StatsError, verify_part
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            verify_part({store.url!r}, {key!r})
            error = None
        except StatsError as err:
            error = str(err)
        print(json.dumps({{"error": error, "arrow_peak": pa.default_memory_pool().max_memory(),
                          "rss_grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
    """)
    assert got["error"] and "rows" in got["error"] and "--repair" in got["error"]
    assert got["arrow_peak"] < 8 << 20, got  # old code: the whole 2 M rows, about 150 MB
    assert got["rss_grew_kb"] < 64_000, got


def test_stats_list_refuses_a_bomb_in_one_line(tmp_path):
    store = open_store(str(tmp_path / "store"))
    key = write_bomb(store)
    got = measured(f"""
        import contextlib, io, json, resource
        import pyarrow as pa
        from persona_jobs.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["stats", "list", "--store", {store.url!r}])
        print(json.dumps({{"code": code, "err": err.getvalue(), "arrow_peak": pa.default_memory_pool().max_memory()}}))
    """)
    assert got["code"] == 2 and "Traceback" not in got["err"]
    assert got["err"].count("\n") == 1 and key.rsplit("/", 1)[-1] in got["err"]
    assert got["arrow_peak"] < 8 << 20, got


def test_real_parts_pass_the_row_bound(tmp_path):
    """The bound is far from real parts: the default model's widths, 30 layers, one part."""
    import torch

    store = open_store(str(tmp_path / "store"))
    widths = {"attn_in": 576, "attn_out": 576, "mlp_in": 576, "mlp_out": 1536}
    g = torch.Generator().manual_seed(0)
    groups = {(layer, n): GroupStats(100, *(torch.rand(w, generator=g, dtype=torch.float64) for _ in range(3)),
                                     4, *(torch.rand(w, generator=g, dtype=torch.float64) for _ in range(2)))
              for layer in range(30) for n, w in widths.items()}
    key = write_stats(store, PersonaStats(MODEL, "introvert", "p1", groups, "c1"), Shard(0, 1, 10))
    verify_part(store, key)


# ---------------------------------------------------------------------------- 10: a budget with the default baselines


@pytest.mark.slow  # a budget search on the tiny model: about 40 s
def test_budget_with_the_default_baselines_builds_them(calibrated_store, budget_text, tiny):
    """`masks.budget` and no `masks.baselines`: magnitude (no statistics, no strength) gets a budgeted
    sparsity like every other method, instead of `IndexError: tuple index out of range`."""
    from persona_core.masks.inputs import LinearWeights
    from persona_core.masks.codec import read_mask
    from persona_core.run.plan import Selection, make_plan
    from persona_jobs.build_masks import BudgetBuilder, plan_units
    from persona_jobs.flags import load

    store = calibrated_store
    budget = {"perplexity_ratio": 1.3, "steps": 3, "ppl_windows": 1, "ppl_window": 32, "ppl_text": str(budget_text)}
    overrides = {"model": "tiny-random-llama", "store": store.url, "masks.methods": ["wanda"],
                 "masks.budget": budget, "evaluate.enabled": False}
    plan = make_plan(load(None, overrides), Selection(personas=("introvert", "extrovert")))
    assert plan.config.masks.baselines == ["magnitude", "wanda-general"]  # the defaults
    units, catalog = plan_units(plan)
    baselines = [u for u in units if u.spec.method in ("magnitude", "wanda-general")]
    assert {u.spec.method for u in baselines} == {"magnitude", "wanda-general"}
    weights = LinearWeights.from_model(tiny)
    weights = LinearWeights(weights.groups, {k: v.clone() for k, v in weights.tensors.items()})
    builder = BudgetBuilder("tiny-random-llama", weights, "cpu")
    for unit in baselines:
        written = builder.build(store, plan.model_key, unit, {}, {p.id: p for p in catalog})
        masks, meta = read_mask(store, written[0][0])
        assert meta["budget"]["perplexity_ratio"] == 1.3 and meta["budget_search"]["search"]["points"]


# ---------------------------------------------------------------------------- 11: rough edges


@pytest.mark.parametrize("argv", [
    ["evaluate", "--run-id", "_latest"],
    ["evaluate", "--run-id", "../x"],
    ["stats", "show", "--persona", "../introvert"],
    ["stats", "generated", "--persona", ".hidden"],
    ["stats", "diff", "introvert", "a/b", "--layer", "0"],
])
def test_invalid_ids_on_the_command_line_are_one_line_errors(argv, tmp_path, capsys):
    code, text = run_cli([*argv, "--store", str(tmp_path / "store")], capsys)
    assert code == 2 and "Traceback" not in text
    last = text.strip().splitlines()[-1]  # argparse: the usage, then one error line
    assert "error: argument" in last and "not a valid identifier" in last
    assert not (tmp_path / "store").exists()


def test_standalone_evaluate_on_a_read_only_store_fails_before_any_work(tmp_path, capsys, monkeypatch):
    from persona_jobs import evaluate

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder would go: unwritable, even for root")
    monkeypatch.setattr(evaluate, "run", lambda plan: pytest.fail("evaluation started on a read-only store"))
    code, text = run_cli(["evaluate", "--model", "tiny-random-llama", "--store", str(blocker / "store")], capsys)
    assert code == 2 and "cannot be written" in text and "Traceback" not in text


def test_stats_list_with_a_corrupt_part_is_one_line(tmp_path, capsys):
    from tests.test_stats import fake

    store = open_store(str(tmp_path / "store"))
    key = write_stats(store, fake("introvert", 1))
    path = store.path(key)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    code, text = run_cli(["stats", "list", "--store", store.url], capsys)
    assert code == 2 and "Traceback" not in text
    assert text.startswith("error: ") and text.count("\n") == 1 and key.rsplit("/", 1)[-1] in text
    assert "--repair" in text


def test_missing_bucket_is_an_error_not_an_empty_store(s3_url, capsys):
    missing = s3_url.replace("s3://test-", "s3://missing-", 1)
    code, text = run_cli(["stats", "list", "--store", missing], capsys)
    assert code == 2 and "Traceback" not in text
    assert "bucket" in text and "does not exist" in text and "missing-" in text
    code, text = run_cli(["stats", "list", "--store", s3_url], capsys)  # an existing empty bucket: empty
    assert code == 0 and "(nothing)" in text


def test_options_sections_report_every_problem():
    text = textwrap.dedent("""\
        calibrate:
          options:
            batch_size: 0
            max_length: 0
        evaluate:
          options:
            batch_size: 0
            max_statements: 0
        masks:
          options:
            params:
              wanda: {nope: 1}
              magnitude: {bad: 2}
        """)
    with pytest.raises(ConfigError) as err:
        parse_config(text, "o.yaml")
    problems = err.value.problems
    for wanted in ("o.yaml:3: calibrate.options.batch_size: ", "o.yaml:4: calibrate.options.max_length: ",
                   "o.yaml:7: evaluate.options.batch_size: ", "o.yaml:8: evaluate.options.max_statements: ",
                   "o.yaml:11: masks.options.params: wanda: unknown parameter 'nope' (it takes no parameters)",
                   "o.yaml:11: masks.options.params: magnitude: unknown parameter 'bad'"):
        assert any(wanted in p for p in problems), (wanted, problems)
