"""Several jobs' reasoning as one batch: mlx-vlm's batched generation over the reasoner's
images and prompts, giving each row the text the reasoner's single-job `reason` gives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

from PIL import Image

from service.models import mlx_runtime
from service.models.gemma import GemmaReasoner


class _Recorder:
    """Stands in for the processor's detokenizer during a batch: mlx-vlm's batch hands it each
    row's generated tokens (reset, then the row's tokens), which is all that is kept."""

    def __init__(self) -> None:
        self.rows: list[list[int]] = []
        self.text = ""

    def reset(self) -> None:
        self.rows.append([])

    def add_token(self, token: int, **_: Any) -> None:
        self.rows[-1].append(int(token))

    def finalize(self) -> None:
        pass


def _stop_tokens(model: Any) -> set[int]:
    """The ids the single-job path stops on: the checkpoint's eos ids."""
    eos = model.config.eos_token_id
    return {int(t) for t in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _text(processor: Any, tokens: list[int]) -> str:
    """The tokens as the single-job path renders them: special tokens skipped, then the
    processor's own output clean-up."""
    from mlx_vlm.tokenizer_utils import make_streaming_detokenizer

    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    skip = set(getattr(tokenizer, "all_special_ids", ()))
    detokenizer = make_streaming_detokenizer(processor)
    detokenizer.reset()
    # Built from the streamed segments, as `generate` builds it: a segment the detokenizer
    # held back (a partial character) and never released is not in the text.
    parts = []
    for token in tokens:
        detokenizer.add_token(token, skip_special_token_ids=skip)
        parts.append(detokenizer.last_segment)
    detokenizer.finalize()
    parts.append(detokenizer.last_segment if tokens else "")
    text = "".join(parts)
    clean = getattr(processor, "clean_output", None)
    return str(clean(text)) if callable(clean) else text


def generate_rows(
    reasoner: GemmaReasoner, images: Sequence[Image.Image], texts: Sequence[str], limits: list[int]
) -> list[list[int]]:
    """Greedy token ids per row, one batched generation (rows of one image size share it)."""
    from mlx_vlm import batch_generate

    processor = reasoner.processor
    recorder = _Recorder()
    saved = processor.detokenizer
    processor.detokenizer = recorder
    try:
        batch_generate(
            reasoner.model,
            processor,
            images=cast(Any, list(images)),
            prompts=list(texts),
            max_tokens=limits,
            group_by_shape=False,  # the caller groups: rows come back in its order
            verbose=False,
            stop_tokens=_stop_tokens(reasoner.model),
        )
    finally:
        processor.detokenizer = saved
    rows = [row for row in recorder.rows[1:]]  # the first reset opens the batch, not a row
    if len(rows) != len(texts):
        raise RuntimeError(f"batched generation returned {len(rows)} rows for {len(texts)}")
    return rows


def reason_many(
    reasoner: Any, images: Sequence[Image.Image], prompts: Sequence[str], limits: Sequence[int]
) -> list[str]:
    """Each job's reasoning, in order: one batched generation per image size for a Gemma
    reasoner (greedy, so each row's text is what `reason` gives it alone), else one `reason`
    call per job. Raises if the batch does: the caller retries the jobs one by one."""
    if not isinstance(reasoner, GemmaReasoner) or len(images) < 2:
        return [
            reasoner.reason(image, prompt, max_tokens=limit)
            for image, prompt, limit in zip(images, prompts, limits, strict=True)
        ]
    rgb = [image if image.mode == "RGB" else image.convert("RGB") for image in images]
    texts = [mlx_runtime.plain_text(prompt, reasoner._specials) for prompt in prompts]
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(rgb):
        groups.setdefault(image.size, []).append(index)
    out: list[str] = [""] * len(rgb)
    with reasoner._lock:
        for indices in groups.values():
            rows = generate_rows(
                reasoner,
                [rgb[i] for i in indices],
                [texts[i] for i in indices],
                [limits[i] for i in indices],
            )
            for index, tokens in zip(indices, rows, strict=True):
                out[index] = _text(reasoner.processor, tokens)
    return out
