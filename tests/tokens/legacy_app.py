"""A legacy app with a typed schema, as sidecrypt's users have them: SQLite with INTEGER and
VARCHAR(11) columns, CHECK constraints, a unique index on ssn, and lookups by email and ssn.
It knows nothing of tokens: what it stores must simply fit."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web

SCHEMA = """
CREATE TABLE users (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL,
  ssn VARCHAR(11) NOT NULL CHECK (length(ssn) = 11
      AND ssn GLOB '[0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][0-9][0-9]'),
  email VARCHAR(64) NOT NULL CHECK (email LIKE '_%@_%._%' AND length(email) <= 64),
  phone INTEGER NOT NULL CHECK (typeof(phone) = 'integer' AND phone BETWEEN 1000000000 AND 9999999999),
  card VARCHAR(19) NOT NULL CHECK (length(card) BETWEEN 12 AND 19),
  secret TEXT
);
CREATE UNIQUE INDEX users_ssn ON users (ssn);
CREATE INDEX users_email ON users (email);
"""
COLUMNS = ("id", "name", "ssn", "email", "phone", "card", "secret")


class LegacyApp:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.executescript(SCHEMA)

    def rows(self) -> list[tuple[Any, ...]]:
        return self.db.execute("SELECT * FROM users ORDER BY id").fetchall()

    def _user(self, row: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip(COLUMNS, row, strict=True))

    async def __call__(self, request: web.Request, body: bytes) -> web.StreamResponse:
        parts = request.path.strip("/").split("/")
        try:
            if request.method == "POST" and parts == ["users"]:
                doc = json.loads(body)
                cur = self.db.execute(
                    "INSERT INTO users (name, ssn, email, phone, card, secret)"
                    " VALUES (?,?,?,?,?,?)",
                    (
                        doc["name"],
                        doc["ssn"],
                        doc["email"],
                        doc["phone"],
                        doc["card"],
                        doc.get("secret"),
                    ),
                )
                return web.json_response({"id": cur.lastrowid}, status=201)
            if request.method == "GET" and parts == ["users"]:
                if "email" in request.query:
                    rows = self.db.execute(
                        "SELECT * FROM users WHERE email = ?", (request.query["email"],)
                    ).fetchall()
                else:
                    rows = self.db.execute("SELECT * FROM users ORDER BY id").fetchall()
                return web.json_response({"users": [self._user(r) for r in rows]})
            if request.method == "GET" and parts[:2] == ["users", "by-ssn"] and len(parts) == 3:
                row = self.db.execute("SELECT * FROM users WHERE ssn = ?", (parts[2],)).fetchone()
                if row is None:
                    return web.json_response({"error": "not found"}, status=404)
                return web.json_response({"user": self._user(row)})
            if request.method == "GET" and parts[0] == "users" and len(parts) == 2:
                row = self.db.execute(
                    "SELECT * FROM users WHERE id = ?", (int(parts[1]),)
                ).fetchone()
                if row is None:
                    return web.json_response({"error": "not found"}, status=404)
                return web.json_response({"user": self._user(row)})
        except sqlite3.IntegrityError as exc:
            return web.json_response({"error": f"constraint: {exc}"}, status=409)
        except (KeyError, ValueError, TypeError) as exc:
            return web.json_response({"error": f"bad request: {type(exc).__name__}"}, status=400)
        return web.json_response({"error": "no such endpoint"}, status=404)
