"""Job options and their layers: parse_options alone, resolve over a small in-memory profile
store, then the real HTTP app and the real inbox watcher (models that answer at once: these
tests are about parameters, not inference)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.errors import InvalidInput, NotFound
from service.jobspec import MAX_REDACT, parse_options, resolve
from service.params import JobParams
from tests.conftest import RunningService, make_image
from tests.test_cli import run
from tests.test_inbox import inbox_jobs, ledger, until

SCHEMA = {
    "type": "object",
    "properties": {"count": {"type": "integer", "minimum": 0}},
    "required": ["count"],
}


# -- parse_options ----------------------------------------------------------------------------


def test_options_are_normalized_from_form_text_and_json_values() -> None:
    form = parse_options(
        {
            "queries": ["car, truck", "car"],
            "prompt": "  How many?  ",
            "tiling": '{"size": 512, "overlap": 64}',
            "set_of_marks": "TRUE",
            "response_schema": json.dumps(SCHEMA),
            "redact": "person, license plate,person",
            "keep_original": "0",
            "detect_max_tokens": " 12 ",
            "profile": " survey ",
        },
        "the request",
    )
    assert form == {
        "queries": ["car", "truck"],
        "prompt": "How many?",
        "tiling": {"size": 512, "overlap": 64, "full_frame": True},
        "set_of_marks": True,
        "response_schema": SCHEMA,
        "redact": ["person", "license plate"],
        "keep_original": False,
        "detect_max_tokens": 12,
        "profile": "survey",
    }
    values = {
        "tiling": "off",
        "set_of_marks": False,
        "response_schema": SCHEMA,
        "redact": ["face"],
        "keep_original": True,
        "reason_max_tokens": 7,
    }
    assert parse_options(values, "x") == values
    assert parse_options(form, "again") == form  # normalized options stay as they are


def test_absent_blank_and_empty_options_are_left_out() -> None:
    blank: dict[str, Any] = {
        "queries": [],
        "prompt": "  ",
        "tiling": "",
        "redact": None,
        "profile": "",
    }
    assert parse_options(blank, "the request") == {}
    # An explicit empty list of classes says "redact nothing", over a profile's list.
    assert parse_options({"redact": []}, "the request") == {"redact": []}


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ({"tiling": "sometimes"}, "invalid_tiling"),
        ({"tiling": {"size": 64, "overlap": 0}}, "invalid_tiling"),
        ({"tiling": '{"size": 1024, "overlap": 900}'}, "invalid_tiling"),
        ({"response_schema": "{not json"}, "invalid_schema"),
        ({"response_schema": {"type": "no-such-type"}}, "invalid_schema"),
        ({"response_schema": [1, 2]}, "invalid_schema"),
        ({"redact": [f"class {i}" for i in range(MAX_REDACT + 1)]}, "invalid_redact"),
        ({"redact": ["x" * 201]}, "invalid_redact"),
        ({"redact": [3]}, "invalid_redact"),
        ({"set_of_marks": "yes"}, "invalid_option"),
        ({"set_of_marks": 1}, "invalid_option"),
        ({"keep_original": "nope"}, "invalid_option"),
        ({"detect_max_tokens": "0"}, "invalid_option"),
        ({"reason_max_tokens": 2.5}, "invalid_option"),
        ({"reason_max_tokens": True}, "invalid_option"),
        ({"queries": [1]}, "invalid_queries"),
        ({"prompt": 5}, "invalid_prompt"),
        ({"profile": 5}, "invalid_profile"),
        ({"colour": "red"}, "unknown_fields"),
    ],
)
def test_each_option_refuses_what_it_cannot_take(raw: dict[str, Any], code: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_options(raw, "site/aip.json")
    assert caught.value.code == code and caught.value.status == 422
    assert caught.value.message.startswith("site/aip.json: ")


# -- resolve -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    name: str
    params: dict[str, Any]


@dataclass
class Store:
    """Profiles by name; `default` names the default one. `refuse`: answer an unknown name
    with NotFound, as the database store does, instead of None."""

    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    default_name: str | None = None
    refuse: bool = False

    async def get(self, name: str) -> Stored | None:
        if name not in self.profiles:
            if self.refuse:
                raise NotFound(f"no profile {name}", code="unknown_profile")
            return None
        return Stored(name, self.profiles[name])

    async def default(self) -> Stored | None:
        return await self.get(self.default_name) if self.default_name else None


def _resolve(
    given: dict[str, Any],
    folder: dict[str, Any] | None = None,
    store: Store | None = None,
    **settings: Any,
) -> JobParams:
    checked = parse_options(given, "the request")
    folder_checked = parse_options(folder, "aip.json") if folder is not None else None
    return asyncio.run(resolve(checked, folder_checked, store, Settings(**settings)))


LAYERED = Store(
    {
        "base": {
            "queries": ["roof"],
            "prompt": "Base?",
            "tiling": "off",
            "redact": ["person"],
            "set_of_marks": True,
            "response_schema": SCHEMA,
            "keep_original": False,
            "detect_max_tokens": 9,
        },
        "site": {"queries": ["boat"], "prompt": "Site?"},
        "job": {"queries": ["car"], "prompt": "Job?"},
    },
    default_name="base",
)


def test_each_option_comes_from_the_highest_layer_that_sets_it() -> None:
    settings = {"default_queries": ("tree",), "default_prompt": "Settings?"}
    only_settings = _resolve({}, None, Store(), **settings)
    assert (only_settings.queries, only_settings.prompt) == (("tree",), "Settings?")
    assert only_settings.tiling == "auto" and only_settings.redact == ()
    assert only_settings.keep_original and not only_settings.set_of_marks
    assert only_settings.profile is None and not only_settings.plan

    profile = _resolve({}, None, LAYERED, **settings)  # the default profile over the settings
    assert profile.profile == "base" and profile.queries == ("roof",)
    assert profile.prompt == "Base?" and profile.tiling == "off" and profile.redact == ("person",)
    assert profile.set_of_marks and not profile.keep_original
    assert profile.response_schema == SCHEMA and profile.detect_max_tokens == 9

    folder = {"prompt": "Folder?", "tiling": "auto", "redact": "face"}
    over_profile = _resolve({}, folder, LAYERED, **settings)
    assert over_profile.profile == "base" and over_profile.queries == ("roof",)
    assert over_profile.prompt == "Folder?" and over_profile.tiling == "auto"
    assert over_profile.redact == ("face",) and over_profile.set_of_marks

    job = {"prompt": "Job?", "redact": [], "keep_original": "true"}
    over_folder = _resolve(job, folder, LAYERED, **settings)
    assert over_folder.prompt == "Job?" and over_folder.tiling == "auto"
    assert over_folder.redact == () and over_folder.keep_original
    assert over_folder.queries == ("roof",) and over_folder.detect_max_tokens == 9


def test_the_profile_the_job_names_beats_the_folders_which_beats_the_default() -> None:
    assert _resolve({"profile": "job"}, {"profile": "site"}, LAYERED).queries == ("car",)
    assert _resolve({}, {"profile": "site"}, LAYERED).queries == ("boat",)
    named = _resolve({"profile": "site"}, None, LAYERED)
    # A named profile replaces the default one: nothing of "base" remains.
    assert named.profile == "site" and named.redact == () and named.tiling == "auto"
    assert _resolve({}, {}, LAYERED).profile == "base"


def test_no_queries_from_any_layer_plans_them() -> None:
    planned = _resolve({"prompt": "What is here?"}, {"tiling": "off"}, Store(), default_queries=())
    assert planned.plan and planned.queries == () and planned.tiling == "off"
    assert planned.to_dict()["plan"] is True
    assert JobParams.from_dict(planned.to_dict()) == planned
    # Classes to redact are still looked for, though nothing else was asked for.
    redacting = _resolve({"redact": "person"}, None, None, default_queries=())
    assert redacting.plan and redacting.detection_queries == ("person",)
    for queries_from in (
        _resolve({}, None, None, default_queries=("car",)),
        _resolve({}, None, LAYERED, default_queries=()),
        _resolve({}, {"queries": "boat"}, Store(), default_queries=()),
    ):
        assert not queries_from.plan and queries_from.queries


@pytest.mark.parametrize("refuse", [False, True], ids=["none", "not-found"])
def test_an_unknown_profile_is_a_422(refuse: bool) -> None:
    store = Store(LAYERED.profiles, refuse=refuse)
    for given, folder in (({"profile": "nope"}, None), ({}, {"profile": "nope"})):
        with pytest.raises(InvalidInput) as caught:
            _resolve(given, folder, store)
        assert caught.value.code == "unknown_profile" and caught.value.status == 422
    with pytest.raises(InvalidInput) as caught:
        _resolve({"profile": "base"}, None, None)  # no store: no profile can be found
    assert caught.value.code == "unknown_profile"


def test_limits_apply_to_the_merged_options() -> None:
    with pytest.raises(InvalidInput) as caught:
        _resolve({"detect_max_tokens": 500}, None, None, detect_max_tokens=64)
    assert caught.value.code == "invalid_option"
    too_many = {"queries": ",".join(f"q{i}" for i in range(5))}
    with pytest.raises(InvalidInput) as caught:
        _resolve({}, too_many, None, max_queries=4)
    assert caught.value.code == "invalid_queries"
    # A profile stored before a check existed is checked again when it is used.
    with pytest.raises(InvalidInput) as caught:
        _resolve({"profile": "old"}, None, Store({"old": {"tiling": "sideways"}}))
    assert caught.value.code == "invalid_tiling" and "profile old" in caught.value.message


def test_profile_none_opts_out_of_the_default() -> None:
    plain = _resolve({"profile": "none", "queries": "car"}, {"profile": "site"}, LAYERED)
    assert plain.profile is None and plain.queries == ("car",)
    assert _resolve({}, {"profile": "none"}, LAYERED).profile is None


def test_a_profiles_or_folders_token_limit_is_capped_by_the_ceiling() -> None:
    greedy = Store({"greedy": {"queries": "car", "detect_max_tokens": 9999}})
    capped = _resolve({"profile": "greedy"}, None, greedy, detect_max_tokens=64)
    assert capped.detect_max_tokens == 64
    folder = _resolve({}, {"reason_max_tokens": 9999}, Store(), reason_max_tokens=32)
    assert folder.reason_max_tokens == 32
    lower = _resolve({"profile": "greedy"}, {"detect_max_tokens": 8}, greedy)
    assert lower.detect_max_tokens == 8


# -- the HTTP app and the inbox -------------------------------------------------------------------


@pytest.fixture
def quick_service(
    inbox_service: Callable[..., RunningService], tmp_path: Path
) -> Callable[..., RunningService]:
    """The inbox tests' services (models that answer at once), allowed to read `shared/`."""
    return lambda **changes: inbox_service(**{"allowed_dirs": (tmp_path / "shared",), **changes})


