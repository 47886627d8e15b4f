"""Builds tiny random-weight checkpoints of the real architectures, in their real on-disk formats."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

MARKER = "tiny_checkpoint.json"  # written last: a folder without it is not a finished build
_FORMAT = 1

# Falcon Perception: the upstream special-token ids (they fit a 270-token vocabulary).
_FALCON_SPECIALS = {
    0: "<|pad|>", 11: "<|end_of_text|>", 227: "<|image|>", 230: "<end_of_image>",
    240: "<|coord|>", 241: "<|size|>", 244: "<image_cls>", 245: "<image_reg_1>",
    246: "<image_reg_2>", 247: "<image_reg_3>", 248: "<image_reg_4>", 249: "<|start_of_query|>",
    250: "<|REF_SEG|>", 262: "<|seg|>", 263: "<|end_of_query|>",
}
_FALCON_IDS = {
    "eos_id": 11, "img_id": 227, "img_end_id": 230, "coord_token_id": 240, "size_token_id": 241,
    "image_cls_token_id": 244, "image_reg_1_token_id": 245, "image_reg_2_token_id": 246,
    "image_reg_3_token_id": 247, "image_reg_4_token_id": 248, "seg_token_id": 262,
}
_REF_SEG = 250
# Gemma 4's smallest image budget (it takes 70/140/280/560/1120; E2B defaults to 280): the
# vision tower attends over 9 patches per soft token, and MLX's CPU attention is slow.
_SOFT_TOKENS = 70

_GEMMA_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>", "<|image>", "<image|>",
    "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>", "<|channel>", "<channel|>",
    "<|think|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
    "<tool_response|>", '<|"|>',
]
_GEMMA_NAMED = {
    "image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
    "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>",
    "sot_token": "<|turn>", "eot_token": "<turn|>", "soc_token": "<|channel>",
    "eoc_token": "<channel|>", "think_token": "<|think|>", "escape_token": '<|"|>',
    "str_token": "<|tool_response>", "etr_token": "<tool_response|>", "stc_token": "<|tool_call>",
    "etc_token": "<tool_call|>", "std_token": "<|tool>", "etd_token": "<tool|>",
}
_GEMMA_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<|turn>' + role + '\\n' -}}
{%- if message['content'] is string -%}{{- message['content'] | trim -}}
{%- else -%}{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{{- '<|image|>' -}}
{%- elif item['type'] == 'text' -%}{{- item['text'] | trim -}}{%- endif -%}
{%- endfor -%}{%- endif -%}
{{- '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}
"""


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _is_complete(dest: Path, kind: str, seed: int) -> bool:
    try:
        marker = json.loads((dest / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return bool(marker == {"kind": kind, "seed": seed, "format": _FORMAT})


def _build_atomically(dest: Path, kind: str, seed: int, write: Callable[[Path, int], None]) -> Path:
    """Write into a temp sibling, then rename it into place, so a crash never leaves a folder
    that looks finished; an existing finished build with the same seed is kept as it is."""
    dest = Path(dest)
    if _is_complete(dest, kind, seed):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is readable like any other
    try:
        write(tmp, seed)
        _write_json(tmp / MARKER, {"kind": kind, "seed": seed, "format": _FORMAT})
        if dest.exists():  # unfinished, or another seed: move it aside, never merge into it
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, dest)
    except OSError:
        if not _is_complete(dest, kind, seed):  # not a lost race with a concurrent builder
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _randomized(model: Any, seed: int, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every parameter redrawn from numpy with the spread mlx initialised it with, so the
    bytes depend on the seed only; constant ones (norm scales, sinks) are kept."""
    import numpy as np
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    out = {}
    for name, value in sorted(tree_flatten(model.parameters())):
        if name.endswith(skip):
            continue
        ref = np.array(value, dtype=np.float32)
        std = float(ref.std()) if np.isfinite(ref).all() else 0.0
        if std == 0.0 and name.endswith(("freqs_cis_golden", "position_embedding_table")):
            std = 0.5  # learned tables that mlx initialises to a constant
        out[name] = ref if std == 0.0 else rng.standard_normal(ref.shape).astype(np.float32) * std
    return out


def _byte_level_tokenizer(specials: dict[int, str]) -> tuple[Any, int]:
    """Byte-level BPE without merges: every string encodes; specials sit at the given ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    size = 256 + len(specials)
    alphabet = iter(sorted(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {specials[i] if i in specials else next(alphabet): i for i in range(size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials.values()])
    return tok, size


def _gemma_tokenizer() -> tuple[Any, dict[str, int]]:
    """Gemma's own shape: BPE with byte fallback and '▁' for spaces; ASCII as single pieces."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = _GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    pieces += [chr(c) for c in range(33, 127)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in _GEMMA_SPECIALS])
    return tok, vocab


def _falcon_config(vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "falcon_perception", "architectures": ["FalconPerception"],
        "dim": 64, "n_layers": 2, "n_heads": 2, "head_dim": 16, "n_kv_heads": 1, "ffn_dim": 128,
        "vocab_size": vocab_size, "max_seq_len": 8192, "rope_theta": 10000.0, "norm_eps": 1e-5,
        "channel_size": 3, "spatial_patch_size": 16, "temporal_patch_size": 1, **_FALCON_IDS,
        "coord_enc_dim": 32, "coord_dec_dim": 64, "coord_out_dim": 256,
        "size_enc_dim": 32, "size_dec_dim": 64, "size_out_dim": 256,
        "do_segmentation": False, "segm_out_dim": 16, "num_segm_layers": 3,
        "eos_token_id": [_FALCON_IDS["eos_id"]],
    }


def _wire_one_box(w: dict[str, Any], cfg: dict[str, Any]) -> None:
    """Random weights almost never emit box tokens. Give four inputs orthogonal, dominant
    directions and point the output head so greedy decoding runs
    <|REF_SEG|> -> <|coord|> -> <|size|> -> <|seg|> -> eos: one box per query, whose centre
    and size still come from the random coord/size decoders."""
    big = 64.0  # dwarfs what the two random layers add to the residual stream
    emb, head = w["language_model.model.embed_tokens.weight"], w["language_model.lm_head.weight"]
    emb[_REF_SEG], emb[cfg["seg_token_id"]] = 0.0, 0.0
    emb[_REF_SEG, 0], emb[cfg["seg_token_id"], 3] = big, big
    for direction, kind in ((1, "coord"), (2, "size")):
        # <|coord|>/<|size|> inputs are Fourier encodings of the decoded values: a zero
        # frequency row makes one feature a constant 1, and its column carries the direction.
        w[f"{kind}_encoder.embed.weight"][0] = 0.0
        w[f"{kind}_encoder.transform.weight"][:, 0] = 0.0
        w[f"{kind}_encoder.transform.weight"][direction, 0] = big
    for direction, token in enumerate(("coord_token_id", "size_token_id", "seg_token_id", "eos_id")):
        head[cfg[token], direction] += 8.0


def _falcon_upstream_name(name: str, value: Any) -> tuple[str, Any]:
    """mlx-vlm's names back to the upstream (tiiuae) names its sanitize() expects."""
    import numpy as np

    for mlx_prefix, upstream in (
        ("language_model.model.embed_tokens.", "tok_embeddings."),
        ("language_model.model.img_projector.", "img_projector."),
        ("language_model.model.norm.", "norm."),
        ("language_model.lm_head.", "output."),
        ("language_model.model.freqs_cis_golden", "freqs_cis_golden"),
    ):
        if name.startswith(mlx_prefix):
            return upstream + name[len(mlx_prefix):], value
    if name.startswith("language_model.model.layers."):
        name = name[len("language_model.model."):]
        name = name.replace(".self_attn.", ".attention.").replace(".mlp.", ".feed_forward.")
        if ".w13." in name:  # upstream interleaves gate and up rows; sanitize() splits them
            half = value.shape[0] // 2
            value = np.stack([value[:half], value[half:]], axis=1).reshape(value.shape)
    return name, value


def _write_falcon(dest: Path, seed: int) -> None:
    import mlx.core as mx
    from mlx_vlm.models.falcon_perception import Model, ModelConfig

    tok, vocab_size = _byte_level_tokenizer(_FALCON_SPECIALS)
    cfg = _falcon_config(vocab_size)
    weights = _randomized(Model(ModelConfig.from_dict(dict(cfg))), seed, skip=("cos_1d", "sin_1d"))
    _wire_one_box(weights, cfg)
    upstream = dict(_falcon_upstream_name(k, v) for k, v in weights.items())
    arrays = {k: mx.array(v).astype(mx.bfloat16) for k, v in upstream.items()}
    mx.save_safetensors(str(dest / "model.safetensors"), arrays, metadata={"format": "pt"})
    _write_json(dest / "config.json", cfg)
    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
        "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>",
    })


def _gemma_config(ids: dict[str, int]) -> dict[str, Any]:
    vocab = len(ids)
    text = {
        "model_type": "gemma4_text", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "global_head_dim": 32,  # must differ from head_dim, as in the real model
        "layer_types": ["sliding_attention", "full_attention"] * 2, "sliding_window": 128,
        "num_kv_shared_layers": 2, "use_double_wide_mlp": True, "hidden_size_per_layer_input": 8,
        "vocab_size": vocab, "vocab_size_per_layer_input": vocab, "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0, "max_position_embeddings": 131072, "pad_token_id": 0,
        "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
        "use_bidirectional_attention": "vision",
        "rope_parameters": {
            "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                               "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    }
    vision = {
        "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "head_dim": 16, "global_head_dim": 16, "patch_size": 16, "pooling_kernel_size": 3,
        "default_output_length": _SOFT_TOKENS, "rms_norm_eps": 1e-6,
        # The processor caps a side at 3 x 70 = 210 patches; 256 rows cover every position.
        "position_embedding_size": 256,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
    }
    eos = [ids["<eos>"], ids["<turn|>"]]
    return {
        "model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "audio_config": None,
        "image_token_id": ids["<|image|>"], "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"], "audio_token_id": ids["<|audio|>"],
        "boa_token_id": ids["<|audio>"], "eoa_token_id": ids["<audio|>"],
        "video_token_id": ids["<|video|>"], "vision_soft_tokens_per_image": _SOFT_TOKENS,
        "eos_token_id": eos, "pad_token_id": 0, "bos_token_id": ids["<bos>"],
        "vocab_size": vocab, "hidden_size": 64, "tie_word_embeddings": True,
    }


def _write_gemma(dest: Path, seed: int) -> None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten
    from mlx_vlm.models import gemma4
    from mlx_vlm.utils import save_weights, update_module_configs

    tok, ids = _gemma_tokenizer()
    cfg = _gemma_config(ids)
    config = gemma4.ModelConfig.from_dict(cfg)
    model = gemma4.Model(update_module_configs(config, gemma4, cfg, ["text", "vision"]))
    weights = _randomized(model, seed)
    model.update(tree_unflatten([(k, mx.array(v).astype(mx.bfloat16)) for k, v in weights.items()]))
    save_weights(dest, model)
    _write_json(dest / "config.json", cfg)
    tok.save(str(dest / "tokenizer.json"))
    (dest / "chat_template.jinja").write_text(_GEMMA_TEMPLATE)
    _write_json(dest / "tokenizer_config.json", {
        "tokenizer_class": "GemmaTokenizer", "backend": "tokenizers", "padding_side": "left",
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "mask_token": "<mask>", "extra_special_tokens": ["<|video|>"], "model_max_length": 131072,
        "processor_class": "Gemma4Processor", **_GEMMA_NAMED,
    })
    image = {
        "image_processor_type": "Gemma4ImageProcessor", "do_convert_rgb": True,
        "do_normalize": False, "do_rescale": True, "do_resize": True, "rescale_factor": 1 / 255,
        "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "resample": 3,
        "patch_size": 16, "max_soft_tokens": _SOFT_TOKENS, "pooling_kernel_size": 3,
    }
    _write_json(dest / "processor_config.json", {
        "processor_class": "Gemma4Processor", "image_seq_length": _SOFT_TOKENS, "audio_seq_length": 750,
        "audio_ms_per_token": 40, "image_processor": image,
    })
    _write_json(dest / "generation_config.json", {
        "bos_token_id": ids["<bos>"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": 0,
        "do_sample": True, "temperature": 1.0, "top_k": 64, "top_p": 0.95,
    })


def build_detector(dest: Path, *, seed: int = 0) -> Path:
    """A detection-only Falcon Perception checkpoint in the upstream layout."""
    return _build_atomically(Path(dest), "falcon_perception", seed, _write_falcon)


def build_reasoner(dest: Path, *, seed: int = 0) -> Path:
    """A Gemma 4 (vision + text, no audio) checkpoint in the mlx-vlm converted layout."""
    return _build_atomically(Path(dest), "gemma4", seed, _write_gemma)


def build_tiny_checkpoints(root: Path) -> tuple[Path, Path]:
    """Both tiny checkpoints under `root`; a no-op when they are already there."""
    root = Path(root)
    return (
        build_detector(root / "falcon-perception-tiny"),
        build_reasoner(root / "gemma-4-tiny"),
    )
