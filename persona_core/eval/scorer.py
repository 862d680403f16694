"""`Scorer`: what metrics and validation ask of a model, and all they know of it.

It plays the role lm-evaluation-harness's `LM` base class plays (``lm_eval/api/model.py``),
shaped to what this project's metrics need. Its three requests map onto ours:

* ``loglikelihood(context, continuation)``: `continuation_logprobs` (per (context ids,
  continuation ids) pair, the log-prob of every continuation token; their sum is the
  harness's number, their mean a statement's score), and `prefix_logprobs` for many
  continuations of one shared context (the statement question, a few-shot prompt), whose
  key/value cache an implementation may compute once.
* ``loglikelihood_rolling(text)``: `continuation_logprobs` over fixed windows of a text
  (`persona_core.eval.validation.window_nll`): the same tokens under every condition
  (`prefix_logprobs` where a condition's prompt precedes every window).
* ``generate_until``: `generate`, greedy, a fixed number of new tokens.

plus `next_token_logprobs` (the whole next-token distribution: Yes/No answers read two
entries of it) and the text format every request is built with: `prompt` (the chat template,
or a plain "Question: ... Answer:" form), `encode` / `encode_many`, and the `tokenizer`.

The model's weights and hooks are the caller's business: a metric scores whatever state the
model is in (dense, masked, steered). `persona_core.eval.engine.Evaluator` implements this
protocol for a Hugging Face causal LM; nothing written against it imports the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


@runtime_checkable
class Scorer(Protocol):
    """A causal LM that scores and generates text (see the module docstring for the mapping)."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    def prompt(self, system: str | None, user: str) -> str:
        """The text that precedes the model's answer to `user` (with `system` as system prompt)."""
        ...

    def encode(self, text: str, *, continuation: bool = False) -> list[int]:
        """Token ids of a prompt, or (``continuation=True``) of text that follows one."""
        ...

    def encode_many(self, texts: Sequence[str], *, continuation: bool = False) -> list[list[int]]:
        """`encode` of many texts at once."""
        ...

    def continuation_logprobs(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Per (context ids, continuation ids): the log-prob of each continuation token (fp32, CPU)."""
        ...

    def prefix_logprobs(self, prefix: list[int], conts: Sequence[list[int]]) -> list[torch.Tensor]:
        """`continuation_logprobs` of many continuations of one shared context."""
        ...

    def next_token_logprobs(self, contexts: Sequence[list[int]]) -> torch.Tensor:
        """(len(contexts), vocab) log-probs of the token after each context (fp32, CPU)."""
        ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of formatted prompts (deterministic)."""
        ...
