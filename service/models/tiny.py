"""Tiny random-weight checkpoints of the real architectures, in their real on-disk formats."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

MARKER = "tiny_checkpoint.json"  # written last: a folder without it is not a finished build
_FORMAT = 1

# Falcon Perception keeps its upstream special-token ids; they all fit a 271-token vocabulary.
_FALCON_SPECIALS = {
    0: "<|pad|>", 11: "<|end_of_text|>", 227: "<|image|>", 230: "<end_of_image>",
    240: "<|coord|>", 241: "<|size|>", 244: "<image_cls>", 245: "<image_reg_1>",
    246: "<image_reg_2>", 247: "<image_reg_3>", 248: "<image_reg_4>", 249: "<|start_of_query|>",
    250: "<|REF_SEG|>", 262: "<|seg|>", 263: "<|end_of_query|>",
}  # fmt: skip
_REF_SEG = 250
_FALCON_CONFIG = """{
  "model_type": "falcon_perception", "architectures": ["FalconPerception"],
  "dim": 64, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "ffn_dim": 128,
  "max_seq_len": 8192, "rope_theta": 10000.0, "norm_eps": 1e-05,
  "channel_size": 3, "spatial_patch_size": 16, "temporal_patch_size": 1,
  "eos_id": 11, "eos_token_id": [11], "img_id": 227, "img_end_id": 230, "coord_token_id": 240,
  "size_token_id": 241, "seg_token_id": 262, "image_cls_token_id": 244,
  "image_reg_1_token_id": 245, "image_reg_2_token_id": 246, "image_reg_3_token_id": 247,
  "image_reg_4_token_id": 248,
  "coord_enc_dim": 32, "coord_dec_dim": 64, "coord_out_dim": 256,
  "size_enc_dim": 32, "size_dec_dim": 64, "size_out_dim": 256,
  "do_segmentation": false, "segm_out_dim": 16, "num_segm_layers": 3
}"""
_FALCON_TOKENIZER_CONFIG = """{"tokenizer_class": "PreTrainedTokenizerFast",
  "model_max_length": 8192, "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>"}"""

# Gemma 4 takes 70/140/280/560/1120 soft tokens per image (E2B defaults to 280). The tiny one
# uses 70: its vision tower attends over 9 patches per soft token and MLX's CPU attention is
# slow. A side is then at most 3 x 70 = 210 patches, so 256 position rows cover any image.
_GEMMA_CONFIG = """{
  "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
  "hidden_size": 64, "tie_word_embeddings": true, "pad_token_id": 0,
  "vision_soft_tokens_per_image": 70, "audio_config": null,
  "text_config": {
    "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "global_head_dim": 32,
    "sliding_window": 128, "num_kv_shared_layers": 2, "use_double_wide_mlp": true,
    "hidden_size_per_layer_input": 8, "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-06,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072,
    "pad_token_id": 0, "tie_word_embeddings": true, "use_bidirectional_attention": "vision",
    "rope_parameters": {
      "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                         "rope_type": "proportional"},
      "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}
    }
  },
  "vision_config": {
    "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
    "head_dim": 16, "global_head_dim": 16, "patch_size": 16, "pooling_kernel_size": 3,
    "default_output_length": 70, "position_embedding_size": 256, "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"}
  }
}"""
# Every "*_token" here is a special token of the vocabulary, in this order (so <pad> is id 0).
_GEMMA_TOKENIZER_CONFIG = """{
  "tokenizer_class": "GemmaTokenizer", "backend": "tokenizers", "padding_side": "left",
  "processor_class": "Gemma4Processor", "model_max_length": 131072,
  "pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>",
  "mask_token": "<mask>", "extra_special_tokens": ["<|video|>"],
  "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
  "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
  "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>",
  "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": "<|\\"|>",
  "str_token": "<|tool_response>", "etr_token": "<tool_response|>",
  "stc_token": "<|tool_call>", "etc_token": "<tool_call|>",
  "std_token": "<|tool>", "etd_token": "<tool|>"
}"""
_GEMMA_PROCESSOR_CONFIG = """{
  "processor_class": "Gemma4Processor", "image_seq_length": 70, "audio_seq_length": 750,
  "audio_ms_per_token": 40,
  "image_processor": {
    "image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": true, "do_resize": true,
    "resample": 3, "do_rescale": true, "rescale_factor": 0.00392156862745098,
    "do_normalize": false, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
    "patch_size": 16, "max_soft_tokens": 70, "pooling_kernel_size": 3
  }
}"""
_GEMMA_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
{{- '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}
{%- if message['content'] is string -%}{{- message['content'] | trim -}}
{%- else -%}{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}
{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}
{%- endfor -%}{%- endif -%}{{- '<turn|>\\n' -}}
{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _marker(kind: str, seed: int, scale: int) -> dict[str, Any]:
    marker: dict[str, Any] = {"kind": kind, "seed": seed, "format": _FORMAT}
    if scale != 1:  # the default build keeps its original marker, so old builds stay valid
        marker["scale"] = scale
    return marker


def _is_complete(dest: Path, kind: str, seed: int, scale: int = 1) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker == _marker(kind, seed, scale))


def _build_atomically(
    dest: Path, kind: str, seed: int, write: Callable[[Path, int], None], scale: int = 1
) -> Path:
    """Write into a temp sibling, then rename it into place, so a crash never leaves a folder
    that looks finished; an existing finished build with the same seed is kept as it is."""
    if _is_complete(dest, kind, seed, scale):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        write(tmp, seed)
        _write_json(tmp / MARKER, _marker(kind, seed, scale))
        if not _is_complete(dest, kind, seed, scale):  # else a concurrent builder got there first
            if dest.exists():  # unfinished, or another seed: set it aside, never merge into it
                trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
                os.replace(dest, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
            os.replace(tmp, dest)
    except OSError:
        if not _is_complete(dest, kind, seed, scale):  # else a concurrent builder won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _randomized(model: Any, seed: int, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every parameter redrawn from a seeded numpy generator, so the bytes depend on the seed
    alone: 1/sqrt(fan-in) for matrices, 0.5 for tables mlx starts at a constant (golden RoPE
    frequencies, position tables); constant vectors (norm scales, sinks) are kept."""
    import numpy as np
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    out = {}
    for name, value in sorted(dict(tree_flatten(model.parameters())).items()):
        if name.endswith(skip):
            continue
        ref = np.array(value, dtype=np.float32)
        constant = not np.isfinite(ref).all() or ref.min() == ref.max()
        if constant and ref.ndim < 2:
            out[name] = ref
            continue
        std = 0.5 if constant else ref.shape[-1] ** -0.5
        out[name] = rng.standard_normal(ref.shape, dtype=np.float32) * np.float32(std)
    return out


