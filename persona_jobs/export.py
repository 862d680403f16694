"""`persona-jobs export`: a persona's mask as a Hugging Face model folder (docs/using-masks.md).

    persona-jobs export --config configs/demo.yaml --persona introvert ./introvert-model
    persona-jobs export --config configs/demo.yaml --persona formal --method contrastive-penalty --sparsity 0.3 s3://b/m

The config names the store and the model (flags override them); the persona's mask is chosen
among those stored (`add_mask_args`: --method, --sparsity, --budget, --calib-hash, --mask-key;
shared with `generate`) and written by `persona_core.api.export_mask`: masked weights as
safetensors (smaller where the mask is structured), tokenizer and chat template, a model card
with what the results store measured, and a manifest written last. No Ray: one process.
"""

from __future__ import annotations

import argparse
import logging

from persona_core.api import export_mask, find_mask, read_mask
from persona_core.catalog import Persona, reference_persona
from persona_core.errors import UserError
from persona_core.models.loading import load_model
from persona_core.run.plan import Plan, Selection, make_plan
from persona_jobs.common import add_common
from persona_jobs.flags import load, where_overrides

log = logging.getLogger(__name__)


def add_mask_args(p: argparse.ArgumentParser) -> None:
    """--config, --store/--model/--catalog, --persona and the flags that pick one of its masks."""
    p.add_argument("--config", default=None,
                   help="YAML config naming the store, model and catalog (e.g. configs/demo.yaml); flags override it")
    add_common(p, catalog=True, address=False)
    p.add_argument("--persona", required=True, metavar="ID", help="the persona whose subnetwork to use")
    p.add_argument("--method", default=None, metavar="M",
                   help="mask method (a name or glob; default: the config's methods, else the only one stored)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--sparsity", type=float, default=None, metavar="S", help="the mask of this sparsity")
    level.add_argument("--budget", default=None, metavar="RATIO",
                       help="the budgeted mask of this perplexity budget (1.1 or ppl1.1)")
    p.add_argument("--calib-hash", default=None, metavar="HASH",
                   help="prefer masks of this calibration config (default: the config's)")
    p.add_argument("--mask-key", default=None, metavar="KEY",
                   help="the mask's store key (masks/model=.../<persona>.safetensors), as listed when several fit")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")


def persona_of(plan: Plan, pid: str) -> tuple[Persona, Persona | None]:
    """The persona (from the plan's catalog, or the reference persona) and its opposite."""
    if pid in plan.catalog:
        p = plan.catalog[pid]
    elif pid == reference_persona().id:
        p = reference_persona()
    else:
        raise UserError(f"persona {pid!r} is not in catalog {plan.config.catalog} "
                        f"(persona-jobs catalog show {plan.config.catalog})")
    opposite = plan.catalog.personas.get(p.opposite) if p.opposite else None
    return p, opposite


def choose(args, *, need_mask: bool = True) -> tuple[Plan, Persona, Persona | None, object | None]:
    """The plan of --config and the flags, the persona, its opposite, and the mask the flags pick
    (None when no mask is needed and none was asked for)."""
    overrides = {k: v for k, v in where_overrides(args).items() if k != "address"}
    overrides["personas"] = [args.persona]
    plan = make_plan(load(args.config, overrides), Selection(personas=(args.persona,)))
    persona, opposite = persona_of(plan, args.persona)
    named = any(getattr(args, k, None) is not None for k in ("method", "sparsity", "budget", "mask_key"))
    if not need_mask and not named:
        return plan, persona, opposite, None
    ref = find_mask(plan.store, plan.model_key, persona.id, method=args.method, sparsity=args.sparsity,
                    budget=args.budget, key=args.mask_key, calib=args.calib_hash or plan.calib.hash,
                    methods=plan.config.masks.methods)
    if ref.model_key != plan.model_key:
        raise UserError(f"{ref.key} is a mask of model {ref.model_key}; the config's model {plan.model} is "
                        f"{plan.model_key} (--model)")
    return plan, persona, opposite, ref


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a persona's subnetwork as a Hugging Face model folder",
                       description=__doc__.split("\n\n")[0] + " A local folder or any fsspec URL; "
                       "`AutoModelForCausalLM.from_pretrained` loads it with no code of ours.")
    add_mask_args(p)
    p.add_argument("out", metavar="OUT_DIR", help="where the model folder goes: a local folder or an fsspec URL")
    p.add_argument("--force", action="store_true", help="replace an existing folder there")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the exported weights' dtype (default %(default)s; bfloat16 halves the folder)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    plan, persona, _, ref = choose(args)
    mask = read_mask(plan.store, ref)
    loaded = load_model(plan.model, device=args.device or "cpu", dtype=args.dtype)
    try:
        url, info = export_mask(plan.store, loaded, mask, args.out, persona=persona, replace=args.force)
    except FileExistsError as err:
        raise UserError(str(err)) from None
    if info is None:
        print(f"{url}: already an export of {ref.key} (verified); nothing to do")
        return 0
    size = (f"smaller: intermediate_size {info.dense_intermediate_size} -> {info.intermediate_size}"
            if info.smaller else "dense shapes, removed weights stored as zeros")
    print(f"exported {persona.id} ({ref.method}, {ref.level}) to {url}: {info.parameters:,} parameters, {size}")
    print(f"load it: AutoModelForCausalLM.from_pretrained({url!r}); its model card is {url}/README.md")
    return 0