def _profile(service: RunningService, name: str, params: dict[str, Any]) -> None:
    response = service.client.put(f"/v1/profiles/{name}", json={"params": params})
    assert response.status_code in (200, 201), response.text


def test_the_options_of_an_upload_and_of_a_path_are_resolved_and_stored(
    quick_service: Callable[..., RunningService], tmp_path: Path
) -> None:
    service = quick_service()
    _profile(
        service,
        "survey",
        {
            "queries": ["roof"],
            "prompt": "Roofs?",
            "tiling": "off",
            "redact": ["person"],
            "set_of_marks": True,
        },
    )
    form: dict[str, Any] = {
        "profile": "survey",
        "tiling": '{"size": 512, "overlap": 64, "full_frame": false}',
        "response_schema": json.dumps(SCHEMA),
        "redact": ["car", "person, face"],
        "keep_original": "false",
        "detect_max_tokens": "7",
    }
    upload = service.submit(name="site.jpg", **form)
    assert upload.status_code == 202, upload.text
    job = service.client.get(f"/v1/jobs/{upload.json()['id']}").json()
    params = job["params"]
    assert job["input"]["name"] == "site.jpg" and params["detect_max_tokens"] == 7
    assert params["profile"] == "survey" and params["queries"] == ["roof"]
    assert params["prompt"] == "Roofs?" and params["set_of_marks"] is True
    assert params["tiling"] == {"size": 512, "overlap": 64, "full_frame": False}
    assert params["response_schema"] == SCHEMA and params["redact"] == ["car", "person", "face"]
    assert params["keep_original"] is False and params["plan"] is False

    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "frame.png").write_bytes(make_image(60, 40, fmt="PNG"))
    body = {
        "path": str(tmp_path / "shared" / "frame.png"),
        "queries": ["boat"],
        "tiling": {"size": 256, "overlap": 0},
        "response_schema": SCHEMA,
        "redact": ["face"],
        "set_of_marks": False,
        "keep_original": True,
    }
    by_path = service.client.post("/v1/jobs", json=body)
    assert by_path.status_code == 202, by_path.text
    params = service.client.get(f"/v1/jobs/{by_path.json()['id']}").json()["params"]
    assert params["queries"] == ["boat"] and params["redact"] == ["face"]
    assert params["tiling"] == {"size": 256, "overlap": 0, "full_frame": True}
    assert params["set_of_marks"] is False and "profile" not in params


