"""Shared fixtures: a fresh database built from schema.sql, a factory for its rows, and the app under test
wrapped in wsgiref.validate and WebTest (WebTest's own lint misses some WSGI mistakes validate catches)."""

import hashlib
import io
import itertools
import sqlite3
import uuid
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator

import pytest
import webtest

import timeslot_export


class Factory:
    """Inserts rows the way other systems would (read-write, foreign keys on) with sensible defaults."""

    def __init__(self, path):
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        self.db.execute("PRAGMA foreign_keys = ON")
        self._numbers = itertools.count(1)

    def uuid(self):
        return str(uuid.uuid4())

    def user(self, username=None, token=None, deleted_at=None):
        """A user; returns (id, token). A user without token has no API access."""
        username = username or f"user{next(self._numbers)}"
        token = token if token is not None else f"token-{username}"
        digest = hashlib.sha256(token.encode()).hexdigest() if token else None
        cursor = self.db.execute("INSERT INTO users (uuid, username, token_digest, deleted_at) VALUES (?, ?, ?, ?)",
                                 (self.uuid(), username, digest, deleted_at))
        return cursor.lastrowid, token

    def group(self, owner_id, name="Group", deleted_at=None):
        """A slot group; returns (id, uuid)."""
        group_uuid = self.uuid()
        cursor = self.db.execute("INSERT INTO slot_groups (uuid, name, owner_id, deleted_at) VALUES (?, ?, ?, ?)",
                                 (group_uuid, name, owner_id, deleted_at))
        return cursor.lastrowid, group_uuid

    def member(self, group_id, user_id, deleted_at=None):
        self.db.execute("INSERT INTO memberships (group_id, user_id, deleted_at) VALUES (?, ?, ?)",
                        (group_id, user_id, deleted_at))

    def location(self, name="", street=None, postal_code=None, city=None, country=None, latitude=None,
                 longitude=None):
        return self.db.execute(
            "INSERT INTO locations (name, street, postal_code, city, country, latitude, longitude) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, street, postal_code, city, country, latitude, longitude)).lastrowid

    def slot(self, creator_id, title="Slot", start_at="2019-09-20T19:44:02Z", end_at=None, groups=(),
             alerts=(), **columns):
        """A slot, linked to ``groups`` (ids) and with ``alerts`` (minutes); returns (id, uuid)."""
        slot_uuid = columns.pop("uuid", None) or self.uuid()
        values = {"uuid": slot_uuid, "creator_id": creator_id, "title": title, "start_at": start_at,
                  "end_at": end_at, "created_at": "2016-08-30T09:50:42Z", "updated_at": "2016-08-30T09:50:42Z",
                  **columns}
        names = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        slot_id = self.db.execute(f"INSERT INTO slots ({names}) VALUES ({marks})", tuple(values.values())).lastrowid
        for group_id in groups:
            self.db.execute("INSERT INTO group_slots (group_id, slot_id) VALUES (?, ?)", (group_id, slot_id))
        for minutes in alerts:
            self.db.execute("INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (?, ?)", (slot_id, minutes))
        return slot_id, slot_uuid

    def feed(self, user_id, group_id=None, secret=None, details="full", alarms=1, revoked_at=None, label="",
             past_days=None, future_days=None):
        """A feed; returns (id, secret)."""
        secret = secret or f"Secret-{next(self._numbers):04d}-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
        feed_id = self.db.execute(
            "INSERT INTO feeds (user_id, group_id, token_digest, details, alarms, revoked_at, label, past_days, "
            "future_days) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (user_id, group_id, hashlib.sha256(secret.encode()).hexdigest(), details, alarms, revoked_at, label,
             past_days, future_days)).lastrowid
        return feed_id, secret

    def run(self, sql, parameters=()):
        return self.db.execute(sql, parameters)


@pytest.fixture
def db_path(tmp_path):
    path = tmp_path / "timeslot.sqlite3"
    connection = sqlite3.connect(path, isolation_level=None)
    timeslot_export.apply_schema(connection)
    connection.close()
    return path


@pytest.fixture
def data(db_path):
    factory = Factory(db_path)
    yield factory
    factory.db.close()


def make_client(db_path, **options):
    """The application under test: wsgiref.validate inside WebTest."""
    return webtest.TestApp(validator(timeslot_export.make_app(str(db_path), **options)))


@pytest.fixture
def client(db_path):
    return make_client(db_path)


def wsgi_call(app, validate=True, **environ):
    """Call a WSGI app with a hand-made environ (a GET of the export unless told otherwise), inside
    wsgiref.validate unless ``validate`` is False; returns (status, headers dict, the unread body iterable).

    For what WebTest hides: it un-gzips bodies, strips line breaks from paths and refuses environs no
    conforming server builds (validate does too: a CONTENT_LENGTH that is not a number), which the app
    must still answer."""
    body = environ.pop("body", b"")
    base = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": "/v1/export/ical", "QUERY_STRING": "",
            "wsgi.input": io.BytesIO(body)}
    base.update(environ)
    setup_testing_defaults(base)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = status, dict(headers)
        return lambda data: None

    result = (validator(app) if validate else app)(base, start_response)
    return answer["status"], answer["headers"], result


def auth(token):
    return {"Authorization": f"Token token={token}"}


def events(body):
    """The VEVENT blocks of a calendar body (bytes or str), unfolded, as lists of lines."""
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    text = text.replace("\r\n ", "")
    found, current = [], None
    for line in text.split("\r\n"):
        if line == "BEGIN:VEVENT":
            current = []
        elif line == "END:VEVENT":
            found.append(current)
            current = None
        elif current is not None:
            current.append(line)
    return found


def uids(body):
    return [line[4:] for event in events(body) for line in event if line.startswith("UID:")]
