"""Named profiles: reusable job parameters in the `profiles` table. Writes go through the
queue's one writer, reads run on the read pool; it stores parameters, it does not check them
(service.jobspec does, before `put`).

Shipped profiles are seeded at every start: inserted when missing, rewritten when the shipped
definition changed, and read-only (`put` and `delete` refuse them: copy one under a new name).
At most one profile is the default (a unique partial index holds the database to it)."""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from service.errors import Conflict, InvalidInput, NotFound
from service.profiles import Shipped, check_name
from service.store.db import Db
from service.store.dialect import bytewise_sql
from service.store.queue import Queue
from service.store.reads import Reads, iso

MAX_DESCRIPTION = 300
Names = list[str]  # an alias: inside Profiles, `list` is its method
_COLUMNS = "name, description, params, builtin, is_default, created_at, updated_at"


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    params: dict[str, Any]  # the job options it sets, as service.jobspec.parse_options gave them
    builtin: bool
    is_default: bool
    created_at: float
    updated_at: float

    @classmethod
    def from_row(cls, row: Any) -> Profile:
        name, description, params, builtin, is_default, created_at, updated_at = row
        return cls(
            name, description, json.loads(params), bool(builtin), bool(is_default),
            created_at, updated_at,
        )  # fmt: skip

    def view(self) -> dict[str, Any]:
        """As the API shows it."""
        return {
            "name": self.name,
            "description": self.description,
            "params": self.params,
            "builtin": self.builtin,
            "default": self.is_default,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
            "links": {"self": f"/v1/profiles/{self.name}"},
        }


def check_description(description: str) -> str:
    """Trimmed, on one line, without control or format characters; at most MAX_DESCRIPTION."""
    cleaned = "".join(
        " " if c in "\t\n\r" else c
        for c in description
        if c in "\t\n\r" or unicodedata.category(c) not in ("Cc", "Cf")
    ).strip()
    if len(cleaned) > MAX_DESCRIPTION:
        raise InvalidInput(
            f"description of {len(cleaned)} characters; at most {MAX_DESCRIPTION}",
            code="invalid_description",
        )
    return cleaned


def unknown(name: str) -> NotFound:
    return NotFound(
        f"no profile named {name!r}: `aip profiles list` (GET /v1/profiles) lists them",
        code="unknown_profile",
    )


def _builtin(name: str) -> Conflict:
    return Conflict(
        f"{name!r} ships with the service and is read-only: copy it under a new name "
        f"(`aip profiles show {name} --json > p.json; aip profiles set my-{name} --file p.json`)",
        code="builtin_profile",
    )


def _encode(params: Mapping[str, Any]) -> str:
    return json.dumps(params, separators=(",", ":"))


def _one(db: Db, name: str) -> Profile | None:
    row = db.execute(f"SELECT {_COLUMNS} FROM profiles WHERE name = ?", (name,)).fetchone()
    return Profile.from_row(tuple(row)) if row is not None else None


