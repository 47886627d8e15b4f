"""Falcon Perception's greedy detection loop, composed from mlx-vlm's own model blocks and KV
caches so that it does the least work per image: the image and instruction are prefilled once
and their KV cache shared by every query, vocabulary logits are computed only where a token is
chosen, and queries decode together as rows of one batch. Knows nothing of the service: a PIL
image and query strings in, mlx-vlm's raw detection dicts out, equal to what
`Model.generate_perception` returns for each query on its own."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
from mlx_vlm.models.base import to_mlx
from mlx_vlm.models.cache import BatchKVCache, KVCache, create_causal_mask, make_prompt_cache
from PIL import Image

# mlx-vlm's prompt is `<|image|>{instruction}<|start_of_query|>{query}<|REF_SEG|>`. Image and
# instruction positions attend only to themselves and what precedes them (block-causal mask),
# so their keys and values are the same whatever query follows: everything up to this token is
# the prefix that queries share.
START_OF_QUERY = "<|start_of_query|>"
MAX_BATCH = 8  # rows decoded together; each holds its own copy of the prefix's KV cache
BATCH_BYTES = 2 << 30  # and together they hold at most this much of such copies


@dataclass
class Prefix:
    """One image prefilled up to its queries. Queries fork its cache; nothing mutates it."""

    head: list[int]  # the unexpanded prompt ids up to START_OF_QUERY (one `<|image|>`)
    ids: list[int]  # the same, image expanded: the tokens in `cache`
    cache: list[Any]  # one KVCache per layer
    rope_delta: int  # a text token's position is its index plus this
    image: Image.Image  # RGB, as given
    pixel_values: mx.array
    grid_hw: mx.array
    segm_features: mx.array | None  # the image's mask features, when the checkpoint segments

    @property
    def nbytes(self) -> int:
        return sum(int(c.nbytes) for c in self.cache)


@dataclass
class _Row:
    """One query's decoding state: what generate_perception keeps in local variables."""

    ids: list[int]  # prompt ids after the prefix (or the whole prompt, unshared)
    length: int = 0  # tokens in this row's KV cache
    rope_delta: int = 0
    hidden: Any = None  # (1, 1, D): the last position's hidden state, once prefilled
    cache: list[Any] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # chosen so far, eos left out
    detections: list[dict[str, Any]] = field(default_factory=list)
    current: dict[str, Any] = field(default_factory=dict)
    coord_xy: mx.array = field(default_factory=lambda: mx.zeros((1, 2)))
    size_hw: mx.array = field(default_factory=lambda: mx.zeros((1, 2)))
    done: bool = False

    def finish(self) -> None:
        if "xy" in self.current and "hw" in self.current:
            self.detections.append(self.current)
            self.current = {}
        self.done = True


