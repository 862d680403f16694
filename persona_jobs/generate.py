"""`persona-jobs generate`: what a persona's subnetwork says, next to the baselines (docs/using-masks.md).

    persona-jobs generate --config configs/demo.yaml --persona introvert "How was your weekend?"
    persona-jobs generate --config configs/demo.yaml --persona introvert --interactive

One prompt answered under each condition in turn (dense, dense+prompt, dense+fewshot, dense+steer,
masked, masked+prompt), each streamed under its own header; greedy, or sampled with --temperature
(reproducible with --seed). With --interactive, a chat with one condition: every line of standard
input is a user turn (a terminal or a pipe), answered with the conversation so far. The mask is
picked as `export` picks it. One process, no Ray.
"""

from __future__ import annotations

import logging
import sys

import torch

from persona_core.api import Conversation, read_mask, talk_conditions
from persona_core.calib.stored import read_persona_stats
from persona_core.catalog import REFERENCE_PERSONA_ID
from persona_core.errors import UserError
from persona_core.eval.conditions import CONDITIONS
from persona_core.models.loading import load_model
from persona_jobs.common import ListAction
from persona_jobs.export import add_mask_args, choose

log = logging.getLogger(__name__)

DEFAULT_CONDITIONS = ("dense", "dense+prompt", "masked")
CHAT_CONDITION = "masked"


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="text from a persona's subnetwork and the baselines, side by side, streamed",
                       description=__doc__.split("\n\n")[0])
    add_mask_args(p)
    # one value per flag (comma-separated or repeated), so that the PROMPT after it stays the prompt
    p.add_argument("--conditions", "--condition", dest="conditions", action=ListAction, nargs=None,
                   valid=talk_conditions(), metavar="C", default=None,
                   help=f"conditions to answer under, in order (default: {', '.join(DEFAULT_CONDITIONS)}; "
                        f"--interactive: {CHAT_CONDITION}); comma-separated or repeated")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per answer (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (the default): greedy; above 0: sampled at this temperature")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when sampled (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the seed of sampled answers (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: torch's choice; 1 is often fastest on a busy machine)")
    p.add_argument("--interactive", action="store_true",
                   help="chat with one condition: each line of standard input is a turn; an empty line ends it")
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the user message (not with --interactive)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    if args.interactive == bool(args.prompt):
        raise UserError("give a PROMPT, or --interactive (and the turns on standard input), not both")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    conditions = list(args.conditions or ([CHAT_CONDITION] if args.interactive else DEFAULT_CONDITIONS))
    if args.interactive and len(conditions) != 1:
        raise UserError(f"--interactive chats under one condition; got {', '.join(conditions)}")
    need_mask = any(CONDITIONS[c].masked for c in conditions)
    plan, persona, opposite, ref = choose(args, need_mask=need_mask)
    mask = read_mask(plan.store, ref) if ref is not None else None
    stats = None
    if any(CONDITIONS[c].steered for c in conditions):
        ids = [persona.id, opposite.id if opposite else REFERENCE_PERSONA_ID]
        stats = {pid: read_persona_stats(plan.store, plan.model_key, pid, calib_hash=args.calib_hash or plan.calib.hash)
                 for pid in ids}
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_model(plan.model, device=args.device)
    except ValueError as err:
        raise UserError(str(err)) from None
    talk = Conversation(loaded, persona, opposite, mask, config=plan.eval or None, stats=stats)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed}
    if args.interactive:
        return chat(talk, conditions[0], options, ref)
    for cond in conditions:
        print(f"── {label(cond, ref)} ──", flush=True)
        talk.reply(cond, args.prompt, on_text=_out, **options)
        print("\n", flush=True)
    return 0


def label(condition: str, ref) -> str:
    if ref is None or not CONDITIONS[condition].masked:
        return condition
    return f"{condition}: {ref.method} {ref.level}"


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat(talk: Conversation, condition: str, options: dict, ref) -> int:
    """Turns from standard input until an empty line or its end; each answer streamed."""
    tty = sys.stdin.isatty()
    print(f"chatting with {talk.persona.id} ({label(condition, ref)}); an empty line ends it", flush=True)
    while True:
        if tty:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        if not tty:
            print(f"you> {line.strip()}")
        sys.stdout.write(f"{talk.persona.id}> ")
        talk.reply(condition, line.strip(), on_text=_out, keep=True, **options)
        print(flush=True)
    return 0


def next_steps(plan, config: str | None) -> list[str]:
    """The closing lines of a run: how to talk to one of its personas, and how to export it."""
    persona = next(iter(plan.config.personas or plan.persona_ids), None)
    if persona is None:
        return []
    where = (f"--config {config}" if config else
             f"--store {plan.config.store} --model {plan.config.model} --catalog {plan.config.catalog}")
    return [f"talk to a persona:  persona-jobs generate {where} --persona {persona} \"How was your weekend?\"",
            f"                    persona-jobs generate {where} --persona {persona} --interactive",
            f"export it:          persona-jobs export {where} --persona {persona} ./{persona}-model",
            "(docs/using-masks.md)"]
