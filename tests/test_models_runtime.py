"""The model runtimes on tiny random-weight checkpoints of the real architectures, loaded the
way real checkpoints are: plain `mlx_vlm.load`, real processors, real tokenizers."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from PIL import Image

from service.detection import Detection, encode_mask
from service.models import falcon, gemma, mlx_runtime, tiny

SIZES = [(640, 480), (8, 8), (2000, 50), (50, 2000)]


def image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def fingerprint(folder: Path) -> dict[str, tuple[int, str]]:
    return {
        p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.iterdir())
    }


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def saved_weights(folder: Path) -> dict[str, Any]:
    return dict(mx.load(str(folder / "model.safetensors")))  # type: ignore[arg-type]


def parameters(model: Any) -> dict[str, Any]:
    return dict(tree_flatten(model.parameters()))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny.build_tiny_checkpoints(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def detector(tiny_checkpoints: tuple[Path, Path]) -> falcon.FalconDetector:
    return falcon.load(tiny_checkpoints[0])


@pytest.fixture(scope="session")
def reasoner(tiny_checkpoints: tuple[Path, Path]) -> gemma.GemmaReasoner:
    return gemma.load(tiny_checkpoints[1])


# --- the checkpoints -------------------------------------------------------------------------


def test_checkpoints_carry_the_real_files_and_token_ids(
    tiny_checkpoints: tuple[Path, Path],
) -> None:
    det_dir, rsn_dir = tiny_checkpoints
    det_cfg = json.loads((det_dir / "config.json").read_text())
    assert det_cfg["model_type"] == "falcon_perception" and det_cfg["do_segmentation"] is False
    vocab = json.loads((det_dir / "tokenizer.json").read_text())["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    assert by_id[det_cfg["img_id"]] == "<|image|>"
    assert by_id[det_cfg["coord_token_id"]] == "<|coord|>"
    assert by_id[det_cfg["eos_id"]] == "<|end_of_text|>"

    rsn_cfg = json.loads((rsn_dir / "config.json").read_text())
    text = rsn_cfg["text_config"]
    assert rsn_cfg["model_type"] == "gemma4" and rsn_cfg["audio_config"] is None
    assert text["global_head_dim"] != text["head_dim"]  # mlx-vlm's Gemma 4 needs both
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "processor_config.json",
        "generation_config.json",
        "model.safetensors.index.json",
    ):
        assert (rsn_dir / name).is_file(), name


@pytest.mark.filterwarnings("ignore:At least one mel filter")  # mlx-vlm's unused audio defaults
def test_both_load_through_plain_mlx_vlm_load_with_the_saved_values(
    tiny_checkpoints: tuple[Path, Path],
) -> None:
    import mlx_vlm

    det_dir, rsn_dir = tiny_checkpoints
    model, processor = mlx_vlm.load(str(det_dir))
    assert type(processor).__name__ == "FalconPerceptionProcessor"
    params = parameters(model)
    saved = saved_weights(det_dir)  # upstream names and row order
    w13 = saved["layers.1.feed_forward.w13.weight"]
    assert mx.array_equal(
        mx.concatenate([w13[0::2], w13[1::2]]),
        params["language_model.model.layers.1.mlp.w13.weight"],
    )
    assert mx.array_equal(saved["output.weight"], params["language_model.lm_head.weight"])

    model, processor = mlx_vlm.load(str(rsn_dir))
    assert type(processor).__name__ == "Gemma4Processor"
    params = parameters(model)
    saved = saved_weights(rsn_dir)  # mlx-vlm's own names
    assert set(saved) == set(params)
    assert all(mx.array_equal(saved[k], params[k]) for k in saved)
    heads = [layer.self_attn.head_dim for layer in model.language_model.model.layers]
    assert heads == [16, 32, 16, 32]  # sliding and full attention layers really differ


def test_tokenizers_encode_any_text_and_agree_with_the_configs(
    detector: falcon.FalconDetector, reasoner: gemma.GemmaReasoner
) -> None:
    cfg, tok = detector.model.config, detector.processor.tokenizer
    query = "ünï 🛰️ 屋根\ttabs"
    ids = tok.encode(
        f"<|image|>Find:<|start_of_query|>{query}<|REF_SEG|>", add_special_tokens=False
    )
    assert ids[0] == cfg.img_id and ids.count(cfg.img_id) == 1
    assert ids[-1] == tok.convert_tokens_to_ids("<|REF_SEG|>")
    assert tok.decode(tok.encode(query, add_special_tokens=False)) == query

    tok = reasoner.processor.tokenizer
    text = "roofs ünïcode 🛰️ 屋根\ttabs"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    config = reasoner.model.config
    assert reasoner.processor.image_token_id == config.image_token_id
    assert tok.convert_tokens_to_ids(reasoner.processor.boi_token) == config.boi_token_id
    assert tok.convert_tokens_to_ids(reasoner.processor.eoi_token) == config.eoi_token_id


def test_runtimes_hold_float32_weights_on_cpu(
    detector: falcon.FalconDetector, reasoner: gemma.GemmaReasoner
) -> None:
    if not mlx_runtime.on_cpu():
        pytest.skip("the float32 rule applies to the CPU backend only")
    for model in (detector.model, reasoner.model):
        dtypes = {v.dtype for v in parameters(model).values()}
        assert mx.bfloat16 not in dtypes and mx.float32 in dtypes


def test_seeds_give_different_weights_and_a_seed_gives_the_same_bytes(
    tiny_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    det_dir, rsn_dir = tiny_checkpoints
    other_det = tiny.build_detector(tmp_path / "det", seed=1)
    other_rsn = tiny.build_reasoner(tmp_path / "rsn", seed=1)
    assert weights_digest(other_det) != weights_digest(det_dir)
    assert weights_digest(other_rsn) != weights_digest(rsn_dir)
    # The same folder rebuilt with seed 0 is replaced, byte for byte like the session's.
    assert weights_digest(tiny.build_detector(other_det, seed=0)) == weights_digest(det_dir)


def test_building_twice_is_a_no_op(tiny_checkpoints: tuple[Path, Path]) -> None:
    before = [fingerprint(folder) for folder in tiny_checkpoints]
    again = tiny.build_tiny_checkpoints(tiny_checkpoints[0].parent)
    assert again == tiny_checkpoints
    assert [fingerprint(folder) for folder in again] == before


def test_half_built_folders_do_not_count_as_complete(
    tiny_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    crashed_tmp = tmp_path / ".gemma-4-tiny.tmp-crashed"
    crashed_tmp.mkdir()
    (crashed_tmp / "config.json").write_text("{}")
    unfinished = tmp_path / "falcon-perception-tiny"  # e.g. an interrupted copy: no marker
    unfinished.mkdir()
    (unfinished / "config.json").write_text("{}")

    det_dir, rsn_dir = tiny.build_tiny_checkpoints(tmp_path)

    assert det_dir == unfinished and (det_dir / tiny.MARKER).is_file()
    assert weights_digest(det_dir) == weights_digest(tiny_checkpoints[0])
    assert weights_digest(rsn_dir) == weights_digest(tiny_checkpoints[1])


# --- the detector ----------------------------------------------------------------------------


def test_to_detections_converts_centre_size_to_clipped_pixel_boxes() -> None:
    raw = [
        {"xy": {"x": 0.5, "y": 0.5}, "hw": {"h": 0.2, "w": 0.5}},
        {"xy": {"x": 0.95, "y": 0.05}, "hw": {"h": 0.3, "w": 0.2}},  # over the top-right edge
    ]
    first, edge = falcon.to_detections(raw, "roof", (200, 100))
    assert first.box == pytest.approx((50.0, 40.0, 150.0, 60.0))  # w from 'w', h from 'h'
    assert edge.box == pytest.approx((170.0, 0.0, 200.0, 20.0))
    assert first.label == "roof" and first.image_size == (200, 100) and first.mask is None
    assert falcon.to_detections([], "roof", (200, 100)) == []


def test_to_detections_encodes_masks_once() -> None:
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:20, 30:60] = True
    raw = [{"xy": {"x": 0.2, "y": 0.15}, "hw": {"h": 0.1, "w": 0.15}, "mask": mx.array(mask)}]
    (det,) = falcon.to_detections(raw, "car", (200, 100))
    assert det.mask == encode_mask(mask)
    assert det.mask["size"] == [100, 200] and sum(det.mask["counts"]) == 100 * 200
    assert sum(det.mask["counts"][1::2]) == int(mask.sum())


@pytest.mark.slow
@pytest.mark.parametrize("size", [*SIZES, (4000, 3000)])
def test_detect_returns_detections_in_image_pixels(
    detector: falcon.FalconDetector, size: tuple[int, int]
) -> None:
    found = detector.detect(image(*size), "a red car")
    # The tiny detector is wired to emit exactly one box per query.
    assert len(found) == 1 and isinstance(found[0], Detection)
    (det,) = found
    x1, y1, x2, y2 = det.box
    assert det.label == "a red car" and det.image_size == size
    assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]


@pytest.mark.slow
def test_detect_keeps_no_state_between_calls(detector: falcon.FalconDetector) -> None:
    small = image(320, 240)
    first = detector.detect(small, "tree")
    detector.detect(image(1200, 300, seed=1), "ünïcode query 🛰️ " * 10)
    assert detector.detect(small, "tree", max_new_tokens=1) == []  # stopped before a box
    assert detector.detect(small, "tree") == first


@pytest.mark.slow
def test_special_tokens_typed_into_queries_and_prompts_are_plain_text(
    detector: falcon.FalconDetector, reasoner: gemma.GemmaReasoner
) -> None:
    # An extra image placeholder would otherwise make both processors fail.
    query = "car <|image|><|REF_SEG|>"
    (det,) = detector.detect(image(64, 48), query)
    assert det.label == query  # stored as the caller wrote it
    assert isinstance(reasoner.reason(image(64, 48), "<|image|> <turn|>why?", max_tokens=4), str)


@pytest.mark.slow
def test_a_thread_that_ran_inference_can_end_without_aborting_the_process(
    tiny_checkpoints: tuple[Path, Path],
) -> None:
    script = f"""
