"""The benchmark entry point end to end: `python -m bench --quick --only queue` runs, prints
the table and writes its JSON and Markdown (no timing is asserted: speed belongs to the
benchmark, not to a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_queue_benchmark_prints_and_writes_the_table(tmp_path: Path) -> None:
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--only", "queue", "--out", str(out)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("queue ")]
    assert any("vs raw sqlite3" in line and "≥ 0.5" in line for line in lines), done.stdout
    assert any("vs Huey" in line and "≥ 1" in line for line in lines), done.stdout

    [table] = out.glob("bench-*.json")
    report = json.loads(table.read_text())
    assert report["mode"] == "quick"
    assert report["machine"]["cores"] >= 1 and report["machine"]["python"]
    rows = report["benchmarks"]["queue"]
    assert len(rows) == 3
    for row in rows:
        assert row["ours"] > 0 and row["baseline"] > 0 and row["target"]
        assert abs(row["ratio"] - row["ours"] / row["baseline"]) < 1e-9
        assert isinstance(row["met"], bool) and row["unit"] == "jobs/s"
    [markdown] = out.glob("bench-*.md")
    assert "| queue | enqueue + claim + complete, vs raw sqlite3 |" in markdown.read_text()


def test_unknown_benchmark_is_refused_with_the_choices(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--only", "nope", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "unknown benchmark nope" in done.stderr and "queue" in done.stderr
    assert not list(tmp_path.iterdir())


def test_streamed_quantised_build_loads_through_mlx_vlm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The e2b path (tensor by tensor, row blocks, shards, 4-bit) at the small shape, so it
    runs in seconds: both folders load, the reasoner's layers are quantised, every id the
    models can emit decodes, and the detector has the real vocabulary and heads."""
    from service.models import mlx_runtime, tiny

    monkeypatch.setitem(tiny._GEMMA_SIZES, "e2b", tiny._GEMMA_SIZES["small"])
    monkeypatch.setitem(tiny._FALCON_SIZES, "e2b", tiny._FALCON_SIZES["small"])
    monkeypatch.setattr(tiny, "_SHARD_BYTES", 32 << 20)  # several shards
    monkeypatch.setattr(tiny, "_CHUNK", 1 << 20)  # big tensors written in row blocks
    detector, reasoner = tiny.build_checkpoints(tmp_path, "e2b")

    index = json.loads((reasoner / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 1 and all((reasoner / f).is_file() for f in files)
    assert "language_model.model.embed_tokens.scales" in index["weight_map"]
    model, processor = mlx_runtime.load(reasoner)
    assert type(model.language_model.model.embed_tokens).__name__ == "QuantizedEmbedding"
    assert processor.tokenizer.vocab_size >= model.config.text_config.vocab_size == 40960

    config = json.loads((detector / "config.json").read_text())
    assert config["vocab_size"] == 65536 and config["coord_dec_dim"] == 8192
    weights = json.loads((detector / "model.safetensors.index.json").read_text())
    assert 70e6 < weights["metadata"]["total_size"] / 2 < 80e6  # bfloat16: ~75M parameters
    tok = json.loads((detector / "tokenizer.json").read_text())
    assert len(tok["model"]["vocab"]) == 65536


def test_unknown_checkpoint_size_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "models", "tiny", "--size", "huge", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "invalid choice: 'huge'" in done.stderr
