"""The CPU BLAS setting: parsed and refused clearly; MKL or the bundled BLAS actually serving
MLX's GEMMs (as the dynamic linker itself reports) with numpy's results; the same greedy
output as the plain mlx-vlm calls; the choice in /v1/health."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.models import blas
from service.models.falcon import to_detections
from service.models.host import ModelHost

ROOT = Path(__file__).resolve().parents[1]
LINUX_X86 = sys.platform == "linux" and platform.machine() == "x86_64"
linux_x86 = pytest.mark.skipif(not LINUX_X86, reason="MKL and the bundled BLAS: Linux x86_64")

# Imports mlx after the hook, multiplies, and prints what served, with numpy's verdict.
GEMM = """
import json
import numpy as np
from service.models import blas
import mlx.core as mx
rng = np.random.default_rng(0)
a = rng.standard_normal((192, 160), dtype=np.float32)
b = rng.standard_normal((160, 224), dtype=np.float32)
ours = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
state = blas.measure()
print(json.dumps({"state": blas.describe(), "serving": blas.serving_library(),
                  "error": float(np.abs(ours - a @ b).max())}))
"""


def run_python(code: str, setting: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIP_", "MKL_", "LD_"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**clean, "AIP_CPU_BLAS": setting, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def linker_binding(stderr: str) -> str:
    """The library glibc bound libmlx.so's `cblas_sgemm` to, from its LD_DEBUG=bindings log."""
    for line in stderr.splitlines():
        if "binding file" in line and "libmlx.so" in line and "`cblas_sgemm'" in line:
            return line.split(" to ", 1)[1].split(" [", 1)[0]
    raise AssertionError("the dynamic linker never bound cblas_sgemm for libmlx.so")


def test_the_setting_parses_and_refuses_bad_values_with_the_choices() -> None:
    assert blas.parse_setting(None) == "auto" and blas.parse_setting("") == "auto"
    assert blas.parse_setting(" MKL ") == "mkl" and blas.parse_setting("bundled") == "bundled"
    with pytest.raises(ValueError, match=r"use auto .*, mkl .* or bundled"):
        blas.parse_setting("openblas")
    assert Settings.from_env({"AIP_CPU_BLAS": "bundled"}).cpu_blas == "bundled"
    assert Settings.from_env({}).cpu_blas == "auto"
    with pytest.raises(ValueError, match=r"^AIP_CPU_BLAS='fast': use auto"):
        Settings.from_env({"AIP_CPU_BLAS": "fast"})


def test_a_bad_setting_stops_the_mlx_import_with_the_reason() -> None:
    done = run_python("import service.models\nimport mlx.core", "fastest")
    assert done.returncode != 0
    assert "ValueError: AIP_CPU_BLAS='fastest': use auto" in done.stderr


@linux_x86
def test_mkl_required_but_missing_is_refused_with_what_to_do() -> None:
    code = (
        "from service.models import blas\n"
        "blas._mkl_library = lambda: None  # as where the wheel is not installed\n"
        "import mlx.core"
    )
    done = run_python(code, "mkl")
    assert done.returncode != 0
    expected = "AIP_CPU_BLAS=mkl but Intel MKL is not installed: `pip install mkl`"
    assert expected in done.stderr


@linux_x86
@pytest.mark.parametrize("setting", ["mkl", "auto"])
def test_mkl_serves_mlx_gemm_as_the_linker_binds_it_with_numpys_result(setting: str) -> None:
    done = run_python(GEMM, setting, LD_DEBUG="bindings")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    bound = Path(linker_binding(done.stderr)).resolve()
    assert bound.name == "libmkl_rt.so.3" and Path(report["serving"]).resolve() == bound
    state = report["state"]
    assert state["blas"] == "mkl" and state["library"] == "libmkl_rt.so.3"
    assert state["threading"] == blas.DEFAULT_LAYER.lower() and state["threads"] >= 1
    assert state["gflops"] > 0
    assert report["error"] < 1e-3  # float32 sums of 160 products of unit normals


@linux_x86
def test_auto_falls_back_to_the_bundled_blas_when_mkl_fails_to_load() -> None:
    done = run_python(GEMM, "auto", MKL_THREADING_LAYER="bogus", LD_DEBUG="bindings")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["state"]["blas"] == "bundled"
    assert "MKL did not load" in report["state"]["reason"] and "BOGUS" in report["state"]["reason"]
    assert Path(linker_binding(done.stderr)).parent.name == "mlx_cpu.libs"
    assert report["error"] < 1e-3


