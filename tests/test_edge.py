"""The browser edge through the real app over HTTP: forged Host (DNS rebinding) and Origin
(cross-site) requests are refused before any route runs, listed origins get CORS answers, and
the token guards the docs, the OpenAPI document and health's details."""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from service.config import Settings
from tests.conftest import RunningService, gate_detector, make_image, make_settings

Serve = Callable[..., RunningService]
EVIL_HOST = {"Host": "evil.example:8765"}
EVIL_ORIGIN = {"Origin": "http://evil.example"}


def refused(response: httpx.Response, code: str, setting: str) -> bool:
    body = response.json()
    return response.status_code == 403 and body["code"] == code and setting in body["message"]


def test_a_forged_host_cannot_read_images_or_exports(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    job = service.submit().json()
    service.wait(job["id"])
    image = f"/v1/jobs/{job['id']}/image"
    assert service.client.get(image).status_code == 200  # the real address works
    for path in (image, "/v1/exports/jobs.csv", "/v1/jobs", f"/v1/jobs/{job['id']}"):
        forged = service.client.get(path, headers=EVIL_HOST)
        assert refused(forged, "host_not_allowed", "AIP_ALLOWED_HOSTS"), (path, forged.text)
        assert "evil.example" in forged.json()["message"]
    for host in ("evil.example", "127.0.0.1.evil.example", "localhost.evil.example:80", "a b"):
        assert service.client.get(image, headers={"Host": host}).status_code == 403, host


def test_loopback_names_and_addresses_are_admitted(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    port = service.port
    for host in (
        f"127.0.0.1:{port}",
        "127.0.0.1",
        "127.45.0.9:1234",
        f"localhost:{port}",
        "LOCALHOST.",
        "dash.localhost",
        f"[::1]:{port}",
        "[::1]",
        "[::ffff:127.0.0.1]:8765",
    ):
        response = service.client.get("/v1/jobs", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)


def test_a_foreign_origin_cannot_submit_cancel_unload_or_read(
    settings: Settings, serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = serve(settings)
    gate = gate_detector(service, monkeypatch)
    running = service.submit(queries="car").json()
    assert gate.inside.wait(timeout=60), "the worker never reached inference"
    queued = service.submit(queries="car").json()
    try:
        upload = service.client.post(
            "/v1/jobs",
            files={"image": ("x.png", make_image(fmt="PNG"), "image/png")},
            headers=EVIL_ORIGIN,
        )
        assert refused(upload, "origin_not_allowed", "AIP_ALLOWED_ORIGINS")
        assert "evil.example" in upload.json()["message"]
        cancel = service.client.post(f"/v1/jobs/{queued['id']}/cancel", headers=EVIL_ORIGIN)
        assert refused(cancel, "origin_not_allowed", "AIP_ALLOWED_ORIGINS")
        unload = service.client.post("/v1/models/detector/unload", headers=EVIL_ORIGIN)
        assert refused(unload, "origin_not_allowed", "AIP_ALLOWED_ORIGINS")
        for origin in ("null", f"http://localhost:{service.port + 1}", "https://127.0.0.1"):
            read = service.client.get("/v1/jobs", headers={"Origin": origin})
            assert refused(read, "origin_not_allowed", "AIP_ALLOWED_ORIGINS"), origin
        # None of the routes ran: no new job, the queued one still queued, the model loaded.
        jobs = service.client.get("/v1/jobs").json()["jobs"]
        assert sorted(j["id"] for j in jobs) == sorted([running["id"], queued["id"]])
        assert service.client.get(f"/v1/jobs/{queued['id']}").json()["status"] == "queued"
        roles = {m["role"]: m["state"] for m in service.client.get("/v1/models").json()["roles"]}
        assert roles["detector"] == "loaded"
    finally:
        gate.release.set()
    assert service.wait(queued["id"])["status"] == "succeeded"


def test_the_service_own_pages_may_call_it(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    port = service.port
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"):
        response = service.client.get("/v1/jobs", headers={"Origin": origin})
        assert response.status_code == 200, origin
        assert "access-control-allow-origin" not in response.headers
    via_name = service.client.get(
        "/v1/jobs", headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    )
    assert via_name.status_code == 200


def test_a_listed_origin_gets_cors_answers(tmp_path: Path, serve: Serve) -> None:
    listed = Settings.from_env({"AIP_ALLOWED_ORIGINS": "http://localhost:3000, https://dash.lan"})
    service = serve(make_settings(tmp_path, allowed_origins=listed.allowed_origins))
    origin = {"Origin": "http://localhost:3000"}
    read = service.client.get("/v1/jobs", headers=origin)
    assert read.status_code == 200
    assert read.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "Origin" in read.headers["vary"]
    created = service.client.post(
        "/v1/jobs", files={"image": ("x.jpg", make_image(), "image/jpeg")}, headers=origin
    )
    assert created.status_code == 202
    assert "Location" in created.headers["access-control-expose-headers"]
    assert service.client.get("/v1/jobs", headers={"Origin": "https://dash.lan"}).status_code == 200
    preflight = service.client.options(
        "/v1/jobs",
        headers={
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            "Access-Control-Request-Private-Network": "true",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    allowed = preflight.headers["access-control-allow-headers"].lower()
    assert {"authorization", "content-type", "idempotency-key"} <= {
        h.strip() for h in allowed.split(",")
    }
    assert int(preflight.headers["access-control-max-age"]) > 0
    assert preflight.headers["access-control-allow-private-network"] == "true"
    # Not listed: the preflight and the request itself are refused, in JSON.
    other = {"Origin": "http://localhost:3001", "Access-Control-Request-Method": "POST"}
    assert refused(service.client.options("/v1/jobs", headers=other), "origin_not_allowed", "")
    assert refused(
        service.client.get("/v1/jobs", headers={"Origin": "http://dash.lan"}),
        "origin_not_allowed",
        "AIP_ALLOWED_ORIGINS",
    )


def test_star_admits_every_origin_and_echoes_it(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, allowed_origins=("*",)))
    response = service.client.get("/v1/jobs", headers={"Origin": "https://anything.example"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://anything.example"
    # Origins decide who may call; the Host rule still stands on its own.
    assert service.client.get("/v1/jobs", headers=EVIL_HOST).status_code == 403


def test_another_site_cannot_embed_an_image_but_a_link_opens_it(
    settings: Settings, serve: Serve
) -> None:
    service = serve(settings)
    job = service.submit().json()
    image = f"/v1/jobs/{job['id']}/image"
    cross_site = {"Sec-Fetch-Site": "cross-site"}
    embedded = service.client.get(
        image, headers={**cross_site, "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    )
    assert refused(embedded, "origin_not_allowed", "AIP_ALLOWED_ORIGINS")
    opened = service.client.get(
        image, headers={**cross_site, "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"}
    )
    assert opened.status_code == 200
    typed = service.client.get(image, headers={"Sec-Fetch-Site": "none"})
    assert typed.status_code == 200


def test_allowed_hosts_admit_names_with_or_without_a_port(tmp_path: Path, serve: Serve) -> None:
    hosts = Settings.from_env({"AIP_ALLOWED_HOSTS": "aip.lan, box.example:9000, *.farm.lan"})
    service = serve(make_settings(tmp_path, allowed_hosts=hosts.allowed_hosts))
    for host in ("aip.lan", "AIP.lan:8765", "box.example:9000", "cam.farm.lan:1"):
        assert service.client.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
    for host in ("box.example:8765", "box.example", "farm.lan.evil", "aip.lan.evil"):
        response = service.client.get("/v1/jobs", headers={"Host": host})
        assert refused(response, "host_not_allowed", "AIP_ALLOWED_HOSTS"), host
    # A listed host's pages are same-origin when they call it under that name.
    page = service.client.get("/v1/jobs", headers={"Host": "aip.lan", "Origin": "https://aip.lan"})
    assert page.status_code == 200
    anyhost = serve(make_settings(tmp_path / "any", allowed_hosts=("*",)))
    assert anyhost.client.get("/v1/jobs", headers=EVIL_HOST).status_code == 200


def test_a_non_loopback_bind_admits_its_own_address(tmp_path: Path, serve: Serve) -> None:
    # Only the setting changes: the test server itself still listens on 127.0.0.1.
    one = serve(make_settings(tmp_path / "one", host="192.0.2.10", token="t"))
    assert one.client.get("/v1/jobs", headers={"Host": "192.0.2.10:8765"}).status_code == 200
    assert one.client.get("/v1/jobs", headers={"Host": "192.0.2.11:8765"}).status_code == 403
    every = serve(make_settings(tmp_path / "every", host="0.0.0.0", token="t"))
    for host in ("192.0.2.10:8765", "[2001:db8::1]:8765", socket.gethostname()):
        assert every.client.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
    assert every.client.get("/v1/jobs", headers=EVIL_HOST).status_code == 403


def test_with_a_token_the_same_edge_rules_hold(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, token="s3cret"))
    assert refused(
        service.client.get("/v1/jobs", headers=EVIL_HOST), "host_not_allowed", "AIP_ALLOWED_HOSTS"
    )
    assert refused(
        service.client.post("/v1/models/detector/unload", headers=EVIL_ORIGIN),
        "origin_not_allowed",
        "AIP_ALLOWED_ORIGINS",
    )
    roles = {m["role"]: m["state"] for m in service.client.get("/v1/models").json()["roles"]}
    assert roles["detector"] == "loaded"


@pytest.mark.parametrize("value", ["Bearer café".encode(), "Bearer 令牌".encode(), b"Bearer \xff"])
def test_a_non_ascii_bearer_token_is_401_not_500(
    tmp_path: Path, serve: Serve, value: bytes
) -> None:
    service = serve(make_settings(tmp_path, token="s3cret"))
    for path in ("/v1/jobs", "/v1/models", "/docs", "/openapi.json"):
        response = service.client.get(path, headers={"Authorization": value})
        assert response.status_code == 401 and response.json()["code"] == "unauthorized", path
    health = service.client.get("/v1/health", headers={"Authorization": value})
    assert health.status_code == 200 and set(health.json()) == {"status"}


def test_with_a_token_docs_openapi_and_health_details_need_it(tmp_path: Path, serve: Serve) -> None:
    service = serve(make_settings(tmp_path, token="s3cret"))
    anonymous = httpx.Client(base_url=service.url, timeout=30)
    try:
        for path in ("/docs", "/openapi.json"):
            response = anonymous.get(path)
            assert response.status_code == 401 and "AIP_TOKEN" in response.json()["message"]
            assert service.client.get(path).status_code == 200  # the bearer header opens it
        health = anonymous.get("/v1/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        full = service.client.get("/v1/health").json()
        assert {"version", "models", "queue", "worker"} <= set(full)

        # A browser cannot send the header: /docs asks for the token in a form, posted back.
        browser = {"Accept": "text/html"}
        page = anonymous.get("/docs", headers=browser)
        assert page.status_code == 401 and '<form method="post" action="/docs">' in page.text
        wrong = anonymous.post("/docs", data={"token": "nope"}, headers=browser)
        assert wrong.status_code == 401 and "not the one" in wrong.text
        assert anonymous.get("/docs").status_code == 401  # still no cookie
        signed_in = anonymous.post("/docs", data={"token": "s3cret"})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/docs"
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "s3cret" not in cookie
        # The cookie opens the docs and the document, and nothing else.
        assert anonymous.get("/docs").status_code == 200
        assert anonymous.get("/openapi.json").json()["info"]["title"]
        assert anonymous.get("/v1/jobs").status_code == 401
        assert set(anonymous.get("/v1/health").json()) == {"status"}
        forged = anonymous.get("/docs", cookies={"aip_docs": "0" * 64})
        assert forged.status_code == 401
    finally:
        anonymous.close()


def test_docs_load_every_asset_from_the_service_itself(settings: Settings, serve: Serve) -> None:
    service = serve(settings)
    page = service.client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    html = page.text
    assets = re.findall(r"<script[^>]*\ssrc=\"([^\"]+)\"", html) + re.findall(
        r"<link[^>]*\shref=\"([^\"]+)\"", html
    )
    assert len(assets) >= 3, html  # the script, the stylesheet, the icon
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), asset
        assert service.client.get(asset).status_code == 200, asset
    assert "http://" not in html and "https://" not in html
    assert '"validatorUrl": null' in html  # no online validator badge either
    schema = service.client.get("/openapi.json").json()
    assert schema["paths"] and "/docs" not in schema["paths"]
    assert service.client.get("/redoc").status_code == 404
    assert service.client.get("/docs/assets/missing.js").json()["code"] == "not_found"