def test_the_default_profile_and_planning_over_http(
    quick_service: Callable[..., RunningService],
) -> None:
    service = quick_service(default_queries=())
    planned = service.submit(prompt="What is here?").json()
    params = service.client.get(f"/v1/jobs/{planned['id']}").json()["params"]
    assert params["plan"] is True and params["queries"] == []
    _profile(service, "counting", {"queries": ["sheep"], "tiling": "off"})
    assert service.client.put("/v1/profiles/counting/default").status_code == 200
    job = service.submit(image=make_image(50, 50), tiling="auto").json()
    params = service.client.get(f"/v1/jobs/{job['id']}").json()["params"]
    assert params["profile"] == "counting" and params["queries"] == ["sheep"]
    assert params["tiling"] == "auto" and params["plan"] is False


@pytest.mark.parametrize(
    ("form", "code"),
    [
        ({"profile": "no-such-profile"}, "unknown_profile"),
        ({"tiling": "{broken"}, "invalid_tiling"),
        ({"response_schema": '{"type": 12}'}, "invalid_schema"),
        ({"redact": [f"c{i}" for i in range(MAX_REDACT + 1)]}, "invalid_redact"),
        ({"set_of_marks": "maybe"}, "invalid_option"),
        ({"keep_original": "2"}, "invalid_option"),
    ],
)
def test_refused_options_are_422_with_a_code(
    quick_service: Callable[..., RunningService], form: dict[str, Any], code: str
) -> None:
    service = quick_service()
    response = service.submit(**form)
    assert response.status_code == 422, response.text
    assert set(response.json()) == {"code", "message"} and response.json()["code"] == code
    assert service.client.get("/v1/jobs").json()["jobs"] == []


