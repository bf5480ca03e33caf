"""Constrained decoding: a grammar per row, compiled by llguidance, applied as a logits mask in the sampler.

llguidance builds its tokenizer straight from the checkpoint's `tokenizers` JSON (special tokens included) and
gives, per step, a bitmask of the tokens that keep the answer inside the grammar; end-of-sentence is allowed only
once the grammar is complete. Masking sets the other logits to -inf, so greedy decoding picks exactly what it
would pick unconstrained whenever that choice is allowed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from vl2cli.errors import UsageError

if TYPE_CHECKING:
    import llguidance
    import torch

# Compact JSON (no free whitespace: the answer's tokens go to its content) and no \\u escapes.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "json_allowed_escapes": 'nrt"\\'}


class GrammarError(UsageError):
    """A schema or grammar that cannot be compiled (the message names the construct)."""


@dataclass(frozen=True)
class Grammar:
    kind: str  # "json_schema" | "lark" | "regex"
    source: str  # the schema (compact JSON), the Lark text or the regex, as the record shows it
    compiled: str  # llguidance's grammar definition
    narrowed: tuple[dict[str, Any], ...] = ()  # json_schema: bounds vl2 added where the schema sets none
    relaxed: tuple[str, ...] = ()  # json_schema: what the grammar does not enforce (checked after decoding)

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any], lenient: bool = False, narrowed: tuple[dict[str, Any], ...] = (),
                         relaxed: tuple[str, ...] = ()) -> Grammar:
        """`lenient`: keywords and formats llguidance does not implement (and `oneOf` it cannot prove exclusive,
        taken as `anyOf`) are left out of the grammar and named in `relaxed`, instead of refused."""
        import llguidance
        options = {**JSON_OPTIONS, "lenient": True} if lenient else JSON_OPTIONS
        try:
            compiled = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=cast(Any, options))
        except ValueError as exc:
            raise GrammarError(f"the schema is not a JSON object ({exc})") from None
        compiled, warnings = _checked_with_warnings(compiled)
        return cls("json_schema", json.dumps(schema, separators=(",", ":"), ensure_ascii=False), compiled,
                   narrowed, (*relaxed, *(" ".join(w.split())[:200] for w in warnings)))

    @classmethod
    def from_lark(cls, text: str) -> Grammar:
        import llguidance
        return cls("lark", text, _checked(llguidance.LLMatcher.grammar_from_lark(text)))

    @classmethod
    def from_regex(cls, pattern: str) -> Grammar:
        """The whole answer matches `pattern` (Rust regex syntax, as llguidance reads it)."""
        import llguidance
        return cls("regex", pattern, _checked(llguidance.LLMatcher.grammar_from_regex(pattern)))

    @property
    def bounds_length(self) -> bool:
        """Whether repetition inside the grammar is expected rather than a runaway loop (a Lark grammar's
        repetitions are counted; a client's regex is taken as written); a JSON Schema's free strings are as long
        as the context, so a loop inside one is caught and re-read."""
        return self.kind in ("lark", "regex")

    def to_json(self) -> dict[str, Any]:
        if self.kind == "json_schema":
            out: dict[str, Any] = {"kind": self.kind, "schema": json.loads(self.source)}
            if self.narrowed:
                out["narrowed"] = [dict(n) for n in self.narrowed]
            if self.relaxed:
                out["relaxed"] = list(self.relaxed)
            return out
        return {"kind": self.kind, "regex" if self.kind == "regex" else "lark": self.source}


def _checked_with_warnings(compiled: str) -> tuple[str, list[str]]:
    import llguidance
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(compiled)
    if failed:
        raise GrammarError("unsupported by the grammar compiler: " + " ".join(messages[0].split())[:300])
    return compiled, list(messages)


def _checked(compiled: str) -> str:
    return _checked_with_warnings(compiled)[0]


class RowMasks:
    """The live grammar state of each constrained row of one generation, and the bitmasks that apply it."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammars: list[Grammar | None], vocab_size: int):
        import llguidance
        import torch  # here, not at the top: the CLI's --help reaches this module through the tasks
        self.vocab_size = vocab_size
        self.matchers: dict[int, llguidance.LLMatcher] = {}
        for row, grammar in enumerate(grammars):
            if grammar is not None:
                matcher = llguidance.LLMatcher(tokenizer, grammar.compiled, log_level=0)
                if matcher.is_error():
                    raise GrammarError(f"grammar rejected: {matcher.get_error()[:300]}")
                self.matchers[row] = matcher
        words = (vocab_size + 31) // 32
        self.bitmask = torch.zeros(max(len(grammars), 1), words, dtype=torch.int32)
        self.bits = torch.arange(32, dtype=torch.int32)

    def constrained(self, row: int) -> bool:
        return row in self.matchers

    def apply(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Mask logits [len(rows), V] in place: each constrained row keeps only the tokens its grammar allows."""
        positions = [i for i, row in enumerate(rows) if row in self.matchers]
        if not positions:
            return logits
        for i in positions:
            matcher = self.matchers[rows[i]]
            view = self.bitmask[i]
            matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * view.element_size())
        words = self.bitmask[positions]  # [n, W] int32, one bit per token
        allowed = ((words[:, :, None] >> self.bits) & 1).bool().flatten(1)[:, : logits.shape[1]]
        index = self.bits.new_tensor(positions).to(logits.device)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
        return logits

    def consume(self, row: int, token: int) -> None:
        matcher = self.matchers.get(row)
        if matcher is not None and not matcher.consume_token(token):
            raise GrammarError(f"the grammar rejected token {token}: {matcher.get_error()[:200]}")


def grammar_tokenizer(tokenizer_json: str, vocab_size: int, eos_id: int) -> llguidance.LLTokenizer:
    """llguidance's view of the checkpoint's tokenizer (built once per model: ~1 s for a 129k vocabulary)."""
    import llguidance
    return llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_id)
