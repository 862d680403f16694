"""The capability-budget search: bisection against a full grid, unreachable budgets, the Budget knob."""

from __future__ import annotations

import math

import pytest

from persona_core.masks.budget import Budget, Setting, search

GRID = Budget(max_sparsity=0.5, steps=32).grid()


def rigged_ppl(slope: dict):
    """A monotone perplexity ratio per strength: 1 + slope * sparsity^2, counting calls."""
    calls = []

    def f(s: Setting) -> float:
        calls.append(s)
        return 1.0 + slope[s.strength] * s.sparsity ** 2

    return f, calls


@pytest.mark.parametrize("budget", [1.001, 1.02, 1.1, 1.3, 2.0])
@pytest.mark.parametrize("slope", [{None: 1.0}, {None: 7.0}, {None: 40.0}])
def test_bisection_finds_the_full_grid_point(budget, slope):
    f, calls = rigged_ppl(slope)
    fast = search(GRID, budget, f, lambda s: s.sparsity)
    n_fast = len(calls)
    full = search(GRID, budget, rigged_ppl(slope)[0], lambda s: s.sparsity, bisect=False)
    assert fast.within_budget == full.within_budget
    assert fast.chosen == full.chosen
    if fast.within_budget:
        # the largest feasible sparsity of the grid, and the next one is over the budget
        i = GRID.index(fast.chosen.sparsity)
        assert f(fast.chosen) <= budget
        assert i == len(GRID) - 1 or f(Setting(GRID[i + 1])) > budget
    assert n_fast <= math.ceil(math.log2(len(GRID))) + 2 < len(GRID)


@pytest.mark.parametrize("n", [1, 2, 5, 24])
def test_galloping_from_any_hint_finds_the_boundary(n):
    from persona_core.masks.budget import _largest_feasible

    settings = [Setting(float(i)) for i in range(n)]
    for boundary in range(-1, n):  # last feasible index (-1: none)
        for hint in [None, *range(n)]:
            calls = []

            def ok(s, b=boundary):
                calls.append(s)
                return s.sparsity <= b

            got = _largest_feasible(settings, ok, hint)
            assert (got if got is not None else -1) == boundary, (n, boundary, hint)
            if hint is not None and boundary in (hint, hint - 1) and 0 < boundary < n - 1:
                assert len(set(calls)) <= 2  # an unmoved boundary costs two evaluations


def test_strengths_pick_the_largest_separation_within_budget():
    slope = {1.0: 2.0, 4.0: 8.0, 16.0: 60.0}  # stronger contrast costs more perplexity per sparsity
    f, _ = rigged_ppl(slope)
    sep = lambda s: s.sparsity * {1.0: 1.0, 4.0: 3.0, 16.0: 4.0}[s.strength]  # noqa: E731
    res = search(GRID, 1.1, f, sep, strengths=(1.0, 4.0, 16.0), strength_name="lam")
    full = search(GRID, 1.1, rigged_ppl(slope)[0], sep, strengths=(1.0, 4.0, 16.0), strength_name="lam",
                  bisect=False)
    assert res.chosen == full.chosen
    assert res.within_budget
    # every strength's candidate got a separation; the chosen one is their maximum
    cands = [p for p in res.points if p.separation is not None]
    assert len(cands) == 3
    assert res.chosen_point.separation == max(p.separation for p in cands)
    assert res.chosen_point.perplexity_ratio <= 1.1
    d = res.to_dict()
    assert d["strength_name"] == "lam" and d["chosen"]["strength"] == res.chosen.strength
    assert len(d["points"]) == len(res.points) and all("perplexity_ratio" in p for p in d["points"])


def test_separation_ties_go_to_the_smaller_sparsity_then_the_earlier_strength():
    f, _ = rigged_ppl({1.0: 1.0, 2.0: 4.0})
    res = search(GRID, 1.05, f, lambda s: 0.25, strengths=(1.0, 2.0))
    sparsities = {p.setting.strength: p.setting.sparsity for p in res.points if p.separation is not None}
    assert res.chosen.sparsity == min(sparsities.values())
    res2 = search(GRID, 1.05, rigged_ppl({1.0: 1.0, 2.0: 1.0})[0], lambda s: 0.25, strengths=(2.0, 1.0))
    assert res2.chosen.strength == 2.0


def test_unreachable_budget_says_so_and_keeps_the_dense_most_setting(caplog):
    f = lambda s: 1.5 + s.sparsity  # noqa: E731  every setting costs more than the budget
    with caplog.at_level("WARNING"):
        res = search(GRID, 1.1, f, lambda s: 1.0, strengths=(1.0, 4.0), strength_name="lam")
    assert not res.within_budget
    assert res.chosen.sparsity == GRID[0]
    assert "unreachable" in res.message and "1.1" in res.message and "over budget" in res.message
    assert "unreachable" in caplog.text
    assert res.to_dict()["within_budget"] is False
    assert all(p.separation is None for p in res.points)  # nothing over budget is ever ranked