class Profiles:
    def __init__(self, queue: Queue, reads: Reads) -> None:
        self._queue = queue
        self._reads = reads

    # -- reads, on the read pool ------------------------------------------------------------

    async def get(self, name: str) -> Profile:
        """The profile `name`; NotFound (`unknown_profile`) when there is none."""

        def read(conn: Connection) -> Any:
            return conn.execute(
                text(f"SELECT {_COLUMNS} FROM profiles WHERE name = :name"), {"name": name}
            ).first()

        row = await self._reads.run(read)
        if row is None:
            raise unknown(name)
        return Profile.from_row(tuple(row))

    async def default(self) -> Profile | None:
        def read(conn: Connection) -> Any:
            return conn.execute(
                text(f"SELECT {_COLUMNS} FROM profiles WHERE is_default = 1")
            ).first()

        row = await self._reads.run(read)
        return Profile.from_row(tuple(row)) if row is not None else None

    async def list(self) -> list[Profile]:
        """Every profile, by name."""

        def read(conn: Connection) -> list[Any]:
            order = f"name{bytewise_sql(conn.dialect.name)}"
            query = text(f"SELECT {_COLUMNS} FROM profiles ORDER BY {order}")
            return list(conn.execute(query))

        return [Profile.from_row(tuple(row)) for row in await self._reads.run(read)]

    # -- writes, on the writer ----------------------------------------------------------------

    async def put(
        self, name: str, description: str, params: Mapping[str, Any]
    ) -> tuple[Profile, bool]:
        """Create or replace the user's profile `name` (its default mark stays); the stored
        profile and whether it is new. A shipped profile's name is refused (409)."""
        check_name(name)
        description = check_description(description)
        encoded = _encode(params)

        def write(db: Db) -> tuple[Profile, bool]:
            now = time.time()
            old = _one(db, name)
            if old is not None and old.builtin:
                raise _builtin(name)
            db.execute(
                "INSERT INTO profiles (name, description, params, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET"
                " description = excluded.description, params = excluded.params,"
                " updated_at = excluded.updated_at",
                (name, description, encoded, now, now),
            )
            stored = _one(db, name)
            assert stored is not None
            return stored, old is None

        return await self._queue.write(write)

    async def delete(self, name: str) -> None:
        """Remove the user's profile `name` (and with it the default, if it was)."""
        check_name(name)

        def write(db: Db) -> None:
            old = _one(db, name)
            if old is None:
                raise unknown(name)
            if old.builtin:
                raise _builtin(name)
            db.execute("DELETE FROM profiles WHERE name = ?", (name,))

        await self._queue.write(write)

    async def set_default(self, name: str | None) -> Profile | None:
        """Make `name` the default profile (shipped ones too), or, with None, have none; the
        new default."""
        if name is not None:
            check_name(name)

        def write(db: Db) -> Profile | None:
            if name is not None and _one(db, name) is None:
                raise unknown(name)
            # Cleared first: the unique index allows one row with is_default = 1 at any time.
            db.execute("UPDATE profiles SET is_default = 0 WHERE is_default = 1")
            if name is None:
                return None
            db.execute("UPDATE profiles SET is_default = 1 WHERE name = ?", (name,))
            return _one(db, name)

        return await self._queue.write(write)

    async def clear_default(self, name: str) -> bool:
        """`name` stops being the default, if it was (and no other profile is touched, so a
        default set meanwhile stays); whether it was."""
        check_name(name)

        def write(db: Db) -> bool:
            if _one(db, name) is None:
                raise unknown(name)
            cursor = db.execute(
                "UPDATE profiles SET is_default = 0 WHERE name = ? AND is_default = 1", (name,)
            )
            return cursor.rowcount > 0

        return await self._queue.write(write)

    async def seed(self, shipped: Mapping[str, Shipped]) -> Names:
        """At start: the shipped profiles inserted or brought up to date (their default mark
        kept); a shipped profile no longer shipped becomes the user's own, kept and editable.
        Returns the shipped names a user's own profile already holds (left as they are)."""

        def write(db: Db) -> Names:
            now = time.time()
            taken = []
            for name, profile in shipped.items():
                encoded = _encode(profile.params)
                db.execute(
                    "INSERT INTO profiles"
                    " (name, description, params, builtin, created_at, updated_at)"
                    " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (name) DO NOTHING",
                    (name, profile.description, encoded, now, now),
                )
                db.execute(
                    "UPDATE profiles SET description = ?, params = ?, updated_at = ?"
                    " WHERE name = ? AND builtin = 1 AND (description != ? OR params != ?)",
                    (profile.description, encoded, now, name, profile.description, encoded),
                )
                if not db.execute(
                    "SELECT builtin FROM profiles WHERE name = ?", (name,)
                ).fetchone()["builtin"]:
                    taken.append(name)
            marks = ",".join("?" * len(shipped))
            db.execute(
                f"UPDATE profiles SET builtin = 0 WHERE builtin = 1 AND name NOT IN ({marks})",
                tuple(shipped),
            )
            return taken

        return await self._queue.write(write)