import threading
from pathlib import Path
from PIL import Image
from service.models import falcon, gemma, mlx_runtime

def work():
    picture = Image.new("RGB", (32, 32))
    falcon.load(Path({str(tiny_checkpoints[0])!r})).detect(picture, "x")
    gemma.load(Path({str(tiny_checkpoints[1])!r})).reason(picture, "x", max_tokens=2)
    mlx_runtime.release_thread_streams()

thread = threading.Thread(target=work)
thread.start()
thread.join()
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_plain_text_removes_special_tokens_even_when_nested() -> None:
    specials = ("<|image|>", "<turn|>")
    assert mlx_runtime.plain_text("a <|im<|image|>age|> b<turn|>", specials) == "a  b"
    assert mlx_runtime.plain_text("no tokens <here>", specials) == "no tokens <here>"


# --- the reasoner ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("size", [(640, 480), (8, 8), (2000, 50), (4000, 3000)])
def test_reason_returns_text_for_any_image_size(
    reasoner: gemma.GemmaReasoner, size: tuple[int, int]
) -> None:
    text = reasoner.reason(image(*size), "What is notable here? ünï 🛰️", max_tokens=16)
    assert isinstance(text, str)
    assert not any(marker in text for marker in ("<|image|>", "<turn|>", "<eos>"))