def test_a_ratio_function_taking_a_limit_gets_the_budget():
    seen = []

    def f(s: Setting, limit=None) -> float:
        seen.append(limit)
        return 1.0 + s.sparsity

    search(GRID, 1.2, f, None)
    assert seen and set(seen) == {1.2}


def test_nan_perplexity_counts_as_over_budget():
    f = lambda s: float("nan") if s.sparsity > 0.2 else 1.0  # noqa: E731
    res = search(GRID, 1.1, f, lambda s: s.sparsity)
    assert res.within_budget and res.chosen.sparsity <= 0.2
    assert res.chosen.sparsity == max(s for s in GRID if s <= 0.2)


def test_without_separation_the_largest_feasible_sparsity_wins():
    f, _ = rigged_ppl({None: 10.0})
    res = search(GRID, 1.1, f, None)
    assert res.chosen.sparsity == max(s for s in GRID if 1 + 10 * s * s <= 1.1)


def test_budget_knob_checks_and_hashes():
    assert Budget.from_value(None) is None
    assert Budget.from_value(1.2).perplexity_ratio == 1.2
    assert Budget.from_value({"perplexity_ratio": 1.05}).perplexity_ratio == 1.05
    assert Budget().hash == Budget(perplexity_ratio=1.1).hash != Budget(perplexity_ratio=1.2).hash
    assert Budget(strengths={"lam": [1, 2]}).hash != Budget().hash
    assert Budget().label == "ppl1.1"
    with pytest.raises(ValueError, match="perplexity_ratio must be a number >= 1"):
        Budget(perplexity_ratio=0.9)
    with pytest.raises(ValueError, match="unknown key.*perplexity"):
        Budget.from_value({"perplexity": 1.1})
    with pytest.raises(ValueError, match="test split"):
        Budget(ppl_text="../shared/data/wikitext-2/test.txt")
    with pytest.raises(ValueError, match="steps must be an integer"):
        Budget(steps=0)
    grid = Budget(min_sparsity=0.01, max_sparsity=0.4, steps=3).grid()
    assert grid == (0.01, 0.063246, 0.4)  # geometric: fine where budgets bind
    assert len(Budget().grid()) == 24 and Budget().grid()[0] == 0.005 and Budget().grid()[-1] == 0.5
    with pytest.raises(ValueError, match="strictly increasing"):
        search([0.2, 0.1], 1.1, lambda s: 1.0)


# ---------------------------------------------------------------------------- the real callables, tiny model


@pytest.fixture(scope="module")
def tiny_setup(pair_setup):
    return pair_setup  # tests/conftest.py: the tiny model, the introvert/extrovert pair, a WikiText-2 stand-in


def run_search(tiny_setup, monkeypatch, a=None, b=None, method="contrastive-penalty", **budget):
    from persona_core.masks.budgeted_build import PairSearch
    from persona_core.catalog import reference_persona
    from persona_core.masks.methods import METHODS
    from persona_core.masks.spec import MaskSpec

    ev, lw, a0, b0, stats, cc, folder = tiny_setup
    a, b = a or a0, b or b0
    monkeypatch.setenv("PERSONA_WIKITEXT2", str(folder))
    people = {"persona": a, "opposite": b, "general": reference_persona()}
    roles = [(r, people[r]) for r in METHODS[method].needs]
    b_ = Budget(**{"steps": 8, "ppl_windows": 2, "ppl_window": 32, "max_sparsity": 0.6, **budget})
    return PairSearch(ev, lw, MaskSpec(method, 0.1), b_, roles, [stats[p.id] for _, p in roles],
                      calib_config=cc).run()


def test_search_on_the_tiny_model_stays_within_budget(tiny_setup, monkeypatch):
    out = run_search(tiny_setup, monkeypatch, perplexity_ratio=1.05)
    res = out.result
    assert res.within_budget and res.strength_name == "lam"
    assert out.final_ratio <= 1.05
    assert all(p.perplexity_ratio > 1.05 for p in res.points if p.setting.strength == res.chosen.strength
               and p.setting.sparsity > res.chosen.sparsity)
    assert out.spec.sparsity == res.chosen.sparsity and out.spec.params["lam"] == res.chosen.strength
    assert len(out.masks) == 2 and set(out.masks[0]) == set(lw_names(tiny_setup))
    meta = out.metadata()
    assert meta["search"]["chosen"]["sparsity"] == res.chosen.sparsity and meta["search"]["points"]


def lw_names(tiny_setup):
    return tiny_setup[1].tensors


