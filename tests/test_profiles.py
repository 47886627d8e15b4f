"""Named profiles: the store on a real SQLite file (CRUD, the shipped ones seeded and read-only,
one default at most), the shipped definitions themselves, the /v1/profiles routes through the
real app, and `aip profiles` against a running service."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from service.errors import Conflict, InvalidInput, NotFound
from service.jobspec import parse_options
from service.profiles import BUILTINS
from service.store.migrate import migrate
from service.store.profiles import Profiles, Shipped
from service.store.queue import Queue
from service.store.reads import Reads
from service.store.sqlite import read_engine
from service.structured import check_schema
from service.worker import Worker
from tests.conftest import RunningService, make_settings
from tests.test_cli import aip, run

T = TypeVar("T")
Serve = Callable[..., RunningService]
PARAMS = {"queries": ["boat", "pier"], "prompt": "How many boats are moored?", "tiling": "off"}


def with_store(db: Path, scenario: Callable[[Profiles], Awaitable[T]]) -> T:
    """`scenario` on a Profiles over a freshly migrated (or existing) database file."""
    migrate(db)

    async def main() -> T:
        queue = await Queue.open(db)
        reads = Reads(read_engine(db))
        try:
            return await scenario(Profiles(queue, reads))
        finally:
            await reads.close()
            await queue.close()

    return asyncio.run(main())


def defaults(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT name FROM profiles WHERE is_default = 1")]


# -- the store ----------------------------------------------------------------------------------


def test_put_get_list_replace_and_delete(tmp_path: Path) -> None:
    async def scenario(profiles: Profiles) -> None:
        made, created = await profiles.put("harbour", "  boats\tand piers ", PARAMS)
        assert created and made.description == "boats and piers" and made.params == PARAMS
        assert not made.builtin and not made.is_default
        assert await profiles.get("harbour") == made
        assert [p.name for p in await profiles.list()] == ["harbour"]

        changed, created = await profiles.put("harbour", "boats", {"queries": ["boat"]})
        assert not created
        assert changed.params == {"queries": ["boat"]} and changed.description == "boats"
        assert changed.created_at == made.created_at and changed.updated_at >= made.updated_at
        assert (await profiles.get("harbour")).params == {"queries": ["boat"]}

        await profiles.put("a-first", "", {})
        assert [p.name for p in await profiles.list()] == ["a-first", "harbour"]
        await profiles.delete("harbour")
        with pytest.raises(NotFound) as missing:
            await profiles.get("harbour")
        assert missing.value.code == "unknown_profile"
        with pytest.raises(NotFound):
            await profiles.delete("harbour")
        for bad in ("Harbour", "-x", "a b", "a/b", "x" * 65, ""):
            with pytest.raises(InvalidInput) as refused:
                await profiles.put(bad, "", {})
            assert refused.value.code == "invalid_profile_name"
        with pytest.raises(InvalidInput) as long:
            await profiles.put("wordy", "x" * 301, {})
        assert long.value.code == "invalid_description"

    with_store(tmp_path / "aip.db", scenario)


def test_shipped_profiles_are_seeded_read_only_and_kept_up_to_date(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def first(profiles: Profiles) -> None:
        assert await profiles.seed(BUILTINS) == []
        listed = {p.name: p for p in await profiles.list()}
        assert set(listed) == set(BUILTINS)
        for name, shipped in BUILTINS.items():
            assert listed[name].builtin and listed[name].params == shipped.params
            with pytest.raises(Conflict) as refused:
                await profiles.put(name, "mine", {"queries": ["car"]})
            assert refused.value.code == "builtin_profile" and refused.value.status == 409
            with pytest.raises(Conflict):
                await profiles.delete(name)
        await profiles.set_default("livestock")  # a shipped one may be the default
        now = await profiles.list()
        assert await profiles.seed(BUILTINS) == []  # the next start: nothing changes
        assert await profiles.list() == now

    with_store(db, first)
    before = with_store(db, lambda p: p.get("livestock"))

    changed = {
        **BUILTINS,
        "livestock": Shipped("Cattle only", {"queries": ["cow"]}),
        "new-one": Shipped("new", {"tiling": "off"}),
    }
    del changed["roof-solar"]

    async def upgrade(profiles: Profiles) -> None:
        await profiles.put("new-one", "a user's own, made before it shipped", {"prompt": "hi"})
        assert await profiles.seed(changed) == ["new-one"]
        stock = await profiles.get("livestock")
        assert stock.params == {"queries": ["cow"]} and stock.description == "Cattle only"
        assert stock.builtin and stock.is_default  # the default mark survives the rewrite
        assert stock.created_at == before.created_at and stock.updated_at >= before.updated_at
        mine = await profiles.get("new-one")
        assert not mine.builtin and mine.params == {"prompt": "hi"}
        # No longer shipped: the user's own now, kept and editable.
        dropped = await profiles.get("roof-solar")
        assert not dropped.builtin
        await profiles.put("roof-solar", "edited", {"queries": ["roof"]})
        await profiles.delete("roof-solar")

    with_store(db, upgrade)


def test_at_most_one_default(tmp_path: Path) -> None:
    db = tmp_path / "aip.db"

    async def scenario(profiles: Profiles) -> None:
        assert await profiles.default() is None
        for name in ("one", "two", "three"):
            await profiles.put(name, "", {"queries": [name]})
        assert (await profiles.set_default("one")) is not None
        chosen = await profiles.set_default("two")
        assert chosen is not None and chosen.name == "two" and chosen.is_default
        assert defaults(db) == ["two"]
        default = await profiles.default()
        assert default is not None and default.name == "two"
        assert [p.name for p in await profiles.list() if p.is_default] == ["two"]
        # Replacing the default's params keeps it the default.
        await profiles.put("two", "", {"queries": ["again"]})
        assert defaults(db) == ["two"]
        # Clearing one that is not the default leaves the default alone.
        assert await profiles.clear_default("one") is False and defaults(db) == ["two"]
        assert await profiles.clear_default("two") is True and defaults(db) == []
        with pytest.raises(NotFound):
            await profiles.set_default("nope")
        with pytest.raises(NotFound):
            await profiles.clear_default("nope")
        await profiles.set_default("three")
        assert await profiles.set_default(None) is None and defaults(db) == []
        await profiles.set_default("three")
        await profiles.delete("three")  # the default goes with it
        assert await profiles.default() is None

    with_store(db, scenario)
    # The database holds the rule too, whoever writes.
    with sqlite3.connect(db) as conn, pytest.raises(sqlite3.IntegrityError):
        conn.execute("UPDATE profiles SET is_default = 1")


# -- the shipped definitions --------------------------------------------------------------------


def _bounded(schema: dict[str, Any], where: str = "$") -> list[str]:
    """Where `schema` lets a small model write without end: an unbounded number, free text,
    an open object, an endless array."""
    kind = schema.get("type")
    found = []
    if kind == "object":
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is not False:
            found.append(f"{where}: open object")
        if set(schema.get("required", [])) != set(properties):
            found.append(f"{where}: optional fields")
        for key, sub in properties.items():
            found += _bounded(sub, f"{where}.{key}")
    elif kind == "array":
        if "maxItems" not in schema:
            found.append(f"{where}: no maxItems")
        found += _bounded(schema.get("items", {}), f"{where}[]")
    elif kind == "integer":
        if "minimum" not in schema or "maximum" not in schema:
            found.append(f"{where}: no range")
    elif kind == "string":
        if "enum" not in schema and "maxLength" not in schema:
            found.append(f"{where}: free text")
    elif kind != "boolean":
        found.append(f"{where}: type {kind!r}")
    return found


@pytest.mark.parametrize("name", sorted(BUILTINS))
def test_each_shipped_profile_is_valid_bounded_and_compiles(name: str) -> None:
    from llguidance import LLMatcher

    params = BUILTINS[name].params
    # Already in the form parse_options stores, so the seeded copy is what a PUT would store.
    assert parse_options(params, f"profile {name}") == params
    assert params["queries"] and params["prompt"] and params["tiling"] == "auto"
    schema = check_schema(params["response_schema"])
    assert _bounded(schema) == []
    grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema))
    assert LLMatcher.validate_grammar(grammar) == ""  # usable for constrained decoding


def test_redaction_choices() -> None:
    assert BUILTINS["vehicles-people"].params["redact"] == ["person", "license plate"]
    # Counting animals: blurring a farmer helps nobody; storm damage must show who needs help.
    for name in ("livestock", "storm-damage", "roof-solar"):
        assert "redact" not in BUILTINS[name].params


# -- the HTTP routes --------------------------------------------------------------------------


def test_routes(tmp_path: Path, serve: Serve, database_url: str | None) -> None:
    service = serve(make_settings(tmp_path, database_url=database_url))
    http = service.client
    listed = http.get("/v1/profiles").json()
    assert {p["name"] for p in listed["profiles"]} == set(BUILTINS)
    assert listed["default"] is None and all(p["builtin"] for p in listed["profiles"])

    body = {"description": "boats", "params": {**PARAMS, "redact": "person, boat name"}}
    made = http.put("/v1/profiles/harbour", json=body)
    assert made.status_code == 201 and made.headers["location"] == "/v1/profiles/harbour"
    view = made.json()
    assert view["params"]["redact"] == ["person", "boat name"]  # stored normalized
    assert view["builtin"] is False and view["default"] is False
    assert http.get("/v1/profiles/harbour").json() == view
    replaced = http.put("/v1/profiles/harbour", json={"params": {"queries": "boat"}})
    assert replaced.status_code == 200
    assert replaced.json()["params"] == {"queries": ["boat"]}
    assert replaced.json()["description"] == ""

    chosen = http.put("/v1/profiles/harbour/default")
    assert chosen.status_code == 200 and chosen.json()["default"] is True
    assert http.get("/v1/profiles").json()["default"] == "harbour"
    assert http.put("/v1/profiles/roof-solar/default").json()["default"] is True
    assert http.get("/v1/profiles/harbour").json()["default"] is False
    assert http.delete("/v1/profiles/harbour/default").status_code == 204  # not it: unchanged
    assert http.get("/v1/profiles").json()["default"] == "roof-solar"
    assert http.delete("/v1/profiles/roof-solar/default").status_code == 204
    assert http.get("/v1/profiles").json()["default"] is None
    assert http.delete("/v1/profiles/harbour").status_code == 204

    def refused(response: Any, status: int, code: str) -> None:
        assert response.status_code == status, response.text
        assert set(response.json()) == {"code", "message"} and response.json()["code"] == code

    refused(http.get("/v1/profiles/harbour"), 404, "unknown_profile")
    refused(http.delete("/v1/profiles/harbour"), 404, "unknown_profile")
    refused(http.put("/v1/profiles/nope/default"), 404, "unknown_profile")
    refused(http.put("/v1/profiles/livestock", json=body), 409, "builtin_profile")
    refused(http.delete("/v1/profiles/livestock"), 409, "builtin_profile")
    refused(http.put("/v1/profiles/Bad_Name", json=body), 422, "invalid_profile_name")
    refused(http.get("/v1/profiles/" + "x" * 65), 422, "invalid_profile_name")
    refused(http.put("/v1/profiles/a/b", json=body), 422, "invalid_profile_name")
    refused(http.delete("/v1/profiles/a/b/default"), 422, "invalid_profile_name")
    refused(
        http.put("/v1/profiles/p", json={"params": {"tiling": "sideways"}}), 422, "invalid_tiling"
    )
    bad_schema = {"params": {"response_schema": {"type": "nonsense"}}}
    refused(http.put("/v1/profiles/p", json=bad_schema), 422, "invalid_schema")
    refused(http.put("/v1/profiles/p", json={"params": {"colour": 1}}), 422, "unknown_fields")
    too_long = {"params": {"detect_max_tokens": 10**6}}  # over AIP_DETECT_MAX_TOKENS
    refused(http.put("/v1/profiles/p", json=too_long), 422, "invalid_option")
    refused(http.put("/v1/profiles/p", json={"params": {"profile": "x"}}), 422, "invalid_options")
    refused(http.put("/v1/profiles/p", json={"params": [1]}), 422, "invalid_options")
    refused(http.put("/v1/profiles/p", json={"params": {}, "x": 1}), 422, "unknown_fields")
    refused(
        http.put("/v1/profiles/p", json={"params": {}, "description": 3}),
        422,
        "invalid_description",
    )
    refused(http.put("/v1/profiles/p", content=b"{not json"), 422, "invalid_json")
    huge = {"params": {"prompt": "x" * 70_000}}
    refused(http.put("/v1/profiles/p", json=huge), 413, "payload_too_large")
    assert http.get("/v1/profiles/p").status_code == 404  # nothing refused was stored

    # Every route is typed in the OpenAPI document.
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/profiles/{name}"]) == {"get", "put", "delete"}
    assert set(paths["/v1/profiles/{name}/default"]) == {"put", "delete"}


def test_profiles_survive_a_restart(tmp_path: Path, serve: Serve) -> None:
    settings = make_settings(tmp_path)
    first = serve(settings)
    assert first.client.put("/v1/profiles/kept", json={"params": {"queries": ["x"]}}).is_success
    assert first.client.put("/v1/profiles/kept/default").is_success
    first.stop()
    second = serve(settings)
    listed = second.client.get("/v1/profiles").json()
    assert listed["default"] == "kept"
    assert len(listed["profiles"]) == len(BUILTINS) + 1


# -- the CLI ----------------------------------------------------------------------------------


def test_cli(tmp_path: Path, serve: Serve, capsys: pytest.CaptureFixture[str]) -> None:
    service = serve(make_settings(tmp_path))
    url = ("--url", service.url)

    code, out, _ = run(capsys, "profiles", "list", *url)
    assert code == 0 and sorted(line.split()[0] for line in out.splitlines()) == sorted(BUILTINS)
    assert all("shipped" in line for line in out.splitlines())

    # Copy a shipped profile under a new name, as the refusal to edit it suggests.
    code, out, _ = run(capsys, "profiles", "show", "roof-solar", "--json", *url)
    assert code == 0
    copy = tmp_path / "roof.json"
    copy.write_text(out)
    code, out, _ = run(capsys, "profiles", "set", "my-roof", "--file", str(copy), *url)
    assert (code, out) == (0, "profile my-roof created\n")
    mine = service.client.get("/v1/profiles/my-roof").json()
    assert mine["params"] == BUILTINS["roof-solar"].params
    assert mine["description"] == BUILTINS["roof-solar"].description

    # A bare params file; the description is kept unless given.
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"queries": ["chimney"]}))
    code, out, _ = run(capsys, "profiles", "set", "my-roof", "--file", str(params), *url)
    assert (code, out) == (0, "profile my-roof replaced\n")
    mine = service.client.get("/v1/profiles/my-roof").json()
    assert mine["params"] == {"queries": ["chimney"]}
    assert mine["description"] == BUILTINS["roof-solar"].description
    code, _, _ = run(
        capsys, "profiles", "set", "my-roof", "--file", str(params), "--description", "mine", *url
    )
    assert code == 0 and service.client.get("/v1/profiles/my-roof").json()["description"] == "mine"

    code, out, _ = run(capsys, "profiles", "show", "my-roof", *url)
    assert code == 0 and out.startswith("my-roof\nmine\nparams: {") and '"chimney"' in out

    code, out, _ = run(capsys, "profiles", "default", *url)
    assert (code, out) == (0, "no default profile\n")
    code, out, _ = run(capsys, "profiles", "default", "my-roof", *url)
    assert (code, out) == (0, "my-roof is the default profile\n")
    code, out, _ = run(capsys, "profiles", "default", *url)
    assert (code, out) == (0, "my-roof\n")
    code, out, _ = run(capsys, "profiles", "list", *url)
    marked = [line.split()[0] for line in out.splitlines() if "default" in line.split()[1:2]]
    assert code == 0 and marked == ["my-roof"]
    code, out, _ = run(capsys, "profiles", "default", "--clear", *url)
    assert code == 0 and "no longer the default" in out
    assert service.client.get("/v1/profiles").json()["default"] is None

    code, out, _ = run(capsys, "profiles", "delete", "my-roof", *url)
    assert (code, out) == (0, "profile my-roof deleted\n")

    # Refusals: one line each, no traceback (`run` checks that too).
    for args, says in (
        (("show", "my-roof"), "unknown_profile"),
        (("delete", "livestock"), "builtin_profile"),
        (("set", "x", "--file", str(tmp_path / "absent.json")), "cannot read"),
        (("show", "../health"), "invalid_profile_name"),
    ):
        code, out, err = run(capsys, "profiles", *args, *url)
        assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and says in err
    params.write_text("[1, 2]")
    code, _, err = run(capsys, "profiles", "set", "x", "--file", str(params), *url)
    assert code == 1 and "not an object" in err
    code, _, err = run(capsys, "profiles", "default", "x", "--clear", *url)
    assert code == 2 and "not allowed with" in err

    # The real command in its own process: exit status and one sentence.
    code, out, err = aip("profiles", "show", "nope", "--url", service.url)
    assert code == 1 and out == "" and err.startswith("aip: unknown_profile: ")


def test_jobs_take_the_named_profile_else_the_default(
    tmp_path: Path, serve: Serve, monkeypatch: pytest.MonkeyPatch, database_url: str | None
) -> None:
    monkeypatch.setattr(Worker, "start", lambda self: None)  # jobs stay queued: no inference
    service = serve(make_settings(tmp_path, database_url=database_url))
    http = service.client
    harbour = {"params": {"queries": ["boat"], "prompt": "Boats?", "redact": ["person"]}}
    assert http.put("/v1/profiles/harbour", json=harbour).status_code == 201

    def params(**data: Any) -> dict[str, Any]:
        submitted = service.submit(**data)
        assert submitted.status_code == 202, submitted.text
        return http.get(f"/v1/jobs/{submitted.json()['id']}").json()["params"]

    assert "profile" not in params()  # no default yet
    assert http.put("/v1/profiles/harbour/default").status_code == 200
    by_default = params()
    assert by_default["profile"] == "harbour" and by_default["queries"] == ["boat"]
    assert by_default["prompt"] == "Boats?" and by_default["redact"] == ["person"]
    named = params(profile="livestock")
    assert named["profile"] == "livestock"
    assert named["queries"] == BUILTINS["livestock"].params["queries"]
    assert named["response_schema"] == BUILTINS["livestock"].params["response_schema"]
    own = params(profile="livestock", queries="goat")  # the job's own fields win
    assert own["queries"] == ["goat"] and own["prompt"] == BUILTINS["livestock"].params["prompt"]
    missing = service.submit(profile="nope")
    assert missing.status_code == 422 and missing.json()["code"] == "unknown_profile"