@linux_x86
def test_bundled_leaves_mlx_on_the_reference_blas_it_ships() -> None:
    done = run_python(GEMM, "bundled", LD_DEBUG="bindings")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    bound = Path(linker_binding(done.stderr))
    assert bound.parent.name == "mlx_cpu.libs" and bound.name.startswith("libblas")
    assert Path(report["serving"]).resolve() == bound.resolve()
    assert report["state"]["blas"] == "bundled" and report["state"]["library"] == bound.name
    assert report["error"] < 1e-3


@linux_x86
def test_an_explicit_thread_count_and_layer_are_respected() -> None:
    done = run_python(GEMM, "mkl", MKL_NUM_THREADS="1", MKL_THREADING_LAYER="sequential")
    assert done.returncode == 0, done.stderr[-2000:]
    state = json.loads(done.stdout)["state"]
    assert (state["threading"], state["threads"]) == ("sequential", 1)


def test_configure_is_idempotent_and_describe_never_imports() -> None:
    first = blas.configure()
    assert blas.configure("bundled") is first  # once per process: the first answer stands
    assert blas.describe() is not None and blas.describe()["setting"] == first.setting


def picture() -> Image.Image:
    pixels = np.random.default_rng(7).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_runtimes_give_the_plain_mlx_vlm_output_under_this_processs_blas(
    model_host: ModelHost,
) -> None:
    """The service's detector and reasoner against plain mlx-vlm calls, greedy, same inputs,
    same process and so the same BLAS (MKL here on Linux x86_64 unless set otherwise)."""
    from mlx_vlm import generate
    from mlx_vlm.prompt_utils import apply_chat_template

    if LINUX_X86 and not os.environ.get("AIP_CPU_BLAS"):
        assert (blas.describe() or {}).get("blas") == "mkl"
    image = picture()

    def both(detector: Any, reasoner: Any) -> dict[str, Any]:
        plain_boxes = {
            q: to_detections(
                detector.model.generate_perception(
                    detector.processor, image=image, query=q, max_new_tokens=64
                ),
                q,
                image.size,
            )
            for q in ("car", "a red roof")
        }
        prompt = apply_chat_template(
            reasoner.processor, reasoner.model.config, "Count cars", num_images=1
        )
        plain_text = generate(
            reasoner.model,
            reasoner.processor,
            prompt,
            image=[image],
            max_tokens=24,
            temperature=0.0,
            skip_special_tokens=True,
            verbose=False,
        ).text
        return {
            "boxes": ({q: detector.detect(image, q) for q in plain_boxes}, plain_boxes),
            "text": (reasoner.reason(image, "Count cars", max_tokens=24), plain_text),
        }

    out = asyncio.run(model_host.infer(both))
    ours, plain = out["boxes"]
    assert ours == plain and all(plain.values())  # the tiny detector emits one box per query
    assert out["text"][0] == out["text"][1]


def test_health_reports_the_blas_measured_at_host_start(serve: Any, settings: Settings) -> None:
    service = serve(settings)
    body = service.client.get("/v1/health").json()
    reported = body["cpu_blas"]
    assert reported == blas.describe()
    assert reported["gflops"] > 0
    if LINUX_X86:
        assert reported["library"]  # the file the linker bound, found after import


@linux_x86
def test_mkl_required_but_missing_fails_the_model_loads_with_the_reason_in_health(
    tmp_path: Path, tiny_checkpoints: tuple[Path, Path]
) -> None:
    code = f"""
import json, time
from pathlib import Path
from service.models import blas
blas._mkl_library = lambda: None  # as where the wheel is not installed
from fastapi.testclient import TestClient
from service.app import create_app
from service.config import Settings
detector, reasoner = {str(tiny_checkpoints[0])!r}, {str(tiny_checkpoints[1])!r}
settings = Settings(data_dir=Path({str(tmp_path / "data")!r}), detector=detector,
                    reasoner=reasoner, cpu_blas="mkl", inbox_enabled=False)
with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
    for _ in range(300):
        health = client.get("/v1/health")
        if health.json()["status"] != "loading":
            break
        time.sleep(0.1)
    print(json.dumps([health.status_code, health.json()]))
"""
    done = run_python(code, "mkl")
    assert done.returncode == 0, done.stderr[-2000:]
    status, body = json.loads(done.stdout.splitlines()[-1])
    assert status == 503 and body["status"] == "failed"
    assert all("Intel MKL is not installed: `pip install mkl`" in r for r in body["reasons"])
    assert "Traceback" not in done.stderr