def _falcon_tokenizer(pad_to: int = 0) -> Any:
    """Byte-level BPE without merges: every string encodes; specials sit at their ids.
    `pad_to` fills the vocabulary with unused pieces, so any id a model emits decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = iter(sorted(pre_tokenizers.ByteLevel.alphabet()))
    size = 256 + len(_FALCON_SPECIALS)
    vocab = {_FALCON_SPECIALS.get(i) or next(alphabet): i for i in range(size)}
    vocab.update({f"<unused{i}>": i for i in range(size, pad_to)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in _FALCON_SPECIALS.values()])
    return tok


def _gemma_tokenizer(pad_to: int = 0) -> tuple[Any, dict[str, int]]:
    """Gemma's own shape: BPE with byte fallback and '▁' for spaces; ASCII as single pieces;
    `pad_to` fills the vocabulary with unused pieces, so any id a model emits decodes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    conf = json.loads(_GEMMA_TOKENIZER_CONFIG)
    specials = [v for k, v in conf.items() if k.endswith("_token")] + conf["extra_special_tokens"]
    pieces = [*specials, *(f"<0x{b:02X}>" for b in range(256)), "▁", *map(chr, range(33, 127))]
    pieces += [f"<unused{i}>" for i in range(len(pieces), pad_to)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, vocab


def _wire_one_box(w: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Random weights almost never emit box tokens. Give four inputs orthogonal, dominant
    directions and point the output head so greedy decoding runs
    <|REF_SEG|> -> <|coord|> -> <|size|> -> <|seg|> -> eos: one box per query, whose centre
    and size still come from the random coord/size decoders."""
    for name, value in w.items():
        _wire_tensor(name, value, cfg)


def _wire_tensor(name: str, value: Any, cfg: dict[str, Any]) -> None:
    """The part of _wire_one_box that touches tensor `name` (in place), so a checkpoint
    written one tensor at a time is wired the same way."""
    big = 64.0  # dwarfs what the random layers add to the residual stream
    seg = cfg["seg_token_id"]
    if name == "language_model.model.embed_tokens.weight":
        value[_REF_SEG], value[seg] = 0.0, 0.0
        value[_REF_SEG, 0], value[seg, 3] = big, big
    for direction, kind in ((1, "coord"), (2, "size")):
        # <|coord|>/<|size|> inputs are Fourier encodings of the decoded values: a zero
        # frequency row makes one feature a constant 1, and its column carries the direction.
        if name == f"{kind}_encoder.embed.weight":
            value[0] = 0.0
        if name == f"{kind}_encoder.transform.weight":
            value[:, 0] = 0.0
            value[direction, 0] = big
    if name == "language_model.lm_head.weight":
        next_tokens = ("coord_token_id", "size_token_id", "seg_token_id", "eos_id")
        for direction, token in enumerate(next_tokens):
            value[cfg[token], direction] += 8.0


def _falcon_upstream_name(name: str, value: Any) -> tuple[str, Any]:
    """mlx-vlm's names back to the upstream (tiiuae) names its sanitize() expects."""
    import numpy as np

    for ours, upstream in (
        ("language_model.model.embed_tokens.", "tok_embeddings."),
        ("language_model.model.img_projector.", "img_projector."),
        ("language_model.model.norm.", "norm."),
        ("language_model.lm_head.", "output."),
        ("language_model.model.freqs_cis_golden", "freqs_cis_golden"),
    ):
        if name.startswith(ours):
            return upstream + name.removeprefix(ours), value
    if name.startswith("language_model.model.layers."):
        name = name.removeprefix("language_model.model.")
        name = name.replace(".self_attn.", ".attention.").replace(".mlp.", ".feed_forward.")
        if ".w13." in name:  # upstream interleaves gate and up rows; sanitize() splits them
            half = value.shape[0] // 2
            value = np.stack([value[:half], value[half:]], axis=1).reshape(value.shape)
    return name, value


def _falcon_config(scale: int) -> dict[str, Any]:
    cfg: dict[str, Any] = json.loads(_FALCON_CONFIG)
    cfg.update(dim=64 * scale, n_heads=2 * scale, n_kv_heads=scale, ffn_dim=128 * scale)
    return cfg


def _gemma_config(scale: int) -> dict[str, Any]:
    """The text model grows with `scale` (width and heads); the vision tower stays tiny."""
    cfg: dict[str, Any] = json.loads(_GEMMA_CONFIG)
    cfg["hidden_size"] = 64 * scale
    cfg["text_config"].update(
        hidden_size=64 * scale,
        intermediate_size=128 * scale,
        num_attention_heads=2 * scale,
        num_key_value_heads=scale,
    )
    return cfg


def _write_falcon(dest: Path, seed: int, scale: int = 1) -> None:
    import mlx.core as mx
    from mlx_vlm.models.falcon_perception import Model, ModelConfig

    tok = _falcon_tokenizer()
    cfg = {**_falcon_config(scale), "vocab_size": tok.get_vocab_size()}
    model = Model(ModelConfig.from_dict(dict(cfg)))
    weights = _randomized(model, seed, skip=("cos_1d", "sin_1d"))  # sanitize() recomputes these
    _wire_one_box(weights, cfg)
    upstream = dict(_falcon_upstream_name(k, v) for k, v in weights.items())
    arrays = {k: mx.array(v).astype(mx.bfloat16) for k, v in upstream.items()}
    mx.save_safetensors(str(dest / "model.safetensors"), arrays, metadata={"format": "pt"})
    _write_json(dest / "config.json", cfg)
    _write_json(dest / "tokenizer_config.json", json.loads(_FALCON_TOKENIZER_CONFIG))
    tok.save(str(dest / "tokenizer.json"))


def _write_gemma(dest: Path, seed: int, scale: int = 1) -> None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_vlm.models import gemma4
    from mlx_vlm.utils import save_weights, update_module_configs

    cfg = _gemma_config(scale)
    _write_gemma_files(dest, cfg, len(_gemma_tokenizer()[1]), 70, None)
    config = gemma4.ModelConfig.from_dict(cfg)
    model = gemma4.Model(update_module_configs(config, gemma4, cfg, ["text", "vision"]))
    weights = _randomized(model, seed)
    model.update(tree_unflatten([(k, mx.array(v).astype(mx.bfloat16)) for k, v in weights.items()]))
    save_weights(dest, model)  # mlx-vlm's converted layout: model.safetensors + index


# -- benchmark sizes: the real architectures at widths where weights, not Python, dominate ----

SIZES = ("tiny", "small", "e2b")
_REAL_HEADS = {  # Falcon Perception's coordinate and size heads at their published size
    "coord_enc_dim": 512, "coord_dec_dim": 8192, "coord_out_dim": 2048,
    "size_enc_dim": 512, "size_dec_dim": 8192, "size_out_dim": 2048, "vocab_size": 65536,
}  # fmt: skip
_FALCON_SIZES = {
    "small": {"dim": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "head_dim": 64,
              "ffn_dim": 768},
    "e2b": {"dim": 1024, "n_layers": 28, "n_heads": 16, "n_kv_heads": 8, "head_dim": 128,
            "ffn_dim": 3072},  # Falcon Perception 0.6B
}  # fmt: skip
# Gemma 4 layout: 4 sliding-window layers then a full one; the last layers share KV caches.
_GEMMA_SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "vocab": 40960,  # with the rest: about 90M parameters
        "soft_tokens": 70,
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
                 "layer_types": (["sliding_attention"] * 3 + ["full_attention"]) * 2,
                 "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 128,
                 "global_head_dim": 256, "num_kv_shared_layers": 4,
                 "hidden_size_per_layer_input": 64, "sliding_window": 512},
        "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 64,
                   "global_head_dim": 64, "position_embedding_size": 256},
    },
    "e2b": {  # the published Gemma 4 E2B shape
        "vocab": 262144,
        "soft_tokens": 280,
        "text": {"hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 35,
                 "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 7,
                 "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
                 "global_head_dim": 512, "num_kv_shared_layers": 20,
                 "hidden_size_per_layer_input": 256, "sliding_window": 512},
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16,
                   "num_attention_heads": 12, "num_key_value_heads": 12, "head_dim": 64,
                   "global_head_dim": 64, "position_embedding_size": 10240},
    },
}  # fmt: skip
_E2B_BITS = 4
_CHUNK = 1 << 24  # elements generated at once for a tensor too big to hold in float32
_SHARD_BYTES = 1 << 30