def test_the_same_key_with_other_options_is_another_request(
    quick_service: Callable[..., RunningService],
) -> None:
    service = quick_service()
    image, key = make_image(30, 30), {"Idempotency-Key": "k1"}

    def post(**form: Any) -> Any:
        files = {"image": ("a.jpg", image, "image/jpeg")}
        return service.client.post("/v1/jobs", files=files, data=form, headers=key)

    first = post(queries="car", redact="person")
    assert first.status_code == 202
    assert post(queries="car", redact="person").status_code == 200
    assert post(queries="car", redact="face").status_code == 409


def test_inbox_folders_and_sidecars_choose_profiles_and_options(
    quick_service: Callable[..., RunningService],
) -> None:
    service = quick_service()
    _profile(service, "fields", {"queries": ["cow"], "tiling": "off", "prompt": "Herd?"})
    _profile(service, "roads", {"queries": ["car"], "redact": ["license plate"]})
    _profile(service, "anywhere", {"queries": ["tree"]})
    assert service.client.put("/v1/profiles/anywhere/default").status_code == 200
    inbox = service.settings.inbox_dir
    (inbox / "farm").mkdir(parents=True)
    (inbox / "farm" / "aip.json").write_text(
        json.dumps(
            {
                "profile": "fields",
                "set_of_marks": True,
                "redact": "person",
                "tiling": {"size": 640, "overlap": 32},
            }
        )
    )
    (inbox / "farm" / "lane.json").write_text(
        json.dumps({"profile": "roads", "keep_original": False})
    )
    (inbox / "farm" / "field.jpg").write_bytes(make_image(40, 40))
    (inbox / "farm" / "lane.jpg").write_bytes(make_image(41, 40))
    (inbox / "loose.jpg").write_bytes(make_image(42, 40))
    (inbox / "lost").mkdir()
    (inbox / "lost" / "aip.json").write_text(json.dumps({"profile": "gone"}))
    (inbox / "lost" / "x.jpg").write_bytes(make_image(43, 40))
    (inbox / "bad").mkdir()
    (inbox / "bad" / "aip.json").write_text(json.dumps({"set_of_marks": "often"}))
    (inbox / "bad" / "y.jpg").write_bytes(make_image(44, 40))
    failed = inbox / "failed"
    until(lambda: len(ledger(service.settings)) == 5, what="five files handled")
    until(lambda: len(list(failed.glob("*/*.error.json"))) == 2, what="two refusals filed")
    jobs = {j["source_path"]: j["params"] for j in inbox_jobs(service)}
    field_params, lane, loose = jobs["farm/field.jpg"], jobs["farm/lane.jpg"], jobs["loose.jpg"]
    # The folder's profile under the folder's own options.
    assert field_params["profile"] == "fields" and field_params["queries"] == ["cow"]
    assert field_params["prompt"] == "Herd?" and field_params["set_of_marks"] is True
    assert field_params["tiling"] == {"size": 640, "overlap": 32, "full_frame": True}
    assert field_params["redact"] == ["person"] and field_params["keep_original"] is True
    # The sidecar's profile replaces the folder's; the folder's options still apply over it.
    assert lane["profile"] == "roads" and lane["queries"] == ["car"]
    assert lane["redact"] == ["person"] and lane["keep_original"] is False
    assert lane["set_of_marks"] is True and lane["prompt"] != "Herd?"
    assert loose["profile"] == "anywhere" and loose["queries"] == ["tree"]
    refused = {
        name: json.loads((failed / name).read_text())["code"]
        for name in ("lost/x.jpg.error.json", "bad/y.jpg.error.json")
    }
    assert refused == {
        "lost/x.jpg.error.json": "unknown_profile",
        "bad/y.jpg.error.json": "invalid_params",
    }