@pytest.mark.slow
def test_reason_uses_the_checkpoint_chat_template_and_greedy_decoding(
    reasoner: gemma.GemmaReasoner,
) -> None:
    from mlx_vlm.prompt_utils import apply_chat_template

    prompt = apply_chat_template(
        reasoner.processor, reasoner.model.config, "Count cars", num_images=1
    )
    assert prompt == "<bos><|turn>user\n<|image|>Count cars<turn|>\n<|turn>model\n"
    picture = image(320, 240, seed=3)
    # generation_config.json asks to sample; reason() must decode greedily regardless.
    runs: list[Any] = [reasoner.reason(picture, "Count cars", max_tokens=24) for _ in range(2)]
    assert runs[0] == runs[1]


def half_precision_model() -> Any:
    """A tiny model in bfloat16: a plain layer and a 4-bit one (its scales are bfloat16)."""
    import mlx.nn as nn

    model = nn.Sequential(nn.Linear(64, 64), nn.QuantizedLinear(64, 64, group_size=64, bits=4))
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    return model


def test_the_cpu_backend_casts_half_precision_weights_to_float32() -> None:
    if not mlx_runtime.on_cpu():
        pytest.skip("this machine's MLX computes on a GPU")
    model = half_precision_model()
    assert mlx_runtime.use_fast_dtype(model) == 2  # the plain layer's weight and bias
    dtypes = {name: value.dtype for name, value in parameters(model).items()}
    assert dtypes["layers.0.weight"] == dtypes["layers.0.bias"] == mx.float32
    assert dtypes["layers.1.scales"] == mx.bfloat16  # quantised layers keep theirs
    assert dtypes["layers.1.weight"] == mx.uint32


def test_a_gpu_backend_keeps_bfloat16_whatever_the_platform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rule reads MLX's default device, not the operating system: a stand-in GPU default
    device on this machine keeps every bfloat16 weight."""
    model = half_precision_model()
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert not mlx_runtime.on_cpu()
    assert mlx_runtime.use_fast_dtype(model) == 0
    assert {v.dtype for v in parameters(model).values()} == {mx.bfloat16, mx.uint32}