def test_search_never_reads_evaluation_statements_or_the_test_split(tiny_setup, monkeypatch):
    from dataclasses import replace

    ev, lw, a, b, stats, cc, folder = tiny_setup
    one = {"strengths": {"lam": [4.0]}}
    first = run_search(tiny_setup, monkeypatch, **one)
    # other evaluation statements and another test split: same choice, same figures
    (folder / "test.txt").write_text("other words entirely " * 300)
    pa = replace(a, evaluation=("I never go out.", "Crowds drain me."))
    pb = replace(b, evaluation=("Parties are the best.", "I talk to everyone."))
    second = run_search(tiny_setup, monkeypatch, pa, pb, **one)
    assert second.result.chosen == first.result.chosen
    assert second.result.to_dict() == first.result.to_dict()
    # the validation text does matter (the search reads it)
    (folder / "other-valid.txt").write_text("zq xv " * 3000)
    third = run_search(tiny_setup, monkeypatch, **one, ppl_text=str(folder / "other-valid.txt"))
    assert [p.perplexity_ratio for p in third.result.points] != [p.perplexity_ratio for p in first.result.points]


def test_unreachable_budget_on_the_tiny_model_keeps_the_dense_most_setting(tiny_setup, monkeypatch):
    from persona_core.masks.budgeted_build import PairSearch

    real = PairSearch._ratio
    monkeypatch.setattr(PairSearch, "_ratio", lambda self, masks, limit=None: 1.5 + real(self, masks))
    out = run_search(tiny_setup, monkeypatch, max_sparsity=0.9, steps=3, strengths={"lam": [4.0]})
    assert not out.result.within_budget
    assert "unreachable" in out.result.message
    assert out.spec.sparsity == Budget(max_sparsity=0.9, steps=3).grid()[0] and out.final_ratio > 1.5
    assert out.metadata()["search"]["within_budget"] is False


def test_config_knob_masks_budget():
    from persona_core.run.config import ConfigError, PipelineConfig, parse_config

    assert PipelineConfig().masks.budget is None  # today's fixed sparsities unless a budget is asked for
    cfg = parse_config("masks:\n  budget: {perplexity_ratio: 1.05, steps: 16}\n")
    assert Budget.from_value(cfg.masks.budget) == Budget(perplexity_ratio=1.05, steps=16)
    assert parse_config("masks:\n  budget: 1.2\n").masks.budget == 1.2
    with pytest.raises(ConfigError, match=r"x.yaml:3: masks.budget: expected null, a ratio or a budget mapping"):
        parse_config("masks:\n  methods: [wanda]\n  budget: {perplexity_ratio: 0.5}\n", "x.yaml")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) ratio"):
        parse_config("masks:\n  budget: {ratio: 1.1}\n")
    assert PipelineConfig().hash != parse_config("masks:\n  budget: 1.1\n").hash


def test_budgeted_channel_attribution_search_on_the_tiny_model(tiny_setup, monkeypatch):
    """contrastive-attribution under a budget: statistics with the mlp_attr group (validation statements
    held out of it too), ffn-channel masks, the chosen setting within the budget."""
    from dataclasses import replace

    from persona_core.masks.budgeted_build import PairSearch
    from persona_core.calib.attribution import ATTRIBUTION
    from persona_core.calib.recorder import calibrate_persona
    from persona_core.catalog import reference_persona
    from persona_core.masks.select import n_pruned
    from persona_core.masks.spec import MaskSpec

    ev, lw, a, b, _, cc, folder = tiny_setup
    cc = replace(cc, attribution=True)
    stats = [calibrate_persona(ev.loaded, p, cc)[0] for p in (a, b, reference_persona())]
    assert all((0, ATTRIBUTION) in s.groups for s in stats)
    monkeypatch.setenv("PERSONA_WIKITEXT2", str(folder))
    budget = Budget(steps=8, ppl_windows=2, ppl_window=32, max_sparsity=0.6, perplexity_ratio=1.05)
    roles = [("persona", a), ("opposite", b), ("general", reference_persona())]
    search = PairSearch(ev, lw, MaskSpec("contrastive-attribution", 0.1, "ffn-channels"), budget, roles, stats,
                        calib_config=cc)
    held = search.fit_stats[0].groups[(0, ATTRIBUTION)]
    assert held.tokens < stats[0].groups[(0, ATTRIBUTION)].tokens  # validation texts left the statistics
    out = search.run()
    assert out.result.within_budget and out.final_ratio <= 1.05 and out.result.strength_name == "lam"
    width = lw.tensors["model.layers.0.mlp.down_proj"].shape[1]
    dropped = (~out.masks[0]["model.layers.0.mlp.down_proj"].all(0)).sum()
    assert int(dropped) == n_pruned(width, out.spec.sparsity) and out.spec.granularity == "ffn-channels"