def _check_size(size: str) -> str:
    if size not in SIZES:
        raise ValueError(f"unknown checkpoint size {size!r}: choose one of {', '.join(SIZES)}")
    return size


def _random_blocks(value: Any, rng: Any) -> Iterator[Any]:
    """A parameter's random redraw, in row blocks when it is large. Only small tensors are
    evaluated (to keep constants such as norm scales); large ones are read for their shape
    alone, so the model's own lazy initial values are never materialised."""
    import numpy as np

    if value.ndim < 2 or value.size <= 1 << 16:
        ref = np.array(value, dtype=np.float32)
        constant = not np.isfinite(ref).all() or ref.min() == ref.max()
        if constant and ref.ndim < 2:
            yield ref
            return
        std = 0.5 if constant else ref.shape[-1] ** -0.5
        yield rng.standard_normal(ref.shape, dtype=np.float32) * np.float32(std)
        return
    shape = tuple(value.shape)
    row = int(np.prod(shape[1:]))
    step = max(1, _CHUNK // row)
    for start in range(0, shape[0], step):
        rows = min(step, shape[0] - start)
        block = rng.standard_normal((rows, *shape[1:]), dtype=np.float32)
        yield block * np.float32(shape[-1] ** -0.5)


def _write_streamed(
    dest: Path,
    model: Any,
    seed: int,
    *,
    name_of: Callable[[str, Any], tuple[str, Any]] = lambda n, v: (n, v),
    wire: Callable[[str, Any], None] = lambda n, v: None,
    skip: tuple[str, ...] = (),
    bits: int | None = None,
) -> None:
    """Random bfloat16 weights (or `bits`-bit quantised ones) written tensor by tensor into
    shards of about 1 GiB, so building never holds the whole model, let alone two copies."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules()) if bits else {}
    shard: dict[str, Any] = {}
    weight_map: dict[str, str] = {}
    total = used = 0

    def flush() -> None:
        nonlocal used
        if shard:
            file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            mx.save_safetensors(str(dest / file), shard, metadata={"format": "mlx"})
            weight_map.update(dict.fromkeys(shard, file))
            shard.clear()
            used = 0

    params: dict[str, Any] = dict(tree_flatten(model.parameters()))
    for name, value in sorted(params.items()):
        if name.endswith(skip):
            continue
        path = name.removesuffix(".weight")
        quantize = (
            bits is not None
            and name.endswith(".weight")
            and value.ndim == 2
            and value.shape[-1] % 64 == 0
            and hasattr(modules.get(path), "to_quantized")
        )
        parts: list[list[Any]] = [[], [], []]
        for block in _random_blocks(value, rng):
            if quantize:
                for part, array in zip(
                    parts, mx.quantize(mx.array(block), group_size=64, bits=bits), strict=True
                ):
                    part.append(array.astype(mx.bfloat16) if part is not parts[0] else array)
            else:
                parts[0].append(block)
            mx.eval(*(p[-1] for p in parts if p))
        if quantize:
            arrays = {
                name: mx.concatenate(parts[0]),
                f"{path}.scales": mx.concatenate(parts[1]),
                f"{path}.biases": mx.concatenate(parts[2]),
            }
        else:
            full = np.concatenate(parts[0]) if len(parts[0]) > 1 else parts[0][0]
            wire(name, full)
            out_name, full = name_of(name, full)
            arrays = {out_name: mx.array(full).astype(mx.bfloat16)}
        for key, array in arrays.items():
            mx.eval(array)
            shard[key] = array
            used += array.nbytes
            total += array.nbytes
        del parts, arrays
        if used >= _SHARD_BYTES:
            flush()
    flush()
    _write_json(
        dest / "model.safetensors.index.json",
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )


def _write_falcon_sized(dest: Path, seed: int, size: str) -> None:
    from mlx_vlm.models.falcon_perception import Model, ModelConfig

    cfg = {**json.loads(_FALCON_CONFIG), **_REAL_HEADS, **_FALCON_SIZES[size]}
    tok = _falcon_tokenizer(pad_to=cfg["vocab_size"])
    model = Model(ModelConfig.from_dict(dict(cfg)))
    _write_streamed(
        dest,
        model,
        seed,
        name_of=_falcon_upstream_name,
        wire=lambda name, value: _wire_tensor(name, value, cfg),
        skip=("cos_1d", "sin_1d"),  # sanitize() recomputes these
    )
    _write_json(dest / "config.json", cfg)
    _write_json(dest / "tokenizer_config.json", json.loads(_FALCON_TOKENIZER_CONFIG))
    tok.save(str(dest / "tokenizer.json"))


def _write_gemma_sized(dest: Path, seed: int, size: str) -> None:
    from mlx_vlm.models import gemma4
    from mlx_vlm.utils import update_module_configs

    spec = _GEMMA_SIZES[size]
    cfg = _gemma_config(1)
    cfg["text_config"].update(spec["text"])
    cfg["vision_config"].update(spec["vision"], default_output_length=spec["soft_tokens"])
    cfg["hidden_size"] = spec["text"]["hidden_size"]
    cfg["vision_soft_tokens_per_image"] = spec["soft_tokens"]
    bits = _E2B_BITS if size == "e2b" else None
    _write_gemma_files(dest, cfg, spec["vocab"], spec["soft_tokens"], bits)
    config = gemma4.ModelConfig.from_dict(cfg)
    model = gemma4.Model(update_module_configs(config, gemma4, cfg, ["text", "vision"]))
    _write_streamed(dest, model, seed, bits=bits)


def _write_gemma_files(
    dest: Path, cfg: dict[str, Any], vocab: int, soft_tokens: int, bits: int | None
) -> None:
    """Everything but the weights: config (vocabulary `vocab`, the tokenizer's ids for the
    specials), tokenizer, processor and template."""
    tok, ids = _gemma_tokenizer(pad_to=vocab)
    cfg["text_config"]["vocab_size"] = cfg["text_config"]["vocab_size_per_layer_input"] = vocab
    for field, token in (("image", "<|image|>"), ("boi", "<|image>"), ("eoi", "<image|>"),
                         ("audio", "<|audio|>"), ("boa", "<|audio>"), ("eoa", "<audio|>"),
                         ("video", "<|video|>"), ("bos", "<bos>")):  # fmt: skip
        cfg[f"{field}_token_id"] = ids[token]
    cfg.update(vocab_size=vocab, eos_token_id=[ids["<eos>"], ids["<turn|>"]])
    if bits:
        cfg["quantization"] = cfg["quantization_config"] = {"group_size": 64, "bits": bits}
    processor = json.loads(_GEMMA_PROCESSOR_CONFIG)
    processor["image_seq_length"] = processor["image_processor"]["max_soft_tokens"] = soft_tokens
    _write_json(dest / "config.json", cfg)
    _write_json(dest / "tokenizer_config.json", json.loads(_GEMMA_TOKENIZER_CONFIG))
    _write_json(dest / "processor_config.json", processor)
    _write_json(dest / "generation_config.json", {
        "bos_token_id": ids["<bos>"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": 0,
        "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95,
    })  # fmt: skip
    (dest / "chat_template.jinja").write_text(_GEMMA_TEMPLATE)
    tok.save(str(dest / "tokenizer.json"))


def build_detector(dest: Path, *, seed: int = 0, scale: int = 1, size: str = "tiny") -> Path:
    """A detection-only Falcon Perception checkpoint in the upstream (tiiuae) layout; `scale`
    multiplies the tiny one's width and heads; `size` small or e2b picks a benchmark shape
    (see SIZES) with the real vocabulary and coordinate/size heads."""
    if _check_size(size) != "tiny":
        return _build_atomically(
            Path(dest), f"falcon_perception-{size}", seed,
            lambda folder, seed: _write_falcon_sized(folder, seed, size),
        )  # fmt: skip

    def write(folder: Path, seed: int) -> None:
        _write_falcon(folder, seed, scale)

    return _build_atomically(Path(dest), "falcon_perception", seed, write, scale)


def build_reasoner(dest: Path, *, seed: int = 0, scale: int = 1, size: str = "tiny") -> Path:
    """A Gemma 4 (vision + text, no audio) checkpoint in mlx-vlm's converted layout; `scale`
    multiplies the tiny text model's width and heads; `size` small or e2b picks a benchmark
    shape (e2b: the published E2B shape, quantised to 4 bits)."""
    if _check_size(size) != "tiny":
        return _build_atomically(
            Path(dest), f"gemma4-{size}", seed,
            lambda folder, seed: _write_gemma_sized(folder, seed, size),
        )  # fmt: skip

    def write(folder: Path, seed: int) -> None:
        _write_gemma(folder, seed, scale)

    return _build_atomically(Path(dest), "gemma4", seed, write, scale)


def build_tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """Both tiny checkpoints under `root`, seed 0; a no-op when they are already there."""
    root = Path(root)
    return build_detector(root / "falcon-perception-tiny"), build_reasoner(root / "gemma-4-tiny")


def build_checkpoints(root: Path, size: str = "tiny") -> tuple[Path, Path]:
    """Both checkpoints of one size under `root` (detector, reasoner), seed 0; kept when built."""
    if _check_size(size) == "tiny":
        return build_tiny_checkpoints(root)
    root = Path(root)
    return (
        build_detector(root / f"falcon-perception-{size}", size=size),
        build_reasoner(root / f"gemma-4-{size}", size=size),
    )