class FalconEngine:
    """Greedy detection for one loaded mlx-vlm Falcon Perception model. Not thread-safe: the
    caller serialises calls (mlx-vlm's model keeps per-prompt state on itself)."""

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self._lm = model.language_model
        self._start_id = processor.tokenizer.convert_tokens_to_ids(START_OF_QUERY)
        self._cfg = model.config
        self.last_tokens: list[list[int]] = []  # per query of the last `detect`: what it chose

    # -- prompts ---------------------------------------------------------------------------

    def _prompt_ids(self, query: str) -> list[int]:
        """The processor's token ids for `query` before the image is expanded."""
        prompt = self.processor._make_prompt(query)
        return list(self.processor.tokenizer.encode(prompt, add_special_tokens=False))

    def _expand(self, ids: list[int], grid_hw: mx.array) -> list[int]:
        grid = [_listed(grid_hw[0])]
        return list(self.processor._expand_image_tokens(ids, grid))

    def full_ids(self, prefix: Prefix, query: str) -> list[int]:
        """The whole prompt for `query`, as `processor(text=[query], images=[image])` gives."""
        return self._expand(self._prompt_ids(query), prefix.grid_hw)

    # -- prefill -----------------------------------------------------------------------------

    def _prefill_with_image(
        self, ids: list[int], pixel_values: mx.array, grid_hw: mx.array
    ) -> tuple[mx.array, list[Any], int]:
        """A prompt that starts with the image, from an empty cache: what generate_perception's
        prefill does, less the vocabulary head. Returns every position's hidden state."""
        input_ids = mx.array([ids])
        embeds = self.model.get_input_embeddings(
            input_ids, pixel_values, image_grid_hw=grid_hw
        ).inputs_embeds
        lm = self._lm  # get_input_embeddings left positions and mask for this prompt on it
        cache = make_prompt_cache(self.model)
        hidden = lm.model(
            input_ids,
            inputs_embeds=embeds,
            mask=lm._full_attn_mask,
            cache=cache,
            position_ids=lm._position_ids,
            pos_hw=lm._pos_hw,
        )
        return hidden, cache, int(lm._rope_delta)

    def encode(self, image: Image.Image) -> Prefix:
        """Preprocess `image` and prefill the shared prefix (image, instruction, query start)."""
        rgb = image.convert("RGB")
        inputs = to_mlx(self.processor(text=[""], images=[rgb], padding=False))
        pixel_values, grid_hw = inputs["pixel_values"], inputs["image_grid_hw"]
        head = self._prompt_ids("")
        head = head[: head.index(self._start_id) + 1]
        ids = self._expand(head, grid_hw)
        hidden, cache, delta = self._prefill_with_image(ids, pixel_values, grid_hw)
        segm = self._segm_features(hidden, ids, pixel_values, grid_hw)
        mx.eval(hidden, [c.state for c in cache])
        return Prefix(head, ids, cache, delta, rgb, pixel_values, grid_hw, segm)

    def _segm_features(
        self, hidden: mx.array, ids: list[int], pixel_values: mx.array, grid_hw: mx.array
    ) -> mx.array | None:
        """The image positions' mask features. The image attends to nothing after it, so the
        prefix's hidden states are those of any full prompt."""
        if not hasattr(self.model, "conv_segm"):
            return None
        grid_h, grid_w = _listed(grid_hw[0])
        features = self.model.compute_segm_features(
            hidden, mx.array([ids]), pixel_values, grid_h, grid_w
        )
        mx.eval(features)
        return features

    def _prefill_row(self, prefix: Prefix, row: _Row, shared: bool) -> None:
        if not shared:
            hidden, row.cache, row.rope_delta = self._prefill_with_image(
                row.ids, prefix.pixel_values, prefix.grid_hw
            )
            row.length = len(row.ids)
            row.hidden = hidden[:, -1:, :]
            return
        start, n = len(prefix.ids), len(row.ids)
        row.cache = [_fork(c) for c in prefix.cache]
        row.rope_delta = prefix.rope_delta
        input_ids = mx.array([row.ids])
        base = start + prefix.rope_delta
        hidden = self._lm.model(
            input_ids,
            inputs_embeds=self._lm.model.embed_tokens(input_ids),
            mask=create_causal_mask(n, offset=start),
            cache=row.cache,
            position_ids=mx.arange(base, base + n, dtype=mx.int32),
            pos_hw=mx.zeros((1, n, 2)),  # text positions carry no 2-D image position
        )
        row.length = start + n
        row.hidden = hidden[:, -1:, :]

    # -- heads -------------------------------------------------------------------------------

    def _logits(self, hidden: mx.array) -> mx.array:
        """The vocabulary head on the given positions only, in the dtype mlx-vlm returns."""
        lm = self._lm
        embed = lm.model.embed_tokens
        out = embed.as_linear(hidden) if lm.args.tie_word_embeddings else lm.lm_head(hidden)
        return out.astype(embed.weight.dtype)

    # -- detection ---------------------------------------------------------------------------

    def detect(
        self,
        image: Image.Image | Prefix,
        queries: Sequence[str],
        *,
        max_new_tokens: int = 512,
        max_batch: int = MAX_BATCH,
        share_prefix: bool = True,
        segm_threshold: float = 0.5,
        on_group: Callable[[Sequence[str]], None] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Greedy detections for each query, in order, as generate_perception gives them.
        `image` may be a Prefix from `encode` (reused as it is). Distinct queries run in
        groups of up to `max_batch` rows; `on_group(queries)` is called before each group and may
        raise to stop. `share_prefix=False` prefills every query's whole prompt instead."""
        if not queries:
            return []
        prefix = image if isinstance(image, Prefix) else self.encode(image)
        unique = list(dict.fromkeys(queries))
        per_group = max(1, min(max_batch, BATCH_BYTES // max(1, prefix.nbytes)))
        found: dict[str, list[dict[str, Any]]] = {}
        tokens: dict[str, list[int]] = {}
        for at in range(0, len(unique), per_group):
            group = unique[at : at + per_group]
            if on_group is not None:
                on_group(group)
            rows = [self._row(prefix, q, share_prefix) for q in group]
            self._decode(prefix, rows, max_new_tokens, segm_threshold)
            for query, row in zip(group, rows, strict=True):
                found[query], tokens[query] = row.detections, row.tokens
        self.last_tokens = [list(tokens[q]) for q in queries]
        return [[dict(d) for d in found[q]] for q in queries]

    def _row(self, prefix: Prefix, query: str, share_prefix: bool) -> _Row:
        ids = self._prompt_ids(query)
        cut = ids.index(self._start_id) + 1 if self._start_id in ids else 0
        shared = share_prefix and ids[:cut] == prefix.head
        row = _Row(ids[cut:] if shared else self._expand(ids, prefix.grid_hw))
        self._prefill_row(prefix, row, shared)
        return row

    def _decode(
        self, prefix: Prefix, rows: list[_Row], max_new_tokens: int, segm_threshold: float
    ) -> None:
        """generate_perception's decode loop over several rows at once."""
        if max_new_tokens <= 0:
            return
        batched = len(rows) > 1
        live = list(rows)
        hidden = mx.concatenate([row.hidden for row in rows]) if batched else rows[0].hidden
        cache: list[Any] = rows[0].cache
        if batched:
            layers = range(len(cache))
            cache = [BatchKVCache.merge([row.cache[i] for row in rows]) for i in layers]
        for row in rows:
            row.cache = []  # the merged cache holds the only copy now
        logits = self._logits(hidden)
        for step in range(max_new_tokens):
            tokens: list[int] = _listed(mx.argmax(logits[:, -1, :], axis=-1))
            self._read_heads(prefix, live, tokens, hidden, segm_threshold)
            keep = [i for i, row in enumerate(live) if not row.done]
            if not keep or step == max_new_tokens - 1:
                break
            if len(keep) < len(live):
                index = mx.array(keep)
                for c in cache:
                    c.filter(index)
                live = [live[i] for i in keep]
                tokens = [tokens[i] for i in keep]
            hidden = self._step(live, tokens, cache, batched)
            logits = self._logits(hidden)
            mx.eval(logits)
        for row in rows:
            row.finish()

    def _read_heads(
        self,
        prefix: Prefix,
        live: list[_Row],
        tokens: list[int],
        hidden: mx.array,
        segm_threshold: float,
    ) -> None:
        """Each row's chosen token: eos ends it; coord, size and seg tokens read their value
        from the hidden state that chose them, as generate_perception does."""
        cfg, model = self._cfg, self.model
        coords = [i for i, t in enumerate(tokens) if t == cfg.coord_token_id]
        sizes = [i for i, t in enumerate(tokens) if t == cfg.size_token_id]
        dim = hidden.shape[-1]
        if coords:
            bins = model.decode_coords(hidden[mx.array(coords)].reshape(-1, dim))
            top = _listed(mx.argmax(bins, axis=-1))
            for i, (x, y) in zip(coords, top, strict=True):
                row = live[i]
                if "xy" in row.current and "hw" in row.current:
                    row.detections.append(row.current)
                    row.current = {}
                px, py = x / (bins.shape[-1] - 1), y / (bins.shape[-1] - 1)
                row.coord_xy = mx.array([[px, py]])
                row.current["xy"] = {"x": px, "y": py}
        if sizes:
            hw = _listed(
                model.process_sizes(model.decode_sizes(hidden[mx.array(sizes)].reshape(-1, dim)))
            )
            for i, (h, w) in zip(sizes, hw, strict=True):
                live[i].size_hw = mx.array([[h, w]])
                live[i].current["hw"] = {"h": h, "w": w}
        for i, token in enumerate(tokens):
            row = live[i]
            if token == cfg.eos_id:
                row.finish()
                continue
            row.tokens.append(token)
            if token == cfg.seg_token_id:
                if prefix.segm_features is not None:
                    width, height = prefix.image.size
                    mask = model.decode_segm_mask(
                        hidden[i].reshape(-1), prefix.segm_features, height, width, segm_threshold
                    )
                    mx.eval(mask)
                    row.current["mask"] = mask
                if "xy" in row.current and "hw" in row.current:
                    row.detections.append(row.current)
                row.current = {}

    def _step(
        self, live: list[_Row], tokens: list[int], cache: list[Any], batched: bool
    ) -> mx.array:
        """One decode step for the live rows; returns their new last hidden states."""
        cfg, model, lm = self._cfg, self.model, self._lm
        token_ids = mx.array(tokens).reshape(-1, 1)
        embeds = lm.model.embed_tokens(token_ids)
        if cfg.coord_token_id in tokens:
            xy = mx.concatenate([row.coord_xy for row in live])
            embeds = model.encode_coords_into_embeds(embeds, token_ids, xy)
        if cfg.size_token_id in tokens:
            hw = mx.concatenate([row.size_hw for row in live])
            embeds = model.encode_sizes_into_embeds(embeds, token_ids, hw)
        positions = [row.length + row.rope_delta for row in live]
        mask = None
        if batched:
            padded = any(_listed(cache[0].left_padding))
            mask = cache[0].make_mask(1) if padded else None
            position_ids = mx.array(positions, dtype=mx.int32).reshape(-1, 1)
        else:
            position_ids = mx.arange(positions[0], positions[0] + 1, dtype=mx.int32)
        for row in live:
            row.length += 1
        hidden: mx.array = lm.model(
            token_ids, inputs_embeds=embeds, mask=mask, cache=cache, position_ids=position_ids
        )
        return hidden


def _listed(array: mx.array) -> list[Any]:
    """`array.tolist()` of an array that has at least one dimension."""
    return cast(list[Any], array.tolist())


def _fork(cache: KVCache) -> KVCache:
    """A cache that starts where `cache` is and grows on its own: the first update of a cache
    filled to its capacity allocates anew, so the source arrays are never written."""
    fork = KVCache()
    keys, values = cache.state
    fork.state = (keys[..., : cache.offset, :], values[..., : cache.offset, :])
    return fork
