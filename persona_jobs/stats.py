"""`persona-jobs stats`: answer the common questions about stored activation statistics.

    persona-jobs stats list --store URL                       # what is stored: personas, parts, tokens
    persona-jobs stats show --store URL --persona introvert   # per layer and group: width, tokens, RMS
    persona-jobs stats diff --store URL introvert extrovert --layer 12 --group mlp_in --top 20
    persona-jobs stats generated --store URL --persona pirate # generated calibration texts (audit)
"""

from __future__ import annotations

import argparse
import json

import torch

from persona_core.store import layout
from persona_core.errors import UserError
from persona_jobs.common import add_store_arg
from persona_jobs.flags import id_arg
from persona_core.calib.parts import StatsError
from persona_core.calib.stats import EPS
from persona_core.calib.stored import list_parts, read_generated, read_persona_stats, stats_summary
from persona_core.store.store import open_store


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="inspect stored activation statistics", description=__doc__.splitlines()[0])
    ssub = p.add_subparsers(dest="stats_command", required=True, metavar="ACTION")

    def common(q: argparse.ArgumentParser) -> None:
        add_store_arg(q)
        q.add_argument("--model", default=None, help="model key (default: the only model in the store)")
        q.add_argument("--json", action="store_true", help="print JSON lines instead of a table")

    q = ssub.add_parser("list", help="personas with statistics: parts, shards, tokens, hashes")
    common(q)
    q.set_defaults(func=_list)

    q = ssub.add_parser("show", help="one persona's statistics per layer and group")
    common(q)
    q.add_argument("--persona", required=True, type=id_arg("persona id"), help="persona id")
    q.add_argument("--layer", type=int, default=None, help="only this layer (default: all)")
    q.set_defaults(func=_show)

    q = ssub.add_parser("diff", help="channels that differ most between two personas")
    common(q)
    q.add_argument("a", type=id_arg("persona id"), help="persona id")
    q.add_argument("b", type=id_arg("persona id"), help="the persona id to compare with")
    q.add_argument("--layer", type=int, required=True, help="layer index")
    q.add_argument("--group", default="mlp_in", help="attn_in, attn_out, mlp_in or mlp_out (default %(default)s)")
    q.add_argument("--top", type=int, default=20, help="channels shown (default %(default)s)")
    q.add_argument("--by", choices=("norm", "mean"), default="norm",
                   help="z-score of the per-sample norm (default) or of the raw mean")
    q.set_defaults(func=_diff)

    q = ssub.add_parser("generated", help="calibration texts generated for a persona (audit)")
    common(q)
    q.add_argument("--persona", required=True, type=id_arg("persona id"), help="persona id")
    q.set_defaults(func=_generated)


def _model(store, model: str | None) -> str:
    if model:
        return model
    models = sorted({layout.parse_stats_part(k).model_key for k in list_parts(store)})
    if not models:
        raise UserError(f"{store.uri('stats')}: no statistics stored")
    if len(models) > 1:
        raise UserError(f"several models in {store.uri('stats')}: pass --model, one of {', '.join(models)}")
    return models[0]


def _print(rows: list[dict], as_json: bool) -> None:
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    if not rows:
        print("(nothing)")
        return
    cols = list(rows[0])
    text = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for t in text:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())


def _read(store, model: str, persona: str):
    try:
        return read_persona_stats(store, model, persona)
    except (FileNotFoundError, StatsError) as err:
        raise UserError(str(err)) from None


def _list(args) -> int:
    store = open_store(args.store)
    try:
        rows = stats_summary(store, args.model)
    except StatsError as err:  # a corrupt or hostile part: one line naming it
        raise UserError(str(err)) from None
    _print(rows, args.json)
    return 0


def _show(args) -> int:
    store = open_store(args.store)
    stats = _read(store, _model(store, args.model), args.persona)
    rows = []
    for (layer, group), g in sorted(stats.groups.items()):
        if args.layer is not None and layer != args.layer:
            continue
        rms = g.rms
        rows.append({"layer": layer, "group": group, "width": g.width, "tokens": g.tokens, "samples": g.samples,
                     "rms_mean": round(float(rms.mean()), 5), "rms_max": round(float(rms.max()), 5),
                     "rms_argmax": int(rms.argmax())})
    _print(rows, args.json)
    return 0


def _diff(args) -> int:
    store = open_store(args.store)
    model = _model(store, args.model)
    key = (args.layer, args.group)
    a, b = _read(store, model, args.a), _read(store, model, args.b)
    if key not in a.groups or key not in b.groups:
        raise UserError(f"no group {args.group!r} at layer {args.layer} (groups: "
                        f"{', '.join(sorted({g for _, g in a.groups}))}; layers 0..{max(l for l, _ in a.groups)})")
    ga, gb = a[key], b[key]
    if args.by == "norm":
        z = (ga.norm_mean - gb.norm_mean) / torch.sqrt(ga.norm_var + gb.norm_var + EPS)
    else:
        z = (ga.mean - gb.mean) / torch.sqrt(ga.var + gb.var + EPS)
    top = torch.topk(z.abs(), min(args.top, z.numel())).indices.tolist()
    rows = [{"channel": c, "z": round(float(z[c]), 4),
             f"{args.by}_{args.a}": round(float((ga.norm_mean if args.by == "norm" else ga.mean)[c]), 5),
             f"{args.by}_{args.b}": round(float((gb.norm_mean if args.by == "norm" else gb.mean)[c]), 5)}
            for c in top]
    _print(rows, args.json)
    return 0


def _generated(args) -> int:
    store = open_store(args.store)
    try:
        samples = read_generated(store, _model(store, args.model), args.persona)
    except StatsError as err:
        raise UserError(str(err)) from None
    if args.json:
        _print(samples, True)
    else:
        for i, s in enumerate(samples, 1):
            print(f"[{i}] Q: {s['question']}\n    A: {s['answer']}")
        if not samples:
            print(f"persona {args.persona!r}: no generated texts stored")
    return 0