def test_aip_submit_flags_reach_the_job(
    quick_service: Callable[..., RunningService],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    service = quick_service()
    _profile(service, "survey", {"queries": ["roof"], "set_of_marks": False})
    image, schema = tmp_path / "frame.jpg", tmp_path / "answer.json"
    image.write_bytes(make_image(48, 48))
    schema.write_text(json.dumps(SCHEMA))
    flags = [
        "--profile",
        "survey",
        "--tiling",
        '{"size": 300, "overlap": 30}',
        "--schema",
        str(schema),
        "--redact",
        "person",
        "--redact",
        "car",
        "--set-of-marks",
        "--no-keep-original",
        "--json",
        "--url",
        service.url,
    ]
    code, out, _ = run(capsys, "submit", str(image), *flags)
    assert code == 0, out
    job = service.client.get(f"/v1/jobs/{json.loads(out)['id']}").json()
    assert job["params"] == {
        **job["params"],
        "profile": "survey",
        "queries": ["roof"],
        "tiling": {"size": 300, "overlap": 30, "full_frame": True},
        "response_schema": SCHEMA,
        "redact": ["person", "car"],
        "set_of_marks": True,
        "keep_original": False,
    }
    code, _, err = run(
        capsys, "submit", str(image), "--schema", str(tmp_path / "none.json"), "--url", service.url
    )
    assert code == 1 and "cannot read the schema file" in err
    code, out, _ = run(
        capsys, "submit", str(image), "--tiling", "sideways", "--json", "--url", service.url
    )
    assert code == 1 and json.loads(out)["error"]["code"] == "invalid_tiling"
