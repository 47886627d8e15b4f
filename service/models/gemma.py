"""The reasoner runtime: Gemma 4 through mlx-vlm, images and one prompt in, text out (free, or
constrained to a JSON Schema); and follow-up questions on a reasoning it did, reusing that
prompt's prefilled KV cache."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from PIL import Image

from service.models import mlx_runtime
from service.models.constrained import SchemaConstraints

Images = Image.Image | Sequence[Image.Image]

# The prompt keys of mlx-vlm's prepared inputs that run along the sequence.
_PER_TOKEN = ("mm_token_type_ids", "token_type_ids")


@dataclass
class _Prefix:
    """A prompt's KV cache after all its tokens but the last: the image, the detections, the
    question. Never written to: each use continues from a copy."""

    token_ids: list[int]
    cache: list[Any]
    nbytes: int


class PrefixCache:
    """The prefilled prompt prefixes of recent reasonings, least recently used dropped first.
    Its bytes are bounded by `max_bytes`, which the model host sets to what its memory budget
    leaves beside the models (None: no bound but `max_entries`). Changed on the model thread
    only; `nbytes` may be read from any thread."""

    def __init__(self, max_bytes: int | None = None, max_entries: int = 16) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[str, _Prefix] = OrderedDict()
        self._bytes = 0  # kept as a sum: read from other threads while entries change
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> _Prefix | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: _Prefix) -> None:
        old = self._entries.pop(key, None)
        self._bytes += entry.nbytes - (old.nbytes if old else 0)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._bytes -= self._entries.popitem(last=False)[1].nbytes
        self.shrink(self.max_bytes)

    def shrink(self, to_bytes: int | None) -> int:
        """Drop the oldest entries until at most `to_bytes` are held; returns bytes freed."""
        freed = 0
        if to_bytes is None:
            return 0
        while self._entries and self._bytes > max(to_bytes, 0):
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
            freed += entry.nbytes
        return freed

    def clear(self) -> int:
        return self.shrink(0)


@dataclass(frozen=True)
class Generated:
    text: str
    token_ids: list[int]
    cached_tokens: int  # prompt tokens not prefilled again: taken from a cached prefix


class GemmaReasoner:
    """One loaded checkpoint; greedy decoding, so the same input gives the same text."""

    streams = True  # `reason` takes `on_text`: the answer's pieces as they are generated

    def __init__(self, model: Any, processor: Any) -> None:
        self.model = model
        self.processor = processor
        self._specials = mlx_runtime.special_tokens(processor)
        self._lock = threading.Lock()
        self.prefixes = PrefixCache()
        self.constraints = SchemaConstraints(getattr(processor, "tokenizer", processor))

    def reason(
        self,
        image: Images,
        prompt: str,
        *,
        max_tokens: int = 64,
        schema: dict[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> str:
        """The answer to `prompt` over `image` (or several images, shown in order). With a
        `schema`, decoding is constrained to JSON for it; one that cannot be satisfied raises
        JobFailure("schema_unsatisfiable"). An answer cut short by `max_tokens` is returned as
        it is: the caller's validation says so. `on_text` is given each piece of the text as
        it is decoded (the same text either way)."""
        rgb = _rgb(image)
        chat = self.messages(prompt, images=len(rgb))
        return self.generate(rgb, chat, max_tokens=max_tokens, schema=schema, on_text=on_text).text

    def follow_up(
        self, image: Images, prompt: str, answer: str, question: str, *, max_tokens: int = 64
    ) -> str:
        """A further question on a reasoning done before over `image`: the model sees that
        exchange (`prompt`, as `reason` was given it, and its `answer`), then `question`. The
        earlier prompt's prefill is reused when it is still cached."""
        rgb = _rgb(image)
        chat = self.messages(prompt, answer, question, images=len(rgb))
        return self.generate(rgb, chat, max_tokens=max_tokens).text

    def messages(self, prompt: str, *turns: str, images: int = 1) -> list[dict[str, Any]]:
        """The chat: the images and `prompt` from the user, then model and user turns in turn."""
        first: list[dict[str, Any]] = [{"type": "image"} for _ in range(images)]
        first.append({"type": "text", "text": self._plain(prompt)})
        chat: list[dict[str, Any]] = [{"role": "user", "content": first}]
        for n, text in enumerate(turns):
            chat.append(
                {"role": "assistant" if n % 2 == 0 else "user", "content": self._plain(text)}
            )
        return chat

    def _plain(self, text: str) -> str:
        return mlx_runtime.plain_text(text, self._specials)

    def generate(
        self,
        image: Images,
        messages: list[dict[str, Any]],
        *,
        max_tokens: int,
        schema: dict[str, Any] | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Generated:
        """Greedy text for `messages` over `image` (or images, in the order the first message
        shows them), exactly as mlx-vlm's `generate` gives it; with a `schema`, through its
        logits processor constraining the text to that JSON Schema. The prompt's first message
        (the images and the question) is prefilled once and kept: a later chat that starts the
        same way continues from a copy of that cache."""
        from mlx_vlm import generate
        from mlx_vlm.generate.common import PromptCacheState
        from mlx_vlm.prompt_utils import apply_chat_template

        rgb = _rgb(image)
        count = len(rgb)
        # Compiled before any prefill: an unusable schema fails the job at once.
        constrain = {} if schema is None else {"logits_processors": [self._processor(schema)]}
        with self._lock:
            first = cast(
                str,
                apply_chat_template(
                    self.processor, self.model.config, messages[:1], num_images=count
                ),
            )
            key = _key(rgb, first)
            entry = self.prefixes.get(key)
            prepared = None  # the first message's inputs, when they were prepared here
            if entry is None:
                self.prefixes.misses += 1
                prepared = self._inputs(rgb, first)
                entry = self._prefill(dict(prepared))
                self.prefixes.put(key, entry)
            else:
                self.prefixes.hits += 1
            if len(messages) == 1:
                formatted, inputs = first, prepared or self._inputs(rgb, first)
            else:
                formatted = cast(
                    str,
                    apply_chat_template(
                        self.processor, self.model.config, messages, num_images=count
                    ),
                )
                inputs = self._inputs(rgb, formatted)
            state = PromptCacheState()
            state.update(entry.token_ids, _copy(self.model, entry.cache))
            result = (generate if on_text is None else _streaming(on_text))(
                self.model,
                self.processor,
                formatted,
                input_ids=inputs.pop("input_ids"),
                pixel_values=inputs.pop("pixel_values"),
                mask=inputs.pop("attention_mask"),
                prompt_cache_state=state,
                max_tokens=max_tokens,
                temperature=0.0,  # explicit: the checkpoint's generation_config may ask to sample
                skip_special_tokens=True,
                verbose=False,
                **constrain,
                **inputs,
            )
        return Generated(
            str(result.text),
            [int(t) for t in (result.token_ids or [])],
            int(getattr(result, "cached_tokens", 0) or 0),
        )

    def _processor(self, schema: dict[str, Any]) -> Any:
        # The llguidance tokenizer behind it is built once per reasoner, under the lock.
        with self._lock:
            return self.constraints.processor(schema)

    def _inputs(self, rgb: list[Image.Image], formatted: str) -> dict[str, Any]:
        """mlx-vlm's prepared inputs for the prompt, as its `generate` prepares them."""
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        return dict(
            prepare_inputs(
                self.processor,
                images=list(rgb),
                prompts=formatted,
                image_token_index=getattr(self.model.config, "image_token_index", None),
                add_special_tokens=should_add_special_tokens(
                    self.model.config.model_type, self.processor
                ),
            )
        )

    def _prefill(self, inputs: dict[str, Any]) -> _Prefix:
        """Prefill every token of the first message's prepared `inputs` but the last (the
        continuation needs one token to run), through mlx-vlm's own `generate_step` with no
        token to generate, and keep the cache."""
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step
        from mlx_vlm.models.cache import make_prompt_cache

        ids = inputs.pop("input_ids")
        pixels = inputs.pop("pixel_values")
        mask = inputs.pop("attention_mask")
        keep = ids.shape[1] - 1
        extra = {k: v[:, :keep] if k in _PER_TOKEN else v for k, v in inputs.items()}
        cache = make_prompt_cache(self.model.language_model)
        steps = generate_step(
            ids[:, :keep],
            self.model,
            pixels,
            None if mask is None else mask[:, :keep],
            max_tokens=0,
            prompt_cache=cache,
            temperature=0.0,
            **extra,
        )
        for _ in steps:
            pass
        mx.eval([c.state for c in cache])
        return _Prefix(ids[0, :keep].tolist(), cache, _cache_bytes(cache))


def _streaming(on_text: Callable[[str], None]) -> Callable[..., Any]:
    """mlx-vlm's `generate`, telling `on_text` each piece as it decodes. Its loop, as its
    `generate` runs it (same stopping criteria, drafts skipped, `clean_output` at the end), so
    the text and token ids are those `generate` gives."""
    from mlx_vlm.generate import dispatch

    def generate(model: Any, processor: Any, prompt: str, **kwargs: Any) -> Any:
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.stopping_criteria.reset(model.config.eos_token_id)
        text, last = "", None
        for response in dispatch.stream_generate(model, processor, prompt, **kwargs):
            if response.is_draft:
                continue
            text += response.text
            last = response
            if response.text:
                on_text(response.text)
        clean = getattr(processor, "clean_output", None)
        if callable(clean):
            text = clean(text)
        return dispatch.GenerationResult(
            text=text,
            token_ids=getattr(last, "token_ids", None),
            cached_tokens=getattr(last, "cached_tokens", 0),
        )

    return generate


def _rgb(image: Images) -> list[Image.Image]:
    """One image or several, as the RGB list the prompt shows in order."""
    images = [image] if isinstance(image, Image.Image) else list(image)
    if not images:
        raise ValueError("the reasoner needs at least one image")
    return [i if i.mode == "RGB" else i.convert("RGB") for i in images]


def _key(rgb: list[Image.Image], first: str) -> str:
    """Every image's pixels and size, in order, and the first message's formatted text name
    a prefix."""
    digest = hashlib.sha256()
    for image in rgb:
        digest.update(hashlib.sha256(image.tobytes()).digest())
        digest.update(f"{image.size}".encode())
    digest.update(first.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _copy(model: Any, cache: list[Any]) -> list[Any]:
    """A cache that continues from `cache` without writing into it: new arrays (MLX updates a
    cache's array objects in place), the same offsets."""
    import mlx.core as mx
    from mlx_vlm.models.cache import make_prompt_cache

    out = make_prompt_cache(model.language_model)
    for fresh, kept in zip(out, cache, strict=True):
        snapshot = kept.prefix_cache_snapshot()
        state = tuple(None if a is None else mx.array(a) for a in snapshot["state"])
        fresh.prefix_cache_restore({"state": state, "meta_state": snapshot["meta_state"]})
    return out


def _cache_bytes(cache: list[Any]) -> int:
    total = 0
    for entry in cache:
        for array in entry.prefix_cache_snapshot()["state"] or ():
            total += 0 if array is None else int(array.nbytes)
    return total


def load(path: Path) -> GemmaReasoner:
    model, processor = mlx_runtime.load(path)
    return GemmaReasoner(model, processor)
