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


def test_two_server_baseline_gets_float32_weights_equal_to_ours(
    tiny_checkpoints: tuple[Path, Path], tmp_path: Path
) -> None:
    """On a CPU the two-server benchmark hands mlx_vlm.server float32 copies: loaded the plain
    way, they hold exactly the weights the service computes with after its CPU dtype rule."""
    import mlx.core as mx
    import mlx_vlm
    from mlx.utils import tree_flatten

    from bench.two_server_bench import float32_copy
    from service.models import mlx_runtime

    if not mlx_runtime.on_cpu():
        pytest.skip("the service keeps float32 weights on a CPU backend only")
    detector = tiny_checkpoints[0]
    copy = float32_copy(detector, tmp_path / "copy")
    assert float32_copy(detector, copy) == copy  # kept once built
    theirs = dict(tree_flatten(mlx_vlm.load(str(copy))[0].parameters()))
    ours = dict(tree_flatten(mlx_runtime.load(detector)[0].parameters()))
    assert theirs.keys() == ours.keys()
    assert {v.dtype for v in theirs.values()} == {mx.float32}
    assert all(mx.array_equal(theirs[k], ours[k]).item() for k in ours)


def test_two_server_memory_counts_a_process_and_its_children() -> None:
    """The memory row's reading (psutil, and the /proc fallback where it runs): a child holding
    64 MiB is counted under its parent, and both readings agree."""
    from bench import two_server_bench as bench

    # the child holds its bytes until its stdin (inherited from the parent) closes
    hold = "import sys; b = bytearray(64 << 20); print('ready', flush=True); sys.stdin.read()"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hold!r}])"
    parent = subprocess.Popen(
        [sys.executable, "-c", spawn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "ready"
        readings = [bench.tree_rss(parent.pid, bench.processes())]
        if Path("/proc/self/status").exists():
            readings.append(bench.tree_rss(parent.pid, bench._proc_processes()))
        for rss in readings:
            assert rss >= 64 << 20
        assert max(readings) - min(readings) < 16 << 20
    finally:
        assert parent.stdin is not None
        parent.stdin.close()
        parent.wait(timeout=30)


def test_postgres_bench_loops_drain_one_queue_from_two_processes(
    pg_url: str, tmp_path: Path
) -> None:
    """The PostgreSQL benchmark's candidates (PgQueue, raw psycopg, raw asyncpg), each in two
    spawned processes on one real server: every job ends succeeded, with one attempt and one
    result, none taken twice."""
    import psycopg

    from bench.postgres_bench import Pool, _enqueue

    pool = Pool(2)
    try:
        for kind in ("ours", "psycopg", "asyncpg"):
            _enqueue(pg_url, 30, kind)
            done, span = pool.drain(kind, pg_url, tmp_path, workers=2)
            assert done == 30 and span > 0, kind
    finally:
        pool.close()
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall() == [
            ("succeeded", 90)
        ]
        assert conn.execute("SELECT count(*) FROM results").fetchone() == (90,)
        attempts = "SELECT count(*), count(DISTINCT job_id) FROM job_attempts"
        assert conn.execute(attempts).fetchone() == (90, 90)
        assert conn.execute(attempts + " WHERE outcome = 'succeeded'").fetchone() == (90, 90)
