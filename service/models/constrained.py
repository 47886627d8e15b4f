"""Constrained decoding to a JSON Schema: llguidance grammars as mlx-vlm logits processors that
run on any MLX backend. Knows the tokenizer and the schema, not the model or the job."""

from __future__ import annotations

import functools
import json
from typing import Any, cast

from service.errors import JobFailure

# The separators mlx-vlm's own structured generation uses: compact JSON, one space after "," and
# ":", no other whitespace, so the model cannot spend its tokens on indentation.
_OVERRIDES = {
    "item_separator": ", ",
    "key_separator": ": ",
    "whitespace_flexible": False,
    # Keywords llguidance cannot enforce (uniqueItems, not, ...) are left to the validation of
    # the finished answer instead of refusing the schema.
    "lenient": True,
}


def _unsatisfiable(why: str) -> JobFailure:
    """Also for what llguidance cannot enforce (a regex feature it lacks): either way no
    constrained answer can come of the schema as it is."""
    why = " ".join(why.split()) or "llguidance refused it"
    if len(why) > 300:  # the engine may append its whole parser state: keep the reason
        why = why[:300].rsplit(" ", 1)[0] + " …"
    return JobFailure(
        "schema_unsatisfiable",
        f"response_schema cannot be satisfied by constrained decoding: {why}. "
        "Fix or simplify the schema.",
        transient=False,
    )


def _is_rust_panic(exc: BaseException) -> bool:
    # A panic inside llguidance surfaces as pyo3's PanicException, a BaseException.
    return type(exc).__name__ == "PanicException"


@functools.cache
def _processor_class() -> type:
    """The processor class, built on first use: mlx_vlm.structured imports MLX."""
    import mlx.core as mx
    from mlx_vlm.structured import LLGuidanceLogitsProcessor

    class MaskedProcessor(LLGuidanceLogitsProcessor):
        """mlx-vlm's llguidance processor; the token mask goes through mlx-vlm's Metal kernel
        where Metal is, through plain MLX ops elsewhere. A matcher in error, or one that
        allows no token before its grammar is complete, fails the job instead of sampling
        from all minus infinity."""

        def clone(self) -> MaskedProcessor:
            return MaskedProcessor(self.grammar, self.llg_tokenizer)

        def _consume_tokens(self, last_tokens: list[int]) -> None:
            for matcher, token in zip(_matchers(self), last_tokens, strict=False):
                matcher.consume_token(token)
                if matcher.is_error():
                    raise _unsatisfiable(f"the grammar refused a token: {matcher.get_error()}")

        def _fill_next_token_mask(self) -> Any:
            packed = super()._fill_next_token_mask()
            words: Any = self.bitmask  # the numpy view of the mask just filled
            for row, matcher in enumerate(_matchers(self)):
                if matcher.is_error():
                    raise _unsatisfiable(matcher.get_error())
                if not matcher.is_stopped() and not words[row].any():
                    raise _unsatisfiable("no token can continue the answer")
            return packed

        def _apply_bitmask(self, logits: Any) -> Any:
            if mx.metal.is_available():
                return super()._apply_bitmask(logits)
            return apply_mask(logits, self._fill_next_token_mask())

    return MaskedProcessor


def _matchers(processor: Any) -> list[Any]:
    return list(processor.ll_matchers or ())


def apply_mask(logits: Any, packed: Any) -> Any:
    """`logits` (vocab,) or (batch, vocab) with every token whose bit is clear in the packed
    int32 words `packed` (batch, words) set to minus infinity; tokens past the words too."""
    import mlx.core as mx

    if logits.ndim == 1:
        logits = logits[None, :]
    if packed.ndim == 1:
        packed = packed[None, :]
    bits = (packed[:, :, None] >> mx.arange(32, dtype=mx.int32)) & 1
    allowed = bits.reshape(packed.shape[0], -1).astype(mx.bool_)
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:
        pad = mx.zeros((allowed.shape[0], vocab - allowed.shape[1]), dtype=mx.bool_)
        allowed = mx.concatenate([allowed, pad], axis=1)
    allowed = allowed[:, :vocab]
    return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))


class SchemaConstraints:
    """Logits processors for JSON Schemas over one tokenizer. Its llguidance tokenizer (a walk
    over the whole vocabulary) is built once, on first use."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._llg: Any = None

    @property
    def llg_tokenizer(self) -> Any:
        if self._llg is None:
            import llguidance.hf

            self._llg = llguidance.hf.from_tokenizer(self._tokenizer)
        return self._llg

    def grammar(self, schema: dict[str, Any]) -> str:
        """The llguidance grammar for `schema`, checked against the tokenizer. Raises
        JobFailure("schema_unsatisfiable") when llguidance cannot compile it."""
        from llguidance import LLMatcher

        try:
            grammar = LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides=cast(Any, _OVERRIDES)
            )
            failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, self.llg_tokenizer)
        except BaseException as exc:
            if not isinstance(exc, Exception) and not _is_rust_panic(exc):
                raise
            raise _unsatisfiable(str(exc)) from None
        if failed:
            raise _unsatisfiable(messages[0] if messages else "")
        return str(grammar)

    def processor(self, schema: dict[str, Any]) -> Any:
        """A fresh logits processor (one generation's state) constraining output to `schema`."""
        return _processor_class()(self.grammar(schema), self.llg_tokenizer)
