"""Timeslot export service: a user's calendar entries ("slots") as an RFC 5545 iCalendar file.

One module, standard library only: a WSGI application, an iCalendar writer, data access over ``sqlite3``
(read-only, but for the ``feeds`` users manage) and a command line. The database is described by
``schema.sql`` beside this file.

Routes:
    POST|GET|HEAD /v1/export/ical      export the slots the user created (``group``: one group's),
                                       authenticated by ``Authorization: Token token=<token>``
    GET|HEAD /v1/feeds/<secret>.ics    a subscription feed: a secret, revocable read-only URL
    GET|HEAD /v1/feeds/<secret>        its subscribe page: one link per calendar client
    GET|POST /v1/feeds                 the user's feeds: list, create (the secret shown once)
    GET|PATCH|DELETE /v1/feeds/<id>    one of them: read, change, revoke
    POST /v1/feeds/<id>/reset          revoke it and create one with the same settings
    OPTIONS on each                    CORS preflight

Run it:
    python -m timeslot_export demo --db demo.sqlite3     # a demo database, its token and a curl command
    python -m timeslot_export serve --db demo.sqlite3    # serve HTTP/1.1 on http://127.0.0.1:8000
    gunicorn timeslot_export:application                 # any WSGI server; configured by TIMESLOT_* variables

Configuration (environment, read once): TIMESLOT_DB, TIMESLOT_CORS_ORIGINS, TIMESLOT_REFRESH_MINUTES,
TIMESLOT_BASE_URL, TIMESLOT_MAX_FEEDS, TIMESLOT_MAX_BODY_BYTES, TIMESLOT_BUSY_TIMEOUT_MS, TIMESLOT_LOG_LEVEL,
TIMESLOT_DB_REPLICA. See README.md (the front door) and docs/ (one file per question).
"""

from __future__ import annotations

import argparse
import base64
import bisect
import calendar
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import html
import itertools
import json
import logging
import math
import operator
import os
import queue
import random
import re
import secrets
import selectors
import signal
import socket
import sqlite3
import struct
import sys
import threading
import time
import urllib.parse
import uuid as uuidlib
import weakref
import zlib
import zoneinfo

try:
    import fcntl                                      # POSIX; replicas use it on Linux (_FollowerGuard)
except ImportError:                                   # pragma: no cover (Windows)
    fcntl = None
from http import HTTPStatus
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence
from wsgiref import simple_server
from wsgiref.handlers import format_date_time

__all__ = ["Config", "ConfigError", "ExportApp", "HTTPError", "make_app", "application", "main",
           "escape_text", "fold_line", "format_recurrence", "__version__"]
__version__ = "1.2.0"

logger = logging.getLogger("timeslot_export")


# ---------------------------------------------------------------------------------------------------
# Constants: limits, content types, SQL
# ---------------------------------------------------------------------------------------------------

SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "schema.sql")   # in a checkout
DISTRIBUTION = "timeslot-export"     # the installed package, whose schema.sql is in share/timeslot-export/
DEFAULT_DB = "timeslot.sqlite3"

MAX_BODY_BYTES = 64 * 1024          # request bodies larger than this get 413
MAX_FORM_FIELDS = 100               # form bodies and query strings with more fields get 422
CHUNK_BYTES = 32 * 1024             # the body streams in pieces of about this many octets
PREBUFFER_BYTES = 64 * 1024         # a body that fits here is sent whole, with Content-Length
EVENT_CACHE_BYTES = 4 * 1024 * 1024  # an application keeps events it wrote up to about this size (EventCache)
EVENT_CACHE_ROWS = 1024             # ... from the first this many rows of each calendar
BUSY_TIMEOUT_MS = 5000              # how long a read waits for a writer's lock before 503
RETRY_AFTER_SECONDS = 2             # what a 503 asks clients to wait
REFRESH_MINUTES = 60                # how often a feed asks calendar apps to poll
MAX_REFRESH_MINUTES = 7 * 24 * 60
GZIP_LEVEL = 6
MAX_FEEDS = 100                     # active feeds a user may have (TIMESLOT_MAX_FEEDS)
MAX_LABEL_CHARS = 200               # a feed's label
MAX_WINDOW_DAYS = 36600             # a feed's past_days and future_days: 0 to about a hundred years
FEED_SETTINGS = ("label", "details", "alarms", "past_days", "future_days")   # what a PATCH may change

CALENDAR_TYPE = "text/calendar; charset=utf-8"
DOWNLOAD_TYPE = "application/octet-stream"
JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"

UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,255}")
FEED_SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
# A feed's id in the management API's paths: a positive decimal number (anything else is no feed of anyone's).
FEED_ID_PATTERN = re.compile(r"[1-9][0-9]{0,17}")
# TIMESLOT_BASE_URL and feed create --base-url: an absolute http(s) URL, a path allowed, no query or fragment.
BASE_URL_PATTERN = re.compile(r"https?://[A-Za-z0-9.:\[\]-]+(/[^\s?#]*)?")
HOST_PATTERN = re.compile(r"[A-Za-z0-9.:\[\]-]{1,255}")
# Anything in a logged path that looks like a secret (feed secrets are 43 such characters).
SECRET_IN_PATH = re.compile(r"[A-Za-z0-9_-]{20,}")

# All SQL of the service, with placeholders; nothing is ever formatted into a statement.
# Free text comes out as BLOBs, so that bytes that are not UTF-8 become U+FFFD in Python instead of failing
# the row (and a BLOB costs sqlite3 a copy, where TEXT costs it a decode). A slot row's timestamps come as
# stored; the writer puts them in iCalendar's basic form (20190920T194402Z, basic_form): two replace()
# calls per timestamp in SQL cost a 100,000-slot export more than a third of its SELECT, in Python a
# tenth of that. The few timestamps of other queries come in basic form.
_SLOT_COLUMNS = """
    s.uuid, s.created_at, s.updated_at, s.start_at, s.end_at, s.all_day, s.rrule, s.visibility,
    CAST(s.title AS BLOB), CAST(s.description AS BLOB),
    CAST(l.name AS BLOB), CAST(l.street AS BLOB), CAST(l.postal_code AS BLOB), CAST(l.city AS BLOB),
    CAST(l.country AS BLOB), l.latitude, l.longitude,
    (SELECT group_concat(a.minutes_before) FROM slot_alerts a WHERE a.slot_id = s.id),
    s.time_zone,
    CASE WHEN s.rrule <> '' THEN (SELECT group_concat(e.occurrence_at) FROM slot_exdates e WHERE e.slot_id = s.id)
    END"""

# A user with what their exports' validators follow: the version (ETag) and the change clock (Last-Modified).
SQL_USER_BY_TOKEN = """
    SELECT u.id, coalesce(v.version, -1), coalesce(v.changed, 0)
    FROM users u LEFT JOIN export_versions v ON v.user_id = u.id
    WHERE u.token_digest = ? AND u.deleted_at IS NULL"""
SQL_USER_BY_NAME = """
    SELECT u.id, coalesce(v.version, -1), coalesce(v.changed, 0)
    FROM users u LEFT JOIN export_versions v ON v.user_id = u.id
    WHERE u.username = ? AND u.deleted_at IS NULL"""
_GROUP_ACCESS = """
    AND g.deleted_at IS NULL
    AND (g.owner_id = :user OR EXISTS (SELECT 1 FROM memberships m
                                       WHERE m.group_id = g.id AND m.user_id = :user AND m.deleted_at IS NULL))"""
SQL_GROUP_BY_UUID = "SELECT g.id, g.uuid, CAST(g.name AS BLOB) FROM slot_groups g WHERE g.uuid = :group" + _GROUP_ACCESS
SQL_GROUP_BY_ID = "SELECT g.id, g.uuid, CAST(g.name AS BLOB) FROM slot_groups g WHERE g.id = :group" + _GROUP_ACCESS
SQL_USER_SLOTS = "SELECT" + _SLOT_COLUMNS + """
    FROM slots s LEFT JOIN locations l ON l.id = s.location_id
    WHERE s.creator_id = ? AND s.deleted_at IS NULL
    ORDER BY s.start_at, s.uuid"""
SQL_GROUP_SLOTS = "SELECT" + _SLOT_COLUMNS + """
    FROM group_slots gs JOIN slots s ON s.id = gs.slot_id LEFT JOIN locations l ON l.id = s.location_id
    WHERE gs.group_id = ? AND gs.deleted_at IS NULL AND s.creator_id = ? AND s.deleted_at IS NULL
    ORDER BY s.start_at, s.uuid"""
# The time zones of the timed slots an export writes, each with its earliest start (Session sorts them): for a
# user, a hop from zone to zone through the partial index slots_zones (a few index searches per zone, not
# a pass over the slots); for a group, its links are read once more (they are a fraction of the user's).
_ZONED = "s.creator_id = :user AND s.deleted_at IS NULL AND s.all_day = 0 AND s.time_zone <> ''"
SQL_USER_ZONES = f"""
    WITH RECURSIVE zones (name) AS (
        SELECT min(s.time_zone) FROM slots s WHERE {_ZONED}
        UNION ALL
        SELECT (SELECT min(s.time_zone) FROM slots s WHERE {_ZONED} AND s.time_zone > zones.name)
        FROM zones WHERE zones.name IS NOT NULL)
    SELECT name, (SELECT replace(replace(min(s.start_at), '-', ''), ':', '') FROM slots s
                  WHERE {_ZONED} AND s.time_zone = zones.name)
    FROM zones WHERE name IS NOT NULL"""
SQL_GROUP_ZONES = f"""
    SELECT s.time_zone, replace(replace(min(s.start_at), '-', ''), ':', '')
    FROM group_slots gs JOIN slots s ON s.id = gs.slot_id
    WHERE gs.group_id = :group AND gs.deleted_at IS NULL AND {_ZONED}
    GROUP BY s.time_zone"""
# A date window (SPEC §3 "from", "to") is an index search of slot_spans, which schema.sql keeps: each class
# of span length is one range of span_start (a span of class c is at most SPAN_CLASS_DAYS[c] days long), the
# longest spans (open-ended series among them) one range of span_end. What it finds is a superset of what the
# window selects: a span is a bound (a rule's UNTIL is not read in its zone here); in_window decides.
SPAN_CLASS_DAYS = (1, 8, 64, 512)


def _window_candidates(extra: str = "") -> str:
    ranges = [f"""
        SELECT slot_id FROM slot_spans INDEXED BY slot_spans_start
        WHERE creator_id = :user AND span_class = {number} AND span_start >= :from{number} AND span_start < :to
              AND span_end >= :from{extra}""" for number in range(len(SPAN_CLASS_DAYS))]
    ranges.append(f"""
        SELECT slot_id FROM slot_spans INDEXED BY slot_spans_end
        WHERE creator_id = :user AND span_class = {len(SPAN_CLASS_DAYS)} AND span_end >= :from
              AND span_start < :to{extra}""")
    return "WITH candidates (id) AS (" + "\n        UNION ALL".join(ranges) + ")\n"


_IN_GROUP = " JOIN group_slots gs ON gs.slot_id = s.id AND gs.group_id = :group AND gs.deleted_at IS NULL"
_WINDOW_SLOTS = "SELECT" + _SLOT_COLUMNS + """
    FROM candidates c JOIN slots s ON s.id = c.id{group} LEFT JOIN locations l ON l.id = s.location_id
    WHERE s.creator_id = :user AND s.deleted_at IS NULL
    ORDER BY s.start_at, s.uuid"""
SQL_USER_WINDOW_SLOTS = _window_candidates() + _WINDOW_SLOTS.format(group="")
SQL_GROUP_WINDOW_SLOTS = _window_candidates() + _WINDOW_SLOTS.format(group=_IN_GROUP)
# The zoned slots among a window's candidates, for its VTIMEZONEs (in_window picks those it selects).
_WINDOW_ZONED = """SELECT s.time_zone, replace(replace(s.start_at, '-', ''), ':', ''),
           replace(replace(s.end_at, '-', ''), ':', ''), s.rrule
    FROM candidates c JOIN slots s ON s.id = c.id{group}
    WHERE s.creator_id = :user AND s.deleted_at IS NULL AND s.all_day = 0 AND s.time_zone <> ''"""
SQL_USER_WINDOW_ZONED = _window_candidates(" AND zoned = 1") + _WINDOW_ZONED.format(group="")
SQL_GROUP_WINDOW_ZONED = _window_candidates(" AND zoned = 1") + _WINDOW_ZONED.format(group=_IN_GROUP)
SQL_FEED_BY_DIGEST = """
    SELECT f.id, f.user_id, f.group_id, f.details, f.alarms, f.revoked_at IS NOT NULL,
           u.deleted_at IS NOT NULL, coalesce(v.version, -1), CAST(f.label AS BLOB), f.past_days, f.future_days,
           coalesce(v.changed, 0)
    FROM feeds f JOIN users u ON u.id = f.user_id LEFT JOIN export_versions v ON v.user_id = f.user_id
    WHERE f.token_digest = ?"""
SQL_SCHEMA_CURRENT = """
    SELECT (SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('users', 'slots', 'slot_exdates')) = 3
       AND EXISTS (SELECT 1 FROM pragma_table_info('slots') WHERE name = 'time_zone')
       AND EXISTS (SELECT 1 FROM pragma_table_info('feeds') WHERE name = 'future_days')
       AND EXISTS (SELECT 1 FROM pragma_table_info('export_versions') WHERE name = 'changed')
       AND EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'slot_spans')"""
SQL_TABLE_COLUMNS = "SELECT * FROM pragma_table_info(?)"

# A user's feeds as the management API shows them (SPEC §3 "Managing feeds"), and as `feed list` prints them.
_FEED_OBJECT = """
    SELECT f.id, CAST(f.label AS BLOB), g.uuid, f.details, f.alarms, f.past_days, f.future_days, f.created_at,
           f.revoked_at
    FROM feeds f LEFT JOIN slot_groups g ON g.id = f.group_id"""
SQL_FEEDS_OF_USER = _FEED_OBJECT + " WHERE f.user_id = :user ORDER BY f.id"
SQL_FEED_OF_USER = _FEED_OBJECT + " WHERE f.user_id = :user AND f.id = :feed"

# Writes. The web application writes only feeds, each change one short transaction on a connection of its
# own (WriteSession); everything else here is the command line's.
SQL_ACTIVE_FEEDS = "SELECT count(*) FROM feeds WHERE user_id = ? AND revoked_at IS NULL"
SQL_INSERT_FEED = """
    INSERT INTO feeds (user_id, group_id, token_digest, label, details, alarms, past_days, future_days)
    VALUES (:user, :group, :digest, :label, :details, :alarms, :past_days, :future_days)"""
SQL_COPY_FEED = """
    INSERT INTO feeds (user_id, group_id, token_digest, label, details, alarms, past_days, future_days)
    SELECT user_id, group_id, :digest, label, details, alarms, past_days, future_days FROM feeds WHERE id = :feed"""
# A PATCH sets the members it names and keeps the others (a flag per member: None is a value to set).
SQL_CHANGE_FEED = """
    UPDATE feeds SET label = CASE WHEN :set_label THEN :label ELSE label END,
                     details = CASE WHEN :set_details THEN :details ELSE details END,
                     alarms = CASE WHEN :set_alarms THEN :alarms ELSE alarms END,
                     past_days = CASE WHEN :set_past_days THEN :past_days ELSE past_days END,
                     future_days = CASE WHEN :set_future_days THEN :future_days ELSE future_days END
    WHERE id = :feed AND user_id = :user AND revoked_at IS NULL"""
SQL_REVOKE_FEED = """
    UPDATE feeds SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE id = ? AND revoked_at IS NULL"""
SQL_FEED_EXISTS = "SELECT revoked_at FROM feeds WHERE id = ?"
SQL_INSERT_USER = "INSERT INTO users (uuid, username, token_digest) VALUES (?, ?, ?)"
SQL_SET_USER_TOKEN = "UPDATE users SET token_digest = ? WHERE id = ?"
SQL_USER_ID_BY_NAME = "SELECT id FROM users WHERE username = ? AND deleted_at IS NULL"
SQL_REVOKE_DEMO_FEEDS = """
    UPDATE feeds SET revoked_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')
    WHERE user_id = ? AND label = 'Demo' AND revoked_at IS NULL"""
SQL_DEMO_USER = "INSERT OR IGNORE INTO users (uuid, username, token_digest) VALUES (?, ?, ?)"
SQL_DEMO_GROUP = "INSERT INTO slot_groups (uuid, name, owner_id) VALUES (?, ?, ?)"
SQL_DEMO_MEMBERSHIP = "INSERT INTO memberships (group_id, user_id) VALUES (?, ?)"
SQL_DEMO_LOCATION = """
    INSERT INTO locations (name, street, postal_code, city, country, latitude, longitude) VALUES (?, ?, ?, ?, ?, ?, ?)"""
SQL_DEMO_SLOT = """
    INSERT INTO slots (uuid, creator_id, title, description, start_at, end_at, all_day, rrule, time_zone,
                       visibility, location_id, created_at, updated_at, deleted_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '2026-11-01T10:00:00Z', '2026-11-20T08:30:00Z', ?)"""
SQL_DEMO_EXDATE = "INSERT INTO slot_exdates (slot_id, occurrence_at) VALUES (?, ?)"
SQL_DEMO_ALERT = "INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (?, ?)"
SQL_DEMO_GROUP_SLOT = "INSERT INTO group_slots (group_id, slot_id) VALUES (?, ?)"


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------

class HTTPError(Exception):
    """An answer other than success: turned into the JSON error body of SPEC §3 in one place."""

    def __init__(self, status: HTTPStatus, message: str, headers: Sequence[tuple[str, str]] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = list(headers)


class DatabaseUnavailable(Exception):
    """The database is missing, unreadable, corrupt or locked past the busy timeout (503)."""


class DatabaseReadOnly(Exception):
    """The database cannot be written here (a read-only file or directory, or a replica): feed changes are
    refused with 503 and nothing changes, while exports go on reading."""


class ConfigError(ValueError):
    """A configuration value that cannot be used; start-up stops with this message."""


class NotFound(LookupError):
    """A user, group or feed the command line was asked for does not exist (or is not the user's)."""


# ---------------------------------------------------------------------------------------------------
# Configuration: read once, validated, frozen
# ---------------------------------------------------------------------------------------------------

# The numeric settings: (Config field, environment variable, lowest, highest), checked in one place.
NUMBER_SETTINGS = (("refresh_minutes", "TIMESLOT_REFRESH_MINUTES", 1, MAX_REFRESH_MINUTES),
                   ("max_body_bytes", "TIMESLOT_MAX_BODY_BYTES", 0, 64 * 1024 * 1024),
                   ("busy_timeout_ms", "TIMESLOT_BUSY_TIMEOUT_MS", 0, 600_000),
                   ("max_feeds", "TIMESLOT_MAX_FEEDS", 1, 10_000))


def _yes_or_no(name: str, text: str) -> bool:
    """Parse an on/off setting the way operators write it, or say clearly what is wrong with it."""
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (also true/false, yes/no, on/off), not {text!r}")


def _whole_number(name: str, text: str, low: int, high: int) -> int:
    """Parse a whole number from configuration, or say clearly what is wrong with it."""
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()) or not low <= int(text) <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {text!r}")
    return int(text)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything the application is configured with; ``from_environ`` reads the TIMESLOT_* variables."""

    db_path: str = DEFAULT_DB
    cors_origins: tuple[str, ...] = ()
    refresh_minutes: int = REFRESH_MINUTES
    max_body_bytes: int = MAX_BODY_BYTES
    busy_timeout_ms: int = BUSY_TIMEOUT_MS
    log_level: str = "INFO"
    # The file is a replica that a follower (litestream restore -f) updates in place: see Database.
    replica: bool = False
    max_feeds: int = MAX_FEEDS
    # Where the service is reached from outside, for the URLs of new feeds; '' = the request's own address.
    base_url: str = ""
    # Seconds since 1970 now: what today's date is for a feed's window, and what a Last-Modified must not
    # be later than. Tests pass their own.
    clock: Callable[[], float] = dataclasses.field(default=time.time, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.db_path, str) or not self.db_path:
            raise ConfigError("the database path must be a non-empty string")
        for name, _, low, high in NUMBER_SETTINGS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {value!r}")
        for origin in self.cors_origins:
            if not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]-]+", origin):
                raise ConfigError(f"CORS origin must look like https://host[:port], not {origin!r}")
        if self.base_url and not (isinstance(self.base_url, str) and BASE_URL_PATTERN.fullmatch(self.base_url)):
            raise ConfigError(f"TIMESLOT_BASE_URL must be an absolute http:// or https:// URL without a query, "
                              f"such as https://calendar.example.org, not {self.base_url!r}")
        if not isinstance(self.replica, bool):
            raise ConfigError(f"replica must be True or False, not {self.replica!r}")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"TIMESLOT_LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL, "
                              f"not {self.log_level!r}")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], **overrides) -> "Config":
        """The configuration named by TIMESLOT_* variables; ``overrides`` (from the command line) win."""
        values = {
            "db_path": environ.get("TIMESLOT_DB") or DEFAULT_DB,
            "cors_origins": tuple(o.strip() for o in environ.get("TIMESLOT_CORS_ORIGINS", "").split(",")
                                  if o.strip()),
            "log_level": environ.get("TIMESLOT_LOG_LEVEL", "INFO").strip() or "INFO",
            "replica": _yes_or_no("TIMESLOT_DB_REPLICA", environ.get("TIMESLOT_DB_REPLICA", "")),
            "base_url": environ.get("TIMESLOT_BASE_URL", "").strip(),
        }
        for key, name, low, high in NUMBER_SETTINGS:
            if name in environ:
                values[key] = _whole_number(name, environ[name], low, high)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# ---------------------------------------------------------------------------------------------------
# Storage: the only code that touches sqlite3
# ---------------------------------------------------------------------------------------------------

def _storage_error(error: sqlite3.Error) -> DatabaseUnavailable:
    """Operational failures (missing, locked, corrupt, no schema) mean "unavailable" (503). Misuse of the
    API (ProgrammingError, InterfaceError) is a bug in this module: it is re-raised as it is (500)."""
    if isinstance(error, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
        raise error
    return DatabaseUnavailable(str(error))


def _decode(raw: bytes | None) -> str:
    """Free text from a BLOB-cast column: invalid UTF-8 becomes U+FFFD instead of failing the export."""
    return "" if raw is None else raw.decode("utf-8", "replace")


@dataclasses.dataclass(frozen=True)
class Group:
    id: int
    uuid: str
    name: str


# Bounds beyond every timestamp, for a side of a window without one (timestamps sort as text), in the
# schema's form and in iCalendar's basic form.
BEFORE_ALL, AFTER_ALL, AFTER_ALL_BASIC = "0000-01-01T00:00:00Z", "9999-12-32", "99999999T999999Z"


@dataclasses.dataclass(frozen=True)
class Window:
    """A date window [start, end) (SPEC §3 "from", "to"): UTC instants as 'YYYY-MM-DDTHH:MM:SSZ', None for
    no bound on that side."""

    start: str | None = None
    end: str | None = None

    @property
    def key(self) -> str:
        """What the validators follow: the same data in another window is another calendar."""
        return f"{self.start or ''}/{self.end or ''}"

    def basic_bounds(self) -> tuple[str, str]:
        """(start, end) in iCalendar's basic form, as slot rows give times: '' and a text after every
        instant for no bound."""
        start = self.start.replace("-", "").replace(":", "") if self.start else ""
        return start, self.end.replace("-", "").replace(":", "") if self.end else AFTER_ALL_BASIC

    def search(self) -> dict[str, str]:
        """The bounds of slot_spans' index search: each class of span length starts its range that many
        days before the window, since a span that long can begin that early and still reach into it."""
        start = self.start or BEFORE_ALL
        bounds = {"from": start, "to": self.end or AFTER_ALL}
        for number, days in enumerate(SPAN_CLASS_DAYS):
            bounds[f"from{number}"] = _days_before(start, days)
        return bounds


def _days_before(instant: str, days: int) -> str:
    try:
        moment = datetime.datetime.strptime(instant, "%Y-%m-%dT%H:%M:%SZ") - datetime.timedelta(days=days)
    except (ValueError, OverflowError):
        return BEFORE_ALL
    return f"{moment.year:04d}-{moment:%m-%dT%H:%M:%SZ}"


@dataclasses.dataclass(frozen=True)
class Feed:
    """A feed as its secret URL finds it: what the calendar shows, and its user's state."""

    id: int
    user_id: int
    group_id: int | None
    busy: bool
    alarms: bool
    revoked: bool
    user_deleted: bool
    version: int
    label: str = ""
    past_days: int | None = None
    future_days: int | None = None
    changed: int = 0


def feed_object(row: tuple) -> dict:
    """A row of SQL_FEEDS_OF_USER as the management API's feed object (SPEC §3); never the secret."""
    feed_id, label, group, details, alarms, past_days, future_days, created_at, revoked_at = row
    return {"id": feed_id, "label": _decode(label), "group": group, "details": details, "alarms": bool(alarms),
            "past_days": past_days, "future_days": future_days, "created_at": created_at, "revoked_at": revoked_at}


class WalIndex(NamedTuple):
    """A descriptor of a database's -shm file, to ask its write lock, and the inode it was opened on."""

    descriptor: int
    inode: int


# struct flock for fcntl (type, whence, start, length, pid), and the F_OFD_GETLK queries of SQLite's write locks.
_LOCK_FORMAT = "hhqqi"
_WAL_WRITE_LOCK_QUERY = struct.pack(_LOCK_FORMAT, getattr(fcntl, "F_WRLCK", 1), os.SEEK_SET, 120, 1, 0)
_RESERVED_LOCK_QUERY = struct.pack(_LOCK_FORMAT, getattr(fcntl, "F_WRLCK", 1), os.SEEK_SET, 0x40000001, 1, 0)


class Session:
    """One read transaction on one connection: every query of a request sees one snapshot."""

    def __init__(self, database: "Database", connection: sqlite3.Connection, identity: tuple,
                 quiet: bool = False, started: float = 0.0, wal_index: WalIndex | None = None,
                 wal_index_checked: bool = False):
        self._database = database
        self._connection = connection
        self._identity = identity
        self._wal_index, self._wal_index_checked = wal_index, wal_index_checked     # for check_in
        self._broken = False
        self._closed = False
        # No write was in progress on the file at ``started``, just before this snapshot was taken: every
        # change that a later state brings was written after that moment (see last_modified).
        self.quiet = quiet
        self.started = started
        self._run("BEGIN")

    def _failed(self, error: sqlite3.Error) -> DatabaseUnavailable:
        """A query failed: the connection is not reused, and the error becomes the module's own."""
        self._broken = True
        return _storage_error(error)

    def _run(self, sql: str, parameters: Sequence | Mapping = ()) -> sqlite3.Cursor:
        try:
            return self._connection.execute(sql, parameters)
        except sqlite3.Error as error:
            raise self._failed(error) from error

    def _rows(self, sql: str, parameters: Sequence | Mapping) -> list[tuple]:
        try:                    # fetchall() reads to the end, which resets the statement for its next use
            return self._connection.execute(sql, parameters).fetchall()
        except sqlite3.Error as error:
            raise self._failed(error) from error

    def _one(self, sql: str, parameters: Sequence | Mapping) -> tuple | None:
        rows = self._rows(sql, parameters)
        return rows[0] if rows else None

    def user_by_token_digest(self, digest: str) -> tuple[int, int, int] | None:
        """(user id, export version, change clock) of the non-deleted user with this token digest."""
        return self._one(SQL_USER_BY_TOKEN, (digest,))

    def user_by_name(self, username: str) -> tuple[int, int, int] | None:
        """(user id, export version, change clock) of the non-deleted user with this name."""
        return self._one(SQL_USER_BY_NAME, (username,))

    def accessible_group(self, user_id: int, *, uuid: str | None = None, group_id: int | None = None
                         ) -> Group | None:
        """The group, if it exists, is not deleted, and the user owns it or is an active member."""
        if uuid is not None:
            row = self._one(SQL_GROUP_BY_UUID, {"group": uuid, "user": user_id})
        else:
            row = self._one(SQL_GROUP_BY_ID, {"group": group_id, "user": user_id})
        return None if row is None else Group(row[0], row[1], _decode(row[2]))

    def feed_by_digest(self, digest: str) -> Feed | None:
        """The feed whose secret has this digest, revoked or not, with its user's state."""
        row = self._one(SQL_FEED_BY_DIGEST, (digest,))
        if row is None:
            return None
        return Feed(row[0], row[1], row[2], row[3] == "busy", bool(row[4]), bool(row[5]), bool(row[6]), row[7],
                    _decode(row[8]), row[9], row[10], row[11])

    def feeds_of_user(self, user_id: int) -> list[dict]:
        """The user's feeds, revoked ones included, by id, as feed objects."""
        return [feed_object(row) for row in self._rows(SQL_FEEDS_OF_USER, {"user": user_id})]

    def feed_of_user(self, user_id: int, feed_id: int) -> dict | None:
        """One of the user's feeds as a feed object; None for a feed that is not theirs (or none at all)."""
        row = self._one(SQL_FEED_OF_USER, {"user": user_id, "feed": feed_id})
        return None if row is None else feed_object(row)

    def slot_batches(self, user_id: int, group_id: int | None, window: Window | None = None,
                     size: int = 256) -> Iterator[list[tuple]]:
        """The user's slots (of one group, or all) in (start_at, uuid) order, as lists of rows; with a
        window, those its index search finds (a superset of what it selects).

        Batches keep the per-row cost low; the statement is prepared once per connection (sqlite3's
        statement cache) and the cursor is closed when the iterator is, even half read."""
        if window is not None:
            sql = SQL_USER_WINDOW_SLOTS if group_id is None else SQL_GROUP_WINDOW_SLOTS
            cursor = self._run(sql, {**window.search(), "user": user_id, "group": group_id})
        elif group_id is None:
            cursor = self._run(SQL_USER_SLOTS, (user_id,))
        else:
            cursor = self._run(SQL_GROUP_SLOTS, (group_id, user_id))
        try:
            while True:
                batch = cursor.fetchmany(size)
                if batch:
                    yield batch
                if len(batch) < size:              # the last batch: no round trip for an empty one
                    return
        except sqlite3.Error as error:
            raise self._failed(error) from error
        finally:
            cursor.close()

    def time_zone_starts(self, user_id: int, group_id: int | None) -> list[tuple[str, str]]:
        """(zone name, earliest start in basic form) of the timed slots an export writes, by name."""
        sql = SQL_USER_ZONES if group_id is None else SQL_GROUP_ZONES
        return sorted(self._rows(sql, {"user": user_id, "group": group_id}))

    def window_zoned_slots(self, user_id: int, group_id: int | None, window: Window) -> list[tuple]:
        """(zone name, start, end, rule) of the zoned timed slots a window's index search finds."""
        sql = SQL_USER_WINDOW_ZONED if group_id is None else SQL_GROUP_WINDOW_ZONED
        return self._rows(sql, {**window.search(), "user": user_id, "group": group_id})

    def start_reading(self) -> None:
        """Take the read lock now (BEGIN defers it to the first read)."""
        self._one("PRAGMA schema_version", ())

    def discard(self) -> None:
        """End the transaction and close the connection instead of keeping it."""
        self._broken = True
        self.close()

    def schema_current(self) -> bool:
        """Whether the database has the Timeslot tables and columns this version reads (a start-up check)."""
        return self._one(SQL_SCHEMA_CURRENT, ())[0] == 1

    def close(self) -> None:
        """End the read transaction and give the connection back (or drop it if it failed)."""
        if self._closed:
            return
        self._closed = True
        if not self._broken:
            try:
                self._connection.execute("ROLLBACK")
            except sqlite3.Error:
                self._broken = True
        self._database.check_in(self._connection, self._identity, not self._broken, self._wal_index,
                                self._wal_index_checked)


class WriteSession(Session):
    """One short write transaction on a connection of its own, for feed management (SPEC §3): never an
    export's connection, never kept (none of Session's connection keeping; its queries are shared).
    BEGIN IMMEDIATE takes the write lock at once (waiting up to the busy timeout, then 503), so a count and
    the insert it allows are one step however many clients race, and a read-only file or directory is found
    before anything is written."""

    def __init__(self, connection: sqlite3.Connection):
        self._connection = connection
        self._broken = self._closed = False
        self._run("BEGIN IMMEDIATE")

    def _failed(self, error: sqlite3.Error) -> Exception:
        self._broken = True
        if _is_read_only(error):
            return DatabaseReadOnly("the database file or its directory is read-only")
        return _storage_error(error)

    def _change(self, sql: str, parameters: Sequence | Mapping) -> int:
        """Run one write; the number of rows it changed."""
        return self._run(sql, parameters).rowcount

    def active_feeds(self, user_id: int) -> int:
        return self._one(SQL_ACTIVE_FEEDS, (user_id,))[0]

    def insert_feed(self, user_id: int, group_id: int | None, settings: Mapping) -> tuple[int, str]:
        """(id, secret) of a new feed; only the secret's digest is stored."""
        secret = secrets.token_urlsafe(32)
        cursor = self._run(SQL_INSERT_FEED, {**settings, "user": user_id, "group": group_id,
                                             "digest": token_digest(secret)})
        return cursor.lastrowid, secret

    def copy_feed(self, feed_id: int) -> tuple[int, str]:
        """(id, secret) of a new feed with the settings of ``feed_id`` (a reset's second half)."""
        secret = secrets.token_urlsafe(32)
        return self._run(SQL_COPY_FEED, {"feed": feed_id, "digest": token_digest(secret)}).lastrowid, secret

    def change_feed(self, user_id: int, feed_id: int, changes: Mapping) -> bool:
        """Set the members in ``changes`` on an active feed of the user; False when there is none."""
        parameters = {"feed": feed_id, "user": user_id}
        for name in FEED_SETTINGS:
            parameters["set_" + name] = name in changes
            parameters[name] = changes.get(name)
        return self._change(SQL_CHANGE_FEED, parameters) == 1

    def revoke_demo_feeds(self, user_id: int) -> None:
        """Revoke the demo user's earlier demo feeds (`demo` makes a new one each time it runs)."""
        self._change(SQL_REVOKE_DEMO_FEEDS, (user_id,))

    def revoke_feed(self, feed_id: int) -> bool:
        """Revoke an active feed; False when it was revoked already."""
        return self._change(SQL_REVOKE_FEED, (feed_id,)) == 1

    def commit(self) -> None:
        """Make the transaction's changes permanent, all of them or (on an error) none."""
        self._run("COMMIT")
        self._closed = True
        self._connection.close()

    def close(self) -> None:
        """End the transaction without its changes (if it was not committed) and close the connection."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._connection.in_transaction:
                self._connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass                                   # closing the connection ends the transaction all the same
        finally:
            self._connection.close()


def _is_read_only(error: sqlite3.Error) -> bool:
    """SQLITE_READONLY (a file that opened read-only), or SQLITE_CANTOPEN on a journal or WAL file that a
    read-only directory will not take: either way, this database cannot be written here."""
    message = str(error).lower()
    return isinstance(error, sqlite3.OperationalError) and ("readonly" in message or "unable to open" in message)


class _FollowerGuard:
    """Lets a replica keep its connections while no follower can write, and steps aside when one wants to.

    A follower (``litestream restore -f``) writes into the file under SQLite's exclusive lock: a write lock
    on the pending byte, then on the shared range. While this process holds a read lock of its own on the
    shared range (the guard), that second step cannot succeed, so the file does not change: a connection
    opened while the guard is held reads one state, cache included, for as long as the guard stays held.
    Each hold is an epoch; a connection is kept only within the epoch it was opened in. When a follower
    takes the pending byte, the guard is released (by the next request, or within WATCH_SECONDS by a
    watcher thread when none comes), the epoch ends, and its connections are closed instead of reused.

    The guard is an open-file-description lock (Linux 3.15+): SQLite closing one of its own descriptors
    for the file would drop a classic fcntl lock of this process, never this one. It is only taken when the
    file is in rollback-journal mode, as Litestream leaves a copy after its first change of page 1; in WAL
    mode each open connection holds a shared lock of its own, and connections are opened per request."""

    WATCH_SECONDS = 0.05
    PENDING_BYTE, SHARED_FIRST, SHARED_SIZE = 0x40000000, 0x40000002, 510   # SQLite's lock bytes (os_unix.c)
    _epochs = itertools.count(1)                      # shared by every guard: no two holds share a number

    def __init__(self, path: str, identity: tuple):
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._wal = os.path.realpath(path) + "-wal"    # SQLite keeps it beside the file a link points to
        self._close_fd = weakref.finalize(self, os.close, self._fd)   # once, by close() or when dropped
        status = os.fstat(self._fd)
        self.identity = (status.st_dev, status.st_ino)
        self.usable = self.identity == identity       # the path moved to another file between stat and open
        self._lock = threading.Lock()
        self._held = False
        self._epoch = 0
        self._closed = False
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None

    def _lock_request(self, command: int, kind: int, start: int, length: int) -> int:
        """One fcntl lock call on the guard's descriptor; returns the lock type fcntl reports back."""
        answer = fcntl.fcntl(self._fd, command, struct.pack(_LOCK_FORMAT, kind, os.SEEK_SET, start, length, 0))
        return struct.unpack(_LOCK_FORMAT, answer)[0]

    def _follower_waiting(self) -> bool:
        return self._lock_request(fcntl.F_OFD_GETLK, fcntl.F_RDLCK, self.PENDING_BYTE, 1) != fcntl.F_UNLCK

    def _release(self) -> None:
        if self._held:
            self._lock_request(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, self.SHARED_FIRST, self.SHARED_SIZE)
            self._held = False

    def epoch(self, give_way_seconds: float = 0.0) -> int | None:
        """The epoch a connection may be kept in, taking the guard if it is free; None when no connection
        may be kept now (a follower still waits or writes, the file is in WAL mode, or the guard is closed).

        While a follower waits for its turn or writes, the request waits first, up to ``give_way_seconds``:
        SQLite would not hold it back. Its pending byte stops only processes that hold no shared lock yet;
        a connection of a process that already reads the file (another request) is given one at once. So
        with requests overlapping, the follower would wait for a moment when none is in flight: seconds
        with eight clients, more with sixteen (docs/several-machines.md). Waiting here, new requests let
        the ones in flight finish, the follower write, and then read its change."""
        deadline = pause = None
        while True:
            with self._lock:
                if self._closed or not self.usable:
                    return None
                try:
                    epoch = self._epoch_now()
                except OSError as error:              # a kernel without OFD locks (before 3.15), say
                    logger.warning("replica: connections are opened per request: %s", error)
                    self.usable = False
                    return None
            if epoch is not self.FOLLOWER_TURN:
                return epoch
            now = time.monotonic()
            if deadline is None:
                deadline, pause = now + give_way_seconds, 0.001
            if now >= deadline:                       # a follower that takes long: SQLite's busy timeout rules
                return None
            time.sleep(min(pause, deadline - now))
            pause = min(2 * pause, 0.01)              # a commit is applied in a few ms, a batch in tens

    FOLLOWER_TURN = -1                                # _epoch_now's answer while a follower waits or writes

    def _epoch_now(self) -> int | None:
        if self._follower_waiting():
            self._release()
            return self.FOLLOWER_TURN
        if not self._held:
            if not self._rollback_journal_mode():
                return None
            try:
                self._lock_request(fcntl.F_OFD_SETLK, fcntl.F_RDLCK, self.SHARED_FIRST, self.SHARED_SIZE)
            except (BlockingIOError, PermissionError):  # the follower holds its exclusive lock: it writes
                return None
            self._held = True
            self._epoch = next(self._epochs)
            if self._watcher is None:                 # it holds the guard weakly: a dropped guard stops it
                self._watcher = threading.Thread(target=_FollowerGuard._watch, name="follower-guard", daemon=True,
                                                 args=(weakref.ref(self), self._stop_watching, self.WATCH_SECONDS))
                self._watcher.start()
        return self._epoch

    def _rollback_journal_mode(self) -> bool:
        """Whether SQLite opens the file in rollback-journal mode: the header says so (its write version is
        1; Litestream sets it) and there is no WAL to read (SQLite takes an empty -wal file for none)."""
        try:
            wal_size = os.stat(self._wal).st_size
        except FileNotFoundError:
            wal_size = 0
        return os.pread(self._fd, 1, 18) == b"\x01" and wal_size == 0

    def still(self, epoch: int) -> bool:
        """Whether the guard has been held without a break since ``epoch`` began."""
        with self._lock:
            return self._held and self._epoch == epoch and not self._closed

    @staticmethod
    def _watch(guard_ref: weakref.ref, stop: threading.Event, interval: float) -> None:
        """Every ``interval``: release the guard if a follower waits for it (for when no request comes)."""
        while not stop.wait(interval):
            guard = guard_ref()
            if guard is None:
                return
            with guard._lock:
                if guard._closed or not guard.usable:
                    return
                with contextlib.suppress(OSError):
                    if guard._held and guard._follower_waiting():
                        guard._release()
            del guard

    def close(self) -> None:
        """Release the guard and stop its watcher (before ``serve --workers`` forks: no thread may run)."""
        with self._lock:
            self._closed = True
            self._held = False
            self._close_fd()                          # releases the lock with the descriptor
        self._stop_watching.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()


class Database:
    """Read-only connections to one SQLite file, one kept idle per thread (and, for a feed change only, a
    read-write connection of its own: write_session).

    A thread reuses its connection (a fresh one costs about 500 µs: the schema parsed, the statements
    prepared again); a connection is never used by two requests at once. A connection is dropped, and the
    next request opens a fresh one, when a query on it failed or the file was replaced (another inode),
    so the service recovers without a restart.

    On a replica (``replica=True``) a follower such as ``litestream restore -f`` writes changes into the
    file itself, under SQLite's exclusive lock, never through SQLite. It must get its turn, and no
    connection may answer from pages it cached before a change. So a connection is kept only while a
    _FollowerGuard stops the follower from writing (Linux, the file in rollback-journal mode, as a copy is
    after Litestream's first change of its page 1), and only within the epoch it was opened in; otherwise
    each request opens a connection and closes it at the end (a connection to a file in WAL mode keeps a
    shared lock for as long as it is open). Either way a request that starts while the follower waits
    for its turn or writes waits for it (the guard gives way, up to the busy timeout) and then reads the
    new state, and a request in progress keeps its snapshot: the follower waits for it to finish."""

    def __init__(self, path: str, busy_timeout_ms: int = BUSY_TIMEOUT_MS, replica: bool = False,
                 clock: Callable[[], float] = time.time):
        self.path = os.path.abspath(path)
        self._clock = clock
        self._uri = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
        self._timeout = busy_timeout_ms / 1000
        self._replica = replica
        self._guard: _FollowerGuard | None = None
        self._guard_lock = threading.Lock()
        self._idle = threading.local()
        self._lock_files: dict[str, tuple[int, int]] = {}      # path: (inode, descriptor), for writing_now
        self._wal_index_path = self.path + "-shm"
        self._first_seen: dict[tuple[int, int], float] = {}    # (user, version): when a replica first read it

    @property
    def replica(self) -> bool:
        return self._replica

    def writing_now(self, wal_index: WalIndex | None = None, inode: int | None = None
                    ) -> tuple[bool | None, WalIndex | None]:
        """Whether a write transaction holds SQLite's write lock on the file right now: in WAL mode the
        -shm file's WAL_WRITE_LOCK byte (120), in rollback-journal mode the database's RESERVED byte. Asked
        with F_OFD_GETLK, which sees the locks of other processes and of this one's other connections;
        None where that cannot be asked (no OFD locks, no lock file). Also the -shm file it was asked on
        (None in rollback-journal mode), for check_in.

        ``wal_index`` is the -shm file a kept connection was checked in with: it is asked without looking
        the name up. While a connection that has read the database in WAL mode is open it holds a shared
        lock on the database file, so no other connection can be the last to close (which deletes the
        -shm file) or change the journal mode: the file the descriptor names is the one in use. ``inode``
        is the database's, where the caller has just looked it up (session's identity)."""
        if fcntl is None or not hasattr(fcntl, "F_OFD_GETLK"):
            return None, None
        try:
            if wal_index is None:
                wal_index = self._wal_index()
            if wal_index is not None:
                answer = fcntl.fcntl(wal_index.descriptor, fcntl.F_OFD_GETLK, _WAL_WRITE_LOCK_QUERY)
            else:
                descriptor = self._lock_file(self.path, os.stat(self.path).st_ino if inode is None else inode)
                answer = fcntl.fcntl(descriptor, fcntl.F_OFD_GETLK, _RESERVED_LOCK_QUERY)
        except OSError:
            return None, None
        return struct.unpack(_LOCK_FORMAT, answer)[0] != fcntl.F_UNLCK, wal_index

    def _wal_index(self) -> WalIndex | None:
        """The -shm file by its name now (None when there is none: rollback-journal mode)."""
        try:
            inode = os.stat(self._wal_index_path).st_ino
        except FileNotFoundError:
            return None
        return WalIndex(self._lock_file(self._wal_index_path, inode), inode)

    def _lock_file(self, path: str, inode: int) -> int:
        """A read-only descriptor of ``path`` to ask its locks, kept while the file is the same file."""
        known = self._lock_files.get(path)
        if known is not None and known[0] == inode:
            return known[1]
        with self._guard_lock:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if known is not None:
                os.close(known[1])
            self._lock_files[path] = (inode, descriptor)
            return descriptor

    def first_seen(self, user_id: int, version: int, now: float) -> float:
        """When this process first read this version of the user's data (a replica's Last-Modified follows
        it: its follower may bring two states of one second at different moments)."""
        key = (user_id, version)
        seen = self._first_seen.get(key)
        if seen is None:
            if len(self._first_seen) >= 65536:
                self._first_seen.clear()                      # forgotten states count from now: later, safe
            seen = self._first_seen.setdefault(key, now)
        return seen

    def _identity(self) -> tuple:
        try:
            status = os.stat(self.path)
        except OSError as error:
            raise DatabaseUnavailable(f"cannot open {self.path}: {error.strerror}") from error
        return status.st_dev, status.st_ino

    def _open(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self._uri, uri=True, timeout=self._timeout, isolation_level=None,
                                   check_same_thread=False, cached_statements=32)
        except sqlite3.Error as error:
            raise _storage_error(error) from error

    def _replica_guard(self, identity: tuple) -> _FollowerGuard | None:
        """The follower guard of the file at ``identity`` (a new one when the file changed), if any."""
        if fcntl is None or not hasattr(fcntl, "F_OFD_SETLK"):
            return None
        with self._guard_lock:
            guard = self._guard
            if guard is None or guard.identity != identity:
                if guard is not None:
                    guard.close()
                try:
                    guard = self._guard = _FollowerGuard(self.path, identity)
                except OSError:
                    guard = self._guard = None
            return guard

    def session(self) -> Session:
        """A read transaction on this thread's connection (or a new one)."""
        started = self._clock()
        identity = self._identity()
        guard = epoch = None
        if self._replica:
            guard = self._replica_guard(identity)
            epoch = guard.epoch(self._timeout) if guard is not None else None
            identity = (*identity, epoch)             # kept connections match only within their epoch
        idle = getattr(self._idle, "connection", None)
        self._idle.connection = None
        kept = idle is not None and idle[1] == identity
        if not kept and idle is not None:
            idle[0].close()
        # Asked before the snapshot is taken; a replica's follower writes no change clocks, so it is not asked.
        checked = idle[2] if kept else None       # the -shm file this connection was checked in with
        if self._replica:
            quiet, wal_index = False, None
        else:
            writing, wal_index = self.writing_now(checked, identity[1])
            quiet = writing is False
        connection = idle[0] if kept else self._open()
        session = self._session_on(connection, identity, quiet, started, wal_index, checked is not None)
        if epoch is not None:
            session.start_reading()                   # from here on the follower waits for this request
            if not guard.still(epoch):                # it wrote first: the cache may be older than the file
                session.discard()
                return self._session_on(self._open(), (*identity[:-1], None), quiet, started)
        return session

    def _session_on(self, connection: sqlite3.Connection, identity: tuple, quiet: bool = False,
                    started: float = 0.0, wal_index: WalIndex | None = None, wal_index_checked: bool = False
                    ) -> Session:
        try:
            return Session(self, connection, identity, quiet, started, wal_index, wal_index_checked)
        except BaseException:
            connection.close()
            raise

    def check_in(self, connection: sqlite3.Connection, identity: tuple, reusable: bool,
                 wal_index: WalIndex | None = None, wal_index_checked: bool = False) -> None:
        """Keep the connection for this thread's next request, unless it failed, one is kept already or
        it belongs to no epoch of a replica's guard; with the -shm file its request asked, once that is
        known to be the one the connection reads (see writing_now): the name is looked up again now
        that the connection has read in WAL mode, in case the file was replaced in between."""
        keep = reusable and not (self._replica and identity[-1] is None)
        if keep and getattr(self._idle, "connection", None) is None:
            if wal_index is not None and not wal_index_checked and self._wal_index() != wal_index:
                wal_index = None
            self._idle.connection = (connection, identity, wal_index)
        else:
            connection.close()

    def write_session(self) -> WriteSession:
        """A write transaction on a new read-write connection (feed management only). A replica refuses:
        its follower would overwrite the change, which belongs on the primary."""
        if self._replica:
            raise DatabaseReadOnly("this instance serves a replica; feed changes go to the primary")
        try:
            connection = sqlite3.connect("file:" + urllib.parse.quote(self.path) + "?mode=rw", uri=True,
                                         timeout=self._timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as error:
            if _is_read_only(error) and os.path.exists(self.path):
                raise DatabaseReadOnly("the database file cannot be opened for writing") from error
            raise _storage_error(error) from error
        try:
            connection.execute("PRAGMA foreign_keys = ON")
            return WriteSession(connection)
        except BaseException:
            connection.close()
            raise

    def check(self) -> None:
        """Fail with DatabaseUnavailable unless the file opens as a Timeslot database (start-up check)."""
        session = self.session()
        try:
            if not session.schema_current():
                raise DatabaseUnavailable(f"{self.path} has no Timeslot schema, or an older one (run initdb)")
        finally:
            session.close()
            self.release()

    def release(self) -> None:
        """Close this thread's idle connection and the follower guard. After the start-up check nothing
        stays open and no thread runs, so `serve --workers` forks neither: a connection must never cross a
        fork (the child would inherit the parent's lock bookkeeping without its locks), and a guard's lock
        belongs to its open file, which a fork would share between the processes."""
        idle = getattr(self._idle, "connection", None)
        self._idle.connection = None
        if idle is not None:
            idle[0].close()
        with self._guard_lock:
            if self._guard is not None:
                self._guard.close()
                self._guard = None
            for _, descriptor in self._lock_files.values():
                os.close(descriptor)
            self._lock_files.clear()


def connect_for_writing(path: str, create: bool = False) -> sqlite3.Connection:
    """A read-write connection for the command line, with foreign keys enforced."""
    if not create and not os.path.exists(path):
        raise DatabaseUnavailable(f"no database at {path} (run initdb first)")
    try:
        connection = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        connection.text_factory = lambda raw: raw.decode("utf-8", "replace")
        connection.execute("PRAGMA foreign_keys = ON")
        return connection
    except sqlite3.Error as error:
        raise DatabaseUnavailable(f"cannot open {path}: {error}") from error


_ADDED_COLUMN = re.compile(r"\s*ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)", re.IGNORECASE)


def schema_statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, whole (a trigger's inner semicolons do not end it), without the
    comments between them."""
    statement = ""
    for line in script.splitlines(keepends=True):
        if not statement and (not line.strip() or line.lstrip().startswith("--")):
            continue                                   # comments between statements
        statement += line
        if sqlite3.complete_statement(statement):
            yield statement.strip()
            statement = ""


def apply_schema(connection: sqlite3.Connection) -> None:
    """Bring the database up to schema.sql, keeping every row (``initdb``; idempotent).

    CREATE statements say IF NOT EXISTS; an ALTER TABLE ... ADD COLUMN (a column added after the first
    release) runs only when the column is missing. The journal mode is set first, outside the transaction
    (SQLite refuses to change it inside one); everything else is one transaction, all or nothing."""
    statements = list(schema_statements(schema_text()))
    pragmas = [statement for statement in statements if statement.upper().startswith("PRAGMA")]
    for statement in pragmas:
        connection.execute(statement)
    connection.execute("BEGIN IMMEDIATE")
    try:
        for statement in statements:
            added = _ADDED_COLUMN.match(statement)
            if statement in pragmas or (added and _has_column(connection, *added.groups())):
                continue
            connection.execute(statement)
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def schema_text() -> str:
    """schema.sql: beside the module in a checkout, inside the archive of the zipapp (`make dist`), or where
    pip installed it (setup.cfg's data_files, under the environment's share/timeslot-export/), found
    through the distribution's own file list, so a virtual environment, a --user install and pipx all
    work from any directory."""
    if os.path.exists(SCHEMA_PATH):
        with open(SCHEMA_PATH, encoding="utf-8") as schema:
            return schema.read()
    loader = globals().get("__loader__")
    if hasattr(loader, "archive"):                       # zipimport: the module runs from a .pyz
        return loader.get_data(SCHEMA_PATH).decode("utf-8")
    import importlib.metadata                            # only for an installed module, for initdb and demo
    try:
        installed = [file for file in importlib.metadata.files(DISTRIBUTION) or () if file.name == "schema.sql"]
    except importlib.metadata.PackageNotFoundError:
        installed = []
    with open(installed[0].locate() if installed else SCHEMA_PATH, encoding="utf-8") as schema:
        return schema.read()


def _has_column(connection: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in connection.execute(SQL_TABLE_COLUMNS, (table,)))


def token_digest(token: str) -> str:
    """SPEC §2: the lowercase hex SHA-256 of a token's UTF-8 bytes."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Time zones: the machine's tz database, read from its TZif files (RFC 8536), once per zone
# ---------------------------------------------------------------------------------------------------

# SPEC §2's shape of a zone name (the schema checks the same): it can never leave a zoneinfo folder.
ZONE_NAME_PATTERN = re.compile(r"(?!/)(?!.*//)[A-Za-z0-9_+/-]{1,64}(?<!/)")
RULE_TABLE_END_YEAR = 2200          # a zone's footer rule is tabulated to here and computed beyond
EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
FIRST_INSTANT = (1 - EPOCH_ORDINAL) * 86400                      # 0001-01-01T00:00:00Z
LAST_INSTANT = (datetime.date.max.toordinal() + 1 - EPOCH_ORDINAL) * 86400 - 1
RULE_TABLE_END = (datetime.date(RULE_TABLE_END_YEAR + 1, 1, 1).toordinal() - EPOCH_ORDINAL) * 86400
WEEKDAYS = ("SU", "MO", "TU", "WE", "TH", "FR", "SA")            # POSIX numbers them from Sunday = 0


@functools.lru_cache(maxsize=16384)
def _day_number(date: str) -> int:
    """Days since 1970-01-01 of a date in basic form (20190920); cached, as an export meets few dates."""
    return datetime.date(int(date[:4]), int(date[4:6]), int(date[6:8])).toordinal() - EPOCH_ORDINAL


@functools.lru_cache(maxsize=16384)
def _day_text(day_number: int) -> str:
    day = datetime.date.fromordinal(day_number + EPOCH_ORDINAL)
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


_MINUTE_TEXT = tuple(f"{minute // 60:02d}{minute % 60:02d}" for minute in range(1440))   # "0000" .. "2359"
_MINUTE_OF = {text: minute for minute, text in enumerate(_MINUTE_TEXT)}                 # and back
FIRST_DAY, LAST_DAY = 1 - EPOCH_ORDINAL, datetime.date.max.toordinal() - EPOCH_ORDINAL


def utc_seconds(basic: str) -> int:
    """Seconds since 1970 of a UTC date-time in iCalendar's basic form (20190920T194402Z)."""
    return (_day_number(basic[:8]) * 1440 + int(basic[9:11]) * 60 + int(basic[11:13])) * 60 + int(basic[13:15])


def basic_time(seconds: int) -> str:
    """Seconds since 1970 (of UTC or of a wall clock) as a date-time in basic form without the Z."""
    days, second = divmod(seconds, 86400)
    return f"{_day_text(days)}T{_MINUTE_TEXT[second // 60]}{second % 60:02d}"


def _year_of(seconds: int) -> int:
    """The UTC year of an instant, held within 1-9999 (a wall clock may run a day past either end)."""
    return datetime.date.fromordinal(min(max(seconds, FIRST_INSTANT), LAST_INSTANT) // 86400 + EPOCH_ORDINAL).year


@dataclasses.dataclass(frozen=True)
class Change:
    """One change of a zone's UTC offset (or of its abbreviation) at a UTC instant."""

    at: int
    offset_from: int
    offset_to: int
    dst_from: bool
    dst_to: bool
    name: str               # the abbreviation from then on: CEST, -03

    @property
    def kind(self) -> str:
        """VTIMEZONE's sub-component: DAYLIGHT for the change into the larger offset of a daylight-saving
        pair, even where the database calls winter time the daylight one (Europe/Dublin's negative DST),
        as Windows and Outlook expect."""
        if self.dst_from != self.dst_to and self.offset_from != self.offset_to:
            return "DAYLIGHT" if self.offset_to > self.offset_from else "STANDARD"
        return "DAYLIGHT" if self.dst_to else "STANDARD"


@dataclasses.dataclass(frozen=True)
class RuleDate:
    """When a POSIX TZ rule changes the clocks each year: ``Mm.w.d`` (day ``d`` of week ``w`` of month
    ``m``, 5 = the last), ``Jn`` (day 1-365, never counting 29 February) or ``n`` (day 0-365), at
    ``seconds`` of wall-clock time, which RFC 8536 lets run below 0 or past 24 hours."""

    form: str
    month: int = 0
    week: int = 0
    weekday: int = 0
    day: int = 0
    seconds: int = 7200

    def local(self, year: int) -> int:
        """The wall-clock time of the change in ``year``, as seconds since 1970."""
        if self.form == "M":
            first = datetime.date(year, self.month, 1)
            day = 1 + (self.weekday - (first.weekday() + 1)) % 7 + 7 * (self.week - 1)
            if day > calendar.monthrange(year, self.month)[1]:
                day -= 7
            ordinal = first.toordinal() + day - 1
        else:
            ordinal = datetime.date(year, 1, 1).toordinal() + self.day
            if self.form == "J":
                ordinal += -1 + (calendar.isleap(year) and self.day >= 60)
        return (ordinal - EPOCH_ORDINAL) * 86400 + self.seconds

    def recurrences(self) -> list[tuple[int | None, str]]:
        """The same dates as yearly RRULEs, for a DTSTART at this rule's time of day (which may fall on
        another day than the rule names: "Thursday, 26:00" is Friday at 02:00), each with the month its
        dates fall in (None: any). Where the moved days run over a month's end there is one rule per month,
        and each year exactly one of them fires: ical.js (Thunderbird) refuses BYYEARDAY beside BYDAY, and
        Outlook reads BYMONTH rules best."""
        shift = self.seconds // 86400
        if self.form != "M":
            if shift:
                raise ValueError("a J or n rule date with a time outside 0-24 h")
            if self.form == "n":
                return [(None, f"FREQ=YEARLY;BYYEARDAY={self.day + 1}")]
            day = datetime.date(2001, 1, 1) + datetime.timedelta(days=self.day - 1)
            return [(None, f"FREQ=YEARLY;BYMONTH={day.month};BYMONTHDAY={day.day}")]
        if shift == 0:
            ordinal = -1 if self.week == 5 else self.week
            return [(None, f"FREQ=YEARLY;BYMONTH={self.month};BYDAY={ordinal}{WEEKDAYS[self.weekday]}")]
        # The seven days the named weekday can fall on, moved by the shift, as (month, BYMONTHDAY): counted
        # from the month's start, or for week 5 back from its end (-1 the last day), spilling into the
        # month before or after. February's length varies, so no day may count forward past its 28th.
        length = 28 if self.month == 2 else calendar.monthrange(2001, self.month)[1]
        days: dict[int, list[int]] = {}
        for day in (range(-7 + shift, shift) if self.week == 5 else
                    range(7 * self.week - 6 + shift, 7 * self.week + 1 + shift)):
            if self.week == 5 and day >= 0:
                month, day = self.month % 12 + 1, day + 1
            elif self.week == 5:               # counted from the start where the length is fixed: ical.js
                month = self.month             # loops forever on a negative BYMONTHDAY beside BYDAY
                day = day if self.month == 2 else length + 1 + day
            elif 1 <= day <= length:
                month = self.month
            elif day <= 0:
                month, day = (self.month - 2) % 12 + 1, day - 1
            elif self.month != 2:
                month, day = self.month % 12 + 1, day - length
            else:
                raise ValueError(f"rule date M{self.month}.{self.week}.{self.weekday} at {self.seconds} s")
            days.setdefault(month, []).append(day)
        weekday = WEEKDAYS[(self.weekday + shift) % 7]
        return [(month if len(days) > 1 else None,
                 f"FREQ=YEARLY;BYMONTH={month};BYDAY={weekday};BYMONTHDAY={','.join(map(str, month_days))}")
                for month, month_days in days.items()]


@dataclasses.dataclass(frozen=True)
class PosixRule:
    """A TZif footer with daylight saving time: two changes a year, from standard time into DST at
    ``start`` (standard wall-clock time) and back at ``end`` (daylight wall-clock time)."""

    std_offset: int
    std_name: str
    dst_offset: int
    dst_name: str
    start: RuleDate
    end: RuleDate

    def changes(self, year: int) -> list[Change]:
        into = Change(self.start.local(year) - self.std_offset, self.std_offset, self.dst_offset, False, True,
                      self.dst_name)
        back = Change(self.end.local(year) - self.dst_offset, self.dst_offset, self.std_offset, True, False,
                      self.std_name)
        return sorted((into, back), key=lambda change: change.at)

    def date_of(self, change: Change) -> RuleDate:
        return self.start if change.dst_to else self.end


_TZ_NAME = r"(<[A-Za-z0-9+-]+>|[A-Za-z]{3,})"
_TZ_OFFSET = r"([+-]?)([0-9]{1,3})(?::([0-9]{2}))?(?::([0-9]{2}))?"
_POSIX_TZ = re.compile(_TZ_NAME + _TZ_OFFSET + "(?:" + _TZ_NAME + "(?:" + _TZ_OFFSET + ")?,([^,]+),([^,]+))?")
_RULE_DATE = re.compile(r"(?:M([0-9]{1,2})\.([1-5])\.([0-6])|(J?)([0-9]{1,3}))(?:/" + _TZ_OFFSET + ")?")


def _posix_seconds(sign: str, hours: str, minutes: str | None, seconds: str | None) -> int:
    value = int(hours) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
    return -value if sign == "-" else value


def _rule_date(text: str) -> RuleDate:
    match = _RULE_DATE.fullmatch(text)
    if match is None:
        raise ValueError(f"rule date {text!r}")
    month, week, weekday, julian, day = match.groups()[:5]
    seconds = _posix_seconds(*match.groups()[5:]) if match.group(7) else 7200
    if month:
        if not 1 <= int(month) <= 12:
            raise ValueError(f"rule date {text!r}")
        return RuleDate("M", int(month), int(week), int(weekday), seconds=seconds)
    if not (1 if julian else 0) <= int(day) <= 365:
        raise ValueError(f"rule date {text!r}")
    return RuleDate("J" if julian else "n", day=int(day), seconds=seconds)


def footer_rule(footer: str) -> "PosixRule | tuple[int, str] | None":
    """A TZif footer (a POSIX TZ string; its offsets count west, hence the minus): the rule with DST,
    (offset, name) for a fixed offset, or None for an empty footer."""
    if not footer:
        return None
    match = _POSIX_TZ.fullmatch(footer)
    if match is None:
        raise ValueError(f"TZ string {footer!r}")
    std_name, dst_name = match.group(1).strip("<>"), match.group(6)
    std_offset = -_posix_seconds(*match.group(2, 3, 4, 5))
    if dst_name is None:
        return std_offset, std_name
    dst_offset = -_posix_seconds(*match.group(7, 8, 9, 10)) if match.group(8) else std_offset + 3600
    return PosixRule(std_offset, std_name, dst_offset, dst_name.strip("<>"), _rule_date(match.group(11)),
                     _rule_date(match.group(12)))


def read_tzif(data: bytes) -> tuple[list[tuple[int, tuple[int, bool, str]]], list[tuple[int, bool, str]], str]:
    """(transitions as (UTC instant, (offset, is DST, abbreviation)), every such type, footer) of a TZif
    file: the 64-bit data of version 2 and later, the 32-bit data of version 1 (RFC 8536 §3)."""
    if data[:4] != b"TZif":
        raise ValueError("not a TZif file")
    version = data[4]
    counts = struct.unpack_from(">6l", data, 20)
    position, time_format = 44, "l"
    if version >= 0x32:
        isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt = counts
        position += timecnt * 5 + typecnt * 6 + charcnt + leapcnt * 8 + isstdcnt + isutcnt
        counts = struct.unpack_from(">6l", data, position + 20)
        position, time_format = position + 44, "q"
    isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt = counts
    instants = struct.unpack_from(f">{timecnt}{time_format}", data, position)
    position += timecnt * struct.calcsize(time_format)
    indexes = struct.unpack_from(f">{timecnt}B", data, position)
    position += timecnt
    raw_types = [struct.unpack_from(">lbB", data, position + 6 * n) for n in range(typecnt)]
    position += 6 * typecnt
    names = data[position:position + charcnt]
    position += charcnt + leapcnt * (struct.calcsize(time_format) + 4) + isstdcnt + isutcnt
    types = [(offset, bool(dst), names[at:names.index(b"\0", at)].decode("ascii")) for offset, dst, at in raw_types]
    footer = ""
    if version >= 0x32:
        if data[position:position + 1] != b"\n" or b"\n" not in data[position + 1:]:
            raise ValueError("no footer")
        footer = data[position + 1:data.index(b"\n", position + 1)].decode("ascii")
    return [(at, types[index]) for at, index in zip(instants, indexes)], types, footer


class TimeZone:
    """One zone of the tz database: every change of its UTC offset, for conversions and its VTIMEZONE.

    The changes are the file's transitions, then its footer rule's up to RULE_TABLE_END_YEAR (later
    years are computed), so a conversion is one bisect. ``_rule_from`` is the first change from which
    every later one follows the footer rule (a fat TZif file repeats the rule's changes to 2037): the
    VTIMEZONE lists the changes before it one by one and states the rule as two yearly RRULEs."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self.fingerprint = hashlib.sha256(data).hexdigest()[:16]
        self.changed = 0                                   # when its file changed (Last-Modified follows it)
        transitions, types, footer = read_tzif(data)
        rule = footer_rule(footer)
        self.rule = rule if isinstance(rule, PosixRule) else None
        # Before the first transition: the first standard-time type, as zoneinfo reads it.
        if transitions:
            before = next(((o, d, n) for o, d, n in types if not d), transitions[0][1])
        elif isinstance(rule, tuple):
            before = (rule[0], False, rule[1])
        elif self.rule is None:
            before = types[-1]
        else:
            before = None                                  # the rule alone, from year 1
        changes: list[Change] = []
        for at, (offset, dst, abbreviation) in transitions:
            if at < FIRST_INSTANT:                         # before year 1 (zic's "big bang"): a starting state
                before = (offset, dst, abbreviation)
                continue
            previous = (changes[-1].offset_to, changes[-1].dst_to, changes[-1].name) if changes else before
            if previous != (offset, dst, abbreviation):
                changes.append(Change(at, previous[0], offset, previous[1], dst, abbreviation))
        self._rule_from = len(changes)
        if self.rule is not None:
            self._rule_from = self._first_following_rule(changes)
            first_year = _year_of(changes[-1].at) if changes else 1
            changes += [change for year in range(first_year, RULE_TABLE_END_YEAR + 1)
                        for change in self.rule.changes(year) if not changes or change.at > changes[-1].at]
            if before is None:
                before = (changes[0].offset_from, changes[0].dst_from,
                          self.rule.dst_name if changes[0].dst_from else self.rule.std_name)
        self._before = before
        self._changes = changes
        self._instants = [change.at for change in changes]
        self._vtimezones: dict[int, str] = {}

    def _first_following_rule(self, changes: list[Change]) -> int:
        """The index from which the file's own transitions are those the footer rule gives anyway, each
        followed by the rule's next change (a zone that paused DST, like Haiti in 2016, breaks the run)."""
        first = len(changes)
        while first:
            year = _year_of(changes[first - 1].at)
            ruled = self.rule.changes(year - 1) + self.rule.changes(year) + self.rule.changes(year + 1)
            if changes[first - 1] not in ruled:
                break
            following = ruled.index(changes[first - 1]) + 1
            if first < len(changes) and ruled[following] != changes[first]:
                break
            first -= 1
        return first

    def _last_change(self, at: int) -> Change | None:
        """The latest change at or before the UTC instant ``at`` (None: before the first)."""
        if at >= RULE_TABLE_END and self.rule is not None:      # past the table: the rule's own changes
            year = _year_of(at)
            changes = self.rule.changes(year - 1) + self.rule.changes(year)
            return changes[bisect.bisect_right([change.at for change in changes], at) - 1]
        index = bisect.bisect_right(self._instants, at) - 1
        return self._changes[index] if index >= 0 else None

    def utc_offset(self, at: int) -> int:
        change = self._last_change(at)
        return self._before[0] if change is None else change.offset_to

    def local_time(self, instant: str) -> str | None:
        """The wall-clock time of a UTC instant (both in basic form), or None where a local time cannot name
        it: the second pass of a repeated hour (a local time names the first, RFC 5545 §3.3.5), or a wall
        clock past 9999-12-31.

        This runs for every zoned DTSTART, DTEND and EXDATE, so it works on the text: with an offset of
        whole minutes (every zone since the 1970s) the seconds stay as they are, the hours and minutes come
        from a table, and the date is formatted only when the offset crosses midnight."""
        day = _day_number(instant[:8])
        minute = _MINUTE_OF.get(instant[9:13])
        if minute is None:                             # not a time of day: a file written past schema.sql's checks
            minute = int(instant[9:11]) * 60 + int(instant[11:13])
        at = (day * 1440 + minute) * 60 + int(instant[13:15])
        if at < RULE_TABLE_END:                        # _last_change, inlined for the common case
            index = bisect.bisect_right(self._instants, at) - 1
            change = self._changes[index] if index >= 0 else None
        else:
            change = self._last_change(at)
        if change is None:
            offset = self._before[0]
        else:
            offset = change.offset_to
            if change.offset_from > offset and at < change.at + change.offset_from - offset:
                return None
        if offset % 60:
            local = at + offset
            return basic_time(local) if FIRST_INSTANT <= local <= LAST_INSTANT else None
        carry, minute = divmod(minute + offset // 60, 1440)
        if carry == 0:
            return f"{instant[:8]}T{_MINUTE_TEXT[minute]}{instant[13:15]}"
        if not FIRST_DAY <= day + carry <= LAST_DAY:
            return None
        return f"{_day_text(day + carry)}T{_MINUTE_TEXT[minute]}{instant[13:15]}"

    def utc_of_local(self, local: int) -> int:
        """The UTC instant a wall-clock time names (RFC 5545 §3.3.5): the first of a repeated hour, and in
        a gap the offset from before the gap."""
        before, after = self.utc_offset(local - 2 * 86400), self.utc_offset(local + 2 * 86400)
        named = [local - offset for offset in (before, after) if self.utc_offset(local - offset) == offset]
        return min(named) if named else local - before

    def vtimezone(self, since: int) -> str:
        """The VTIMEZONE component, exact for every instant from ``since`` on (cached per first change)."""
        first = bisect.bisect_right(self._instants, since) - 1
        text = self._vtimezones.get(first)
        if text is None:
            text = self._vtimezones[first] = self._write_vtimezone(first, since)
        return text

    def _write_vtimezone(self, first: int, since: int) -> str:
        """SPEC §4: from the change in force at ``since`` on, the file's changes as sub-components with
        one RDATE per property (the DTSTART repeated as the first), then the rule as RRULEs whose DTSTART
        is their own first occurrence; no UNTIL is needed, the rule runs on."""
        components: list[tuple[int, str]] = []
        if first < 0:                       # nothing changed before ``since``: the starting state
            offset, dst, abbreviation = self._before
            start = "16010101T000000" if since >= utc_seconds("16010101T000000Z") else "00010101T000000"
            state = Change(FIRST_INSTANT, offset, offset, dst, dst, abbreviation)
            components.append((FIRST_INSTANT, _observance(state, start, "")))
        rule_from = max(first, 0, self._rule_from)
        listed: dict[tuple, list[Change]] = {}
        for change in self._changes[max(first, 0):min(self._rule_from, len(self._changes))]:
            key = (change.kind, change.offset_from, change.offset_to, change.name)
            listed.setdefault(key, []).append(change)
        for group in listed.values():
            dates = [basic_time(change.at + change.offset_from) for change in group]
            rdates = "".join(f"RDATE:{date}\r\n" for date in dates) if len(dates) > 1 else ""
            components.append((group[0].at, _observance(group[0], dates[0], rdates)))
        if self.rule is not None:
            for kind in self._changes[rule_from:rule_from + 2]:
                for month, rule in self.rule.date_of(kind).recurrences():
                    for change in self._changes[rule_from:]:    # DTSTART: the rule's first change from here
                        start = basic_time(change.at + change.offset_from)     # on, in the month it covers
                        if change.dst_to == kind.dst_to and month in (None, int(start[4:6])):
                            break
                    components.append((change.at, _observance(change, start, f"RRULE:{rule}\r\n")))
        components.sort(key=lambda component: component[0])
        return (f"BEGIN:VTIMEZONE\r\nTZID:{self.name}\r\n" + "".join(text for _, text in components)
                + "END:VTIMEZONE\r\n")


def _utc_offset_text(seconds: int) -> str:
    """A UTC-OFFSET value (§3.3.14): +0100, -0330, +005328 for a local mean time; never -0000."""
    sign = "-" if seconds < 0 else "+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{sign}{hours:02d}{minutes:02d}" + (f"{seconds:02d}" if seconds else "")


def _observance(change: Change, start: str, recurrence: str) -> str:
    """One STANDARD or DAYLIGHT sub-component (§3.6.5)."""
    name = f"TZNAME:{escape_text(change.name)}\r\n" if change.name else ""
    return (f"BEGIN:{change.kind}\r\nDTSTART:{start}\r\nTZOFFSETFROM:{_utc_offset_text(change.offset_from)}\r\n"
            f"TZOFFSETTO:{_utc_offset_text(change.offset_to)}\r\n{name}{recurrence}END:{change.kind}\r\n")


def _zone_file(name: str) -> tuple[bytes, int, str | None] | None:
    """A zone's TZif bytes, when its file last changed (its ctime, rounded up: an update of the time zone
    data rewrites it) and the file's path, found where zoneinfo finds them: the TZPATH folders (the system's
    zoneinfo files, PYTHONTZPATH), then the ``tzdata`` package when it is installed."""
    for folder in zoneinfo.TZPATH:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                return file.read(), math.ceil(os.fstat(file.fileno()).st_ctime), path
    package, _, leaf = ("tzdata/zoneinfo/" + name).rpartition("/")
    try:
        import importlib.resources                 # only when the system's folders lack the zone
        resource = importlib.resources.files(package.replace("/", ".")).joinpath(leaf)
        data = resource.read_bytes()
    except (ImportError, OSError):
        return None
    try:
        return data, math.ceil(os.stat(resource).st_ctime), os.fspath(resource)
    except (OSError, TypeError):                   # inside an archive: the archive's own time
        return data, _changed_at(getattr(sys.modules.get("tzdata"), "__file__", None)), None


def _changed_at(path: str | None) -> int:
    """The ctime of a file, rounded up to a whole second; 0 when it cannot be read."""
    try:
        return math.ceil(os.stat(path).st_ctime) if path else 0
    except OSError:
        return 0


# name: (the zone or None, its file, the file's ctime when it was read)
_zones: dict[str, tuple["TimeZone | None", str | None, int]] = {}
_zones_lock = threading.Lock()


def time_zone(name: str, fresh: bool = False) -> TimeZone | None:
    """The zone called ``name`` in this machine's tz database, read once per process, and again when its
    file changed if ``fresh`` (each calendar's zones are: an update of the time zone data shows in the next
    export, and its Last-Modified follows the file); None when the database lacks it or has none (its slots
    are then written in UTC, and a warning says so once)."""
    known = _zones.get(name)
    if known is not None and not (fresh and known[1] is not None and _changed_at(known[1]) != known[2]):
        return known[0]
    with _zones_lock:
        if _zones.get(name) is known:
            _zones[name] = _load_time_zone(name, warn=known is None)
        return _zones[name][0]


def _load_time_zone(name: str, warn: bool = True) -> tuple["TimeZone | None", str | None, int]:
    found = _zone_file(name) if ZONE_NAME_PATTERN.fullmatch(name) else None
    if found is None:
        if warn:
            logger.warning("time zone %r is not in this machine's time zone database: its slots are written in "
                           "UTC (install the tzdata package to add the database)", name)
        return None, None, 0
    data, changed, path = found
    try:
        zone = TimeZone(name, data)
    except (ValueError, IndexError, struct.error, UnicodeDecodeError) as error:
        logger.warning("time zone %r cannot be read from the time zone database (%s): its slots are written "
                       "in UTC", name, error)
        return None, path, changed
    zone.changed = changed
    return zone, path, changed


# ---------------------------------------------------------------------------------------------------
# iCalendar (RFC 5545): small pure functions; an event's free text stays UTF-8 bytes
# ---------------------------------------------------------------------------------------------------

CRLF = "\r\n"
PRODID = "-//Timeslot//Timeslot Export//EN"
CLASS_BY_VISIBILITY = {"public": "PUBLIC", "private": "PRIVATE", "friends": "CONFIDENTIAL",
                       "foaf": "CONFIDENTIAL"}

# §3.3.11 TEXT: backslash, semicolon and comma are escaped, a line break becomes \n. Other control
# characters (not TAB) cannot appear in a content line (§3.1 "Control characters are not permitted"),
# so they are dropped; a lone surrogate cannot be encoded as UTF-8 and becomes U+FFFD.
_TEXT_NEEDS_WORK = re.compile("[\\\\;,\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
_TEXT_DROPPED = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def escape_text(value: str) -> str:
    """A TEXT value (§3.3.11) that no stored character can break out of.

    A chain of str.replace runs at C speed; str.translate with multi-character replacements takes a
    per-character slow path in CPython (8 µs for a short title), and this is the export's hot loop."""
    if _TEXT_NEEDS_WORK.search(value) is None:
        return value
    value = (value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
             .replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n"))
    if not value.isprintable():          # rare (TAB, U+2028, controls, surrogates): a C scan rules it out
        value = _SURROGATE.sub("\ufffd", _TEXT_DROPPED.sub("", value))
    return value


# Greedy pieces of at most 75 (first line) or 74 (continuations, after their SPACE) octets that never end
# before a UTF-8 continuation byte: the regex backs off to the start of a character in C. The _PAIRED
# forms also never end in a backslash, which is exact where every backslash starts an escape pair: the
# piece is then one octet shorter, as _pieces_keeping_escapes would make it (see fold_utf8).
_FIRST_PIECE = re.compile(b"(?s).{1,75}(?![\x80-\xbf])")
_NEXT_PIECE = re.compile(b"(?s).{1,74}(?![\x80-\xbf])")
_FIRST_PIECE_PAIRED = re.compile(b"(?s).{1,75}(?![\x80-\xbf])(?<!\\\\)")
_NEXT_PIECE_PAIRED = re.compile(b"(?s).{1,74}(?![\x80-\xbf])(?<!\\\\)")


def fold_line(line: str) -> str:
    """Fold a content line (§3.1) greedily into physical lines of at most 75 octets.

    Each continuation starts with one SPACE, which counts toward its 75 octets. A fold never falls
    inside a UTF-8 sequence, nor between a backslash and the character it escapes (clients that unfold
    before unescaping would otherwise see the pair split)."""
    ascii_only = line.isascii()
    if len(line) <= 75 and (ascii_only or len(line.encode("utf-8")) <= 75):
        return line
    if ascii_only and "\\" not in line:      # one octet per character, no escape pair to keep whole
        return "\r\n ".join([line[:75]] + [line[i:i + 74] for i in range(75, len(line), 74)])
    return fold_utf8(line.encode("utf-8")).decode("utf-8")


def fold_utf8(data: bytes) -> bytes:
    """fold_line for a content line in UTF-8 (the event writer's text properties are bytes).

    An escaped backslash ("\\\\") is folded as a stand-in that a fold cannot split either: "\\x01\\x80",
    a control character (escape_utf8 drops those) and a continuation byte (no piece ends before one). The
    backslashes left then each start an escape pair, so one regex pass in C folds the line exactly as
    _pieces_keeping_escapes would."""
    if len(data) <= 75:
        return data
    paired = b"\\\\" in data
    if not paired or b"\x01" not in data:
        text = data.replace(b"\\\\", b"\x01\x80") if paired else data
        if data[0] < 0x80 and data[0] != 0x5C:     # a one-octet first character: the first piece is it and
            pieces = _NEXT_PIECE_PAIRED.findall(text, 1)      # the greedy 74 after it, one regex call in all
            if pieces:
                pieces[0] = text[:1] + pieces[0]
        else:
            first = _FIRST_PIECE_PAIRED.match(text)
            pieces = [] if first is None else [first.group(), *_NEXT_PIECE_PAIRED.findall(text, first.end())]
        folded = b"\r\n ".join(pieces)
        if pieces and len(folded) == len(data) + 3 * (len(pieces) - 1):   # no octet skipped (a final backslash)
            return folded.replace(b"\x01\x80", b"\\\\") if paired else folded
    first = _FIRST_PIECE.match(data).end()
    folded = b"\r\n ".join([data[:first]] + _NEXT_PIECE.findall(data, first))
    if b"\\\r\n " in folded:                # a fold right after a backslash: maybe inside an escape pair
        folded = b"\r\n ".join(_pieces_keeping_escapes(data))
    return folded


def _pieces_keeping_escapes(data: bytes) -> list[bytes]:
    """The greedy pieces of fold_line, each moved back one octet where it would end in an escape's start."""
    size = len(data)
    pieces = []
    start, piece = 0, _FIRST_PIECE
    while start < size:
        cut = piece.match(data, start).end()
        if data[cut - 1] == 0x5C and cut < size:  # an odd run of backslashes ends in an escape's start
            backslashes = 1
            while data[cut - 1 - backslashes] == 0x5C:
                backslashes += 1
            cut -= backslashes % 2
        pieces.append(data[start:cut])
        start, piece = cut, _NEXT_PIECE
    return pieces


# SPEC §4: SUMMARY, DESCRIPTION and LOCATION are left out when their text is empty once control characters
# are dropped, or only spaces and TABs: libical (Evolution, GNOME Calendar) reports an empty value as an
# error and deletes the property, and it trims white space first.
_BLANK_CHARACTERS = " \t" + "".join(map(chr, range(0x20))) + "\x7f"
_BLANK_OCTETS = _BLANK_CHARACTERS.encode("ascii")


def is_written(text: str) -> bool:
    """Whether a SUMMARY, DESCRIPTION, LOCATION or calendar name has something to show."""
    return bool(text.strip(_BLANK_CHARACTERS))


def text_property(name: str, value: str) -> str:
    """A folded ``NAME:value`` line with its CRLF, for a TEXT value."""
    return fold_line(name + ":" + escape_text(value)) + CRLF


# The event writer's text is UTF-8, as the database hands it over (free text comes as BLOBs): every
# character that escape_text or is_written looks at is one octet below 0x80, and no such octet is part of
# a multi-octet sequence, so the same work on the octets gives the same text, without decoding it (for a
# long description with non-Latin text, decoding, escaping as str and encoding again costs several times
# more). Valid UTF-8 holds no surrogate.
_TEXT_NEEDS_WORK_UTF8 = re.compile(b"[\\\\;,\x00-\x08\x0a-\x1f\x7f]")
# The control characters escape_text drops (all but TAB, LF, CR): bytes.translate deletes them in a third
# of a regex substitution's time.
_DROPPED_OCTETS = bytes(range(0x09)) + b"\x0b\x0c" + bytes(range(0x0e, 0x20)) + b"\x7f"


def valid_utf8(raw: bytes) -> bytes:
    """Free text from a BLOB-cast column as valid UTF-8: invalid sequences become U+FFFD, as _decode
    makes them, instead of failing the export."""
    if raw.isascii():
        return raw
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace").encode("utf-8")
    return raw


def escape_utf8(value: bytes) -> bytes:
    """escape_text for valid UTF-8."""
    if _TEXT_NEEDS_WORK_UTF8.search(value) is None:
        return value
    value = value.replace(b"\\", b"\\\\").replace(b";", b"\\;").replace(b",", b"\\,")
    if b"\r" in value:
        value = value.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return value.replace(b"\n", b"\\n").translate(None, _DROPPED_OCTETS)


def format_decimal(value: float) -> str:
    """A FLOAT (§3.3.7) as plain decimals: never exponent notation, at most 6 decimals."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


@functools.lru_cache(maxsize=4096)
def _next_day(basic_date: str) -> str | None:
    """The date after YYYYMMDD, or None after 9999-12-31 (the last date iCalendar can write)."""
    day = datetime.date(int(basic_date[:4]), int(basic_date[4:6]), int(basic_date[6:8]))
    if day == datetime.date.max:
        return None
    day += datetime.timedelta(days=1)
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


# §3.3.10 RECUR. Value patterns per rule part, then the MUST NOTs the section states.
_FREQUENCIES = ("SECONDLY", "MINUTELY", "HOURLY", "DAILY", "WEEKLY", "MONTHLY", "YEARLY")
_WEEKDAY = r"(?:SU|MO|TU|WE|TH|FR|SA)"


def _number_list(digits: int, low: int, high: int, signed: bool) -> Callable[[str], bool]:
    pattern = re.compile((r"[+-]?" if signed else "") + r"([0-9]{1,%d})" % digits)

    def valid(value: str) -> bool:
        for item in value.split(","):
            match = pattern.fullmatch(item)
            if match is None or not low <= int(match.group(1)) <= high:
                return False
        return True
    return valid


def _weekday_list(value: str) -> bool:
    for item in value.split(","):
        match = re.fullmatch(r"(?:[+-]?([0-9]{1,2}))?" + _WEEKDAY, item)
        if match is None or (match.group(1) is not None and not 1 <= int(match.group(1)) <= 53):
            return False
    return True


def _valid_until(value: str) -> bool:
    match = re.fullmatch(r"([0-9]{4})([0-9]{2})([0-9]{2})(?:T([0-9]{2})([0-9]{2})([0-9]{2})Z?)?", value)
    if match is None:
        return False
    try:
        datetime.date(int(match.group(1)), int(match.group(2)), int(match.group(3)))
    except ValueError:
        return False
    return match.group(4) is None or (int(match.group(4)) <= 23 and int(match.group(5)) <= 59
                                      and int(match.group(6)) <= 60)


_RULE_PARTS: dict[str, Callable[[str], bool]] = {
    "FREQ": lambda value: value in _FREQUENCIES,
    "UNTIL": _valid_until,
    "COUNT": lambda value: re.fullmatch(r"[0-9]{1,9}", value) is not None and int(value) >= 1,
    "INTERVAL": lambda value: re.fullmatch(r"[0-9]{1,9}", value) is not None and int(value) >= 1,
    "BYSECOND": _number_list(2, 0, 60, signed=False),
    "BYMINUTE": _number_list(2, 0, 59, signed=False),
    "BYHOUR": _number_list(2, 0, 23, signed=False),
    "BYDAY": _weekday_list,
    "BYMONTHDAY": _number_list(2, 1, 31, signed=True),
    "BYYEARDAY": _number_list(3, 1, 366, signed=True),
    "BYWEEKNO": _number_list(2, 1, 53, signed=True),
    "BYMONTH": _number_list(2, 1, 12, signed=False),
    "BYSETPOS": _number_list(3, 1, 366, signed=True),
    "WKST": lambda value: re.fullmatch(_WEEKDAY, value) is not None,
}


def _recurrence_problem(parts: dict[str, str]) -> str | None:
    """The first MUST NOT of §3.3.10 the rule breaks, or None."""
    frequency = parts.get("FREQ")
    if frequency is None:
        return "FREQ is required"
    if "COUNT" in parts and "UNTIL" in parts:
        return "COUNT and UNTIL must not occur together"
    if "BYWEEKNO" in parts and frequency != "YEARLY":
        return "BYWEEKNO is only valid with FREQ=YEARLY"
    if "BYMONTHDAY" in parts and frequency == "WEEKLY":
        return "BYMONTHDAY must not be used with FREQ=WEEKLY"
    if "BYYEARDAY" in parts and frequency in ("DAILY", "WEEKLY", "MONTHLY"):
        return "BYYEARDAY must not be used with FREQ=DAILY, WEEKLY or MONTHLY"
    numbered_day = "BYDAY" in parts and re.search(r"[0-9]", parts["BYDAY"]) is not None
    if numbered_day and frequency not in ("MONTHLY", "YEARLY"):
        return "numbered BYDAY is only valid with FREQ=MONTHLY or YEARLY"
    if numbered_day and frequency == "YEARLY" and "BYWEEKNO" in parts:
        return "numbered BYDAY must not be used with FREQ=YEARLY and BYWEEKNO"
    if "BYSETPOS" in parts and not any(name.startswith("BY") and name != "BYSETPOS" for name in parts):
        return "BYSETPOS needs another BYxxx rule part"
    return None


@functools.lru_cache(maxsize=1024)
def format_recurrence(rule: str, all_day: bool, zone: "TimeZone | None" = None) -> tuple[str, str | None]:
    """The RRULE line (with CRLF; '' for no rule) for a stored RECUR value, or ('', why it is invalid).

    Rule part names and values are case-insensitive (§3.3.10); they are written upper-case with FREQ
    first (RFC 2445 required that, and some clients still expect it), the rest in stored order. UNTIL takes
    the value type of DTSTART: a date-time becomes its date for an all-day slot. For a timed slot it is
    UTC (§3.3.10 requires that beside a DTSTART with TZID): a date becomes that day at 23:59:59 and a
    floating date-time stays that wall-clock time, both read in the slot's ``zone`` (UTC without one)."""
    if rule == "":
        return "", None
    parts: dict[str, str] = {}
    for part in rule.upper().split(";"):
        name, equals, value = part.partition("=")
        if not equals or not value:
            return "", f"rule part {part!r} is not NAME=VALUE"
        if name not in _RULE_PARTS:
            return "", f"unknown rule part {name!r}"
        if name in parts:
            return "", f"rule part {name} occurs more than once"
        if not _RULE_PARTS[name](value):
            return "", f"invalid {name} value {value!r}"
        parts[name] = value
    problem = _recurrence_problem(parts)
    if problem:
        return "", problem
    if "UNTIL" in parts:
        until = parts["UNTIL"]
        if all_day:
            parts["UNTIL"] = until[:8]
        elif not until.endswith("Z"):
            wall_clock = utc_seconds((until + "T235959" if len(until) == 8 else until) + "Z")
            instant = wall_clock if zone is None else zone.utc_of_local(wall_clock)
            parts["UNTIL"] = basic_time(min(max(instant, FIRST_INSTANT), LAST_INSTANT)) + "Z"
    value = ";".join([f"FREQ={parts.pop('FREQ')}"] + [f"{name}={value}" for name, value in parts.items()])
    return fold_line("RRULE:" + value) + CRLF, None


@dataclasses.dataclass(frozen=True)
class CalendarStyle:
    """What one calendar shows: its name, and for feeds the refresh interval, busy-only, alarms."""

    name: str = "Timeslot"
    refresh_minutes: int | None = None
    busy: bool = False
    alarms: bool = True

    @classmethod
    def of(cls, group: "Group | None", **options) -> "CalendarStyle":
        """The style of a user's calendar: named after its group (unless the name is blank), or "Timeslot"."""
        if group is None and not options:
            return DEFAULT_STYLE                   # the seed's request: built once, not per request
        return cls(name=group.name if group and is_written(group.name) else "Timeslot", **options)


DEFAULT_STYLE = CalendarStyle()


@functools.lru_cache(maxsize=256)
def calendar_header(style: CalendarStyle) -> str:
    """BEGIN:VCALENDAR and the calendar's properties, each line ending in CRLF (cached per style)."""
    lines = ("BEGIN:VCALENDAR" + CRLF + "VERSION:2.0" + CRLF + "PRODID:" + PRODID + CRLF
             + "CALSCALE:GREGORIAN" + CRLF + "METHOD:PUBLISH" + CRLF
             + text_property("NAME", style.name) + text_property("X-WR-CALNAME", style.name))
    if style.refresh_minutes is not None:
        lines += (f"REFRESH-INTERVAL;VALUE=DURATION:PT{style.refresh_minutes}M" + CRLF
                  + f"X-PUBLISHED-TTL:PT{style.refresh_minutes}M" + CRLF)
    return lines


CALENDAR_FOOTER = b"END:VCALENDAR\r\n"


@dataclasses.dataclass(frozen=True)
class CalendarZones:
    """The time zones one calendar's events are written in, known before its first event: the known
    zones by name, their VTIMEZONEs (ordered by TZID), and what the ETag must follow (each zone's data,
    or that it was unknown)."""

    by_name: Mapping[str, TimeZone] = dataclasses.field(default_factory=dict)
    components: str = ""
    fingerprint: str = ""
    changed: int = 0                                       # when the newest of their files changed

    @classmethod
    def of(cls, starts: Sequence[tuple[str, str]]) -> "CalendarZones":
        """From (zone name, earliest start) pairs ordered by name, as Session.time_zone_starts gives them."""
        if not starts:
            return NO_ZONES
        by_name: dict[str, TimeZone] = {}
        components, fingerprint = [], []
        for name, earliest in starts:
            zone = time_zone(name, fresh=True)
            fingerprint.append(f"{name}={zone.fingerprint if zone else 'unknown'}")
            if zone is not None:
                by_name[name] = zone
                components.append(zone.vtimezone(utc_seconds(earliest)))
        return cls(by_name, "".join(components), ";".join(fingerprint),
                   max((zone.changed for zone in by_name.values()), default=0))


NO_ZONES = CalendarZones()


def _location_utf8(name: bytes, street: bytes | None, postal_code: bytes | None, city: bytes | None,
                   country: bytes | None) -> bytes:
    """'name, street, postal_code city, country' of the parts that are not empty (nor blank, which would
    show as stray commas), as valid UTF-8 (the separators are ASCII: checking the joined text is checking
    each part)."""
    town = b" ".join([part for part in (postal_code, city) if part and part.strip(_BLANK_OCTETS)])
    parts = [part for part in (name, street, town, country) if part and part.strip(_BLANK_OCTETS)]
    return valid_utf8(b", ".join(parts))


def basic_form(stored: str) -> str:
    """A timestamp as the database stores it (2019-09-20T19:44:02Z) in iCalendar's basic form
    (20190920T194402Z); a basic form stays as it is."""
    return stored.replace("-", "").replace(":", "")


def _date_time(name: str, instant: str, zone: TimeZone | None) -> tuple[str, TimeZone | None]:
    """``NAME;TZID=<zone>:<local>`` for a UTC instant in basic form, and the zone it was written in; in UTC
    (``NAME:<instant>``, zone None) without a zone or where no local time names the instant (the second
    pass of a repeated hour, §3.3.5), so a client always reads the stored instant."""
    if zone is not None:
        local = zone.local_time(instant)
        if local is not None:
            return f"{name};TZID={zone.name}:{local}\r\n", zone
    return f"{name}:{instant}\r\n", None


def _exdate(occurrences: str, all_day: bool, zone: TimeZone | None) -> str:
    """SPEC §4 "Cancelled occurrences": one EXDATE in the form of DTSTART, values ascending. A value in a
    repeated hour's second pass cannot be an occurrence (occurrences name the first) and is left out."""
    instants = sorted(set(basic_form(occurrences).split(",")))
    if all_day:
        values = sorted({instant[:8] for instant in instants})
        name = "EXDATE;VALUE=DATE"
    elif zone is not None:
        values = [local for local in map(zone.local_time, instants) if local is not None]
        name = f"EXDATE;TZID={zone.name}"
    else:
        values, name = instants, "EXDATE"
    return fold_line(name + ":" + ",".join(values)) + CRLF if values else ""


def write_event(row: tuple, style: CalendarStyle, zones: Mapping[str, TimeZone] = NO_ZONES.by_name) -> bytes:
    """One VEVENT (with its VALARMs) in UTF-8 for a slot row of SQL_USER_SLOTS, in the property order of
    SPEC §4; a timed slot whose zone is in ``zones`` is written in its wall-clock time, any other in UTC.

    This runs once per slot: the ASCII part is one f-string (one allocation), encoded once; the free text
    stays in the UTF-8 the database gave (escape_utf8)."""
    (uid, created, updated, start, end, all_day, rule, visibility, title, description,
     place, street, postal_code, city, country, latitude, longitude, alerts, zone_name, exdates) = row
    created, updated, start = basic_form(created), basic_form(updated), basic_form(start)
    if end is not None:
        end = basic_form(end)
    zone = None                                 # the zone DTSTART is written in; the recurrence follows it
    slot_zone = zones.get(zone_name)            # None for '' (UTC) and for a zone the database lacks
    if all_day:
        end_date = _next_day((end or start)[:8])   # DTEND is exclusive (§3.6.1): the day after the last
        times = f"DTSTART;VALUE=DATE:{start[:8]}\r\n" + (f"DTEND;VALUE=DATE:{end_date}\r\n" if end_date else "")
    elif slot_zone is None:
        times = f"DTSTART:{start}\r\n" if end is None or end == start else f"DTSTART:{start}\r\nDTEND:{end}\r\n"
    else:
        times, zone = _date_time("DTSTART", start, slot_zone)
        if end is not None and end != start:
            times += _date_time("DTEND", end, slot_zone)[0]
    recurrence = ""
    if rule:
        recurrence, problem = format_recurrence(rule, bool(all_day), zone)
        if problem:
            logger.warning("slot %s: invalid RRULE %r left out: %s", uid, rule, problem)
        elif exdates:
            recurrence += _exdate(exdates, all_day, zone)
    if style.busy:
        return (f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:{updated}\r\nCREATED:{created}\r\nLAST-MODIFIED:{updated}"
                f"\r\n{times}{recurrence}CLASS:PRIVATE\r\nSUMMARY:Busy\r\nEND:VEVENT\r\n").encode("utf-8")
    lines = [(f"BEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:{updated}\r\nCREATED:{created}\r\nLAST-MODIFIED:{updated}"
              f"\r\n{times}{recurrence}CLASS:{CLASS_BY_VISIBILITY[visibility]}").encode("utf-8")]
    summary = escape_utf8(valid_utf8(title)) if title.strip(_BLANK_OCTETS) else None   # title, description:
    if summary is not None:                                                           # NOT NULL
        lines.append(fold_utf8(b"SUMMARY:" + summary))
    if description.strip(_BLANK_OCTETS):
        lines.append(fold_utf8(b"DESCRIPTION:" + escape_utf8(valid_utf8(description))))
    if place is not None:    # locations.name is NOT NULL: None means the slot has no location
        location = _location_utf8(place, street, postal_code, city, country)
        if location:
            lines.append(fold_utf8(b"LOCATION:" + escape_utf8(location)))
    if latitude is not None:
        lines.append(f"GEO:{format_decimal(latitude)};{format_decimal(longitude)}".encode("ascii"))
    if alerts is not None and style.alarms:
        alarm_description = fold_utf8(b"DESCRIPTION:" + (summary if summary is not None else b"Reminder"))
        for minutes in sorted(map(int, alerts.split(","))):
            lines.append(b"BEGIN:VALARM\r\nACTION:DISPLAY\r\n%s\r\nTRIGGER:-PT%dM\r\nEND:VALARM"
                         % (alarm_description, minutes))
    lines.append(b"END:VEVENT\r\n")
    return b"\r\n".join(lines)


_UNTIL = re.compile(r"UNTIL=([0-9]{8})(?:T([0-9]{6})Z)?")


def in_window(start: str, end: str | None, all_day: int, rule: str, zone_name: str, bounds: tuple[str, str]
              ) -> bool:
    """Whether a window selects a slot (SPEC §3 "from", "to"): times in basic form (basic_form), ``bounds``
    the window's (Window.basic_bounds); basic forms sort as the instants do. A slot occupies [start, end):
    an all-day slot its dates from 00:00Z, an instant its start alone. A slot whose rule is written is
    selected unless its first occurrence starts at or after the window's end, or its last possible
    occurrence (from UNTIL, read as the writer reads it, in the slot's zone) ends before the window starts;
    a series that ends by COUNT is selected from its start on (the SPEC's MAY)."""
    since, until = bounds
    if all_day:
        first = start[:8] + "T000000Z"
        after = _next_day((end or start)[:8])
        first_end = after + "T000000Z" if after else AFTER_ALL_BASIC
    else:
        first, first_end = start, end or start
    if first >= until:
        return False
    written = ""
    if rule:
        zone = None                              # the zone the writer reads the rule in: DTSTART's (write_event)
        if not all_day and zone_name:
            zone = _date_time("DTSTART", start, time_zone(zone_name))[1]
        written = format_recurrence(rule, bool(all_day), zone)[0]
    if not written:
        return first_end > since or (first_end == first and first >= since)
    last = _UNTIL.search(written.replace("\r\n ", ""))
    if last is None or not since:
        return True
    last_start = _day_number(last.group(1)) * 86400 if all_day else utc_seconds(last.group(0)[6:])
    duration = (utc_seconds(first_end) if first_end != AFTER_ALL_BASIC else math.inf) - utc_seconds(first)
    return last_start + duration > utc_seconds(since) or (duration == 0 and last_start >= utc_seconds(since))


def _selected(batches: Iterator[list[tuple]], window: Window) -> Iterator[list[tuple]]:
    """The rows of each batch that the window selects (the index search found a superset)."""
    bounds = window.basic_bounds()
    try:
        for batch in batches:
            yield [row for row in batch
                   if in_window(basic_form(row[3]), row[4] and basic_form(row[4]), row[5], row[6], row[18], bounds)]
    finally:
        batches.close()


def calendar_zones(session: Session, user_id: int, group: Group | None, window: Window | None = None
                   ) -> CalendarZones:
    """The time zones of the calendar export_calendar writes (one indexed query, no pass over the slots;
    with a window, the zoned slots it selects, which its index search finds)."""
    group_id = group.id if group else None
    if window is None:
        return CalendarZones.of(session.time_zone_starts(user_id, group_id))
    earliest: dict[str, str] = {}
    bounds = window.basic_bounds()
    for zone_name, start, end, rule in session.window_zoned_slots(user_id, group_id, window):
        if start < earliest.get(zone_name, "A") and in_window(start, end, 0, rule, zone_name, bounds):
            earliest[zone_name] = start
    return CalendarZones.of(sorted(earliest.items()))


class EventCache:
    """Events an application has written, each kept with everything it was written from: the slot's row,
    the style's busy and alarms, and the zone (a new TimeZone object once its file changed); an event is
    answered only for all of them the same (a writer need not move updated_at). Most exports write what
    the previous one wrote (a calendar app polls, a few slots change), and looking an event up costs a
    small part of writing it again; the body is the same bytes either way.

    The key is the slot's uuid with busy and alarms, and the row and zone are compared once it is found:
    hashing a fresh row (each of its strings hashed anew) cost most of a lookup by the whole row, and a
    comparison costs a fraction of a hash. One event is kept per key: a changed row replaces the old one.

    Only the first EVENT_CACHE_ROWS rows of each calendar are looked up and kept: a longer calendar would
    push everything else out and pay the lookups for nothing. The size is bounded (events and their rows,
    about EVENT_CACHE_BYTES); when it is reached the oldest go first. A slot whose rule is invalid is
    therefore warned about when its event is written, not at every export."""

    def __init__(self, budget: int = EVENT_CACHE_BYTES):
        self._events: dict[tuple, tuple[tuple, TimeZone | None, bytes]] = {}   # key: (row, zone, event)
        self._size = 0
        self._budget = budget
        self._lock = threading.Lock()
        self.get = self._events.get                    # lookups take no lock: a dict read is atomic

    @staticmethod
    def _cost(event: bytes) -> int:
        return 2 * len(event) + 256                    # the row holds about the event's text, plus the keys

    def put(self, key: tuple, row: tuple, zone: TimeZone | None, event: bytes) -> None:
        with self._lock:
            replaced = self._events.pop(key, None)
            if replaced is not None:
                self._size -= self._cost(replaced[2])
            self._events[key] = (row, zone, event)
            self._size += self._cost(event)
            while self._size > self._budget and self._events:
                self._size -= self._cost(self._events.pop(next(iter(self._events)))[2])


def export_calendar(session: Session, user_id: int, group: Group | None, style: CalendarStyle,
                    zones: CalendarZones | None = None, window: Window | None = None,
                    cache: EventCache | None = None) -> Iterator[bytes]:
    """The one calendar the API, the feeds and the CLI export: the user's slots, all or one group's, all
    or those a date window selects."""
    if zones is None:
        zones = calendar_zones(session, user_id, group, window)
    batches = session.slot_batches(user_id, group.id if group else None, window)
    return write_calendar(batches if window is None else _selected(batches, window), style, zones, cache)


def write_calendar(batches: Iterable[list[tuple]], style: CalendarStyle,
                   zones: CalendarZones = NO_ZONES, cache: EventCache | None = None) -> Iterator[bytes]:
    """The whole calendar as UTF-8 pieces of about CHUNK_BYTES octets, produced as rows arrive: the
    header, the VTIMEZONEs, then one event per row (the first ones from ``cache`` when it has them)."""
    parts = [(calendar_header(style) + zones.components).encode("utf-8")]
    size = 0
    by_name = zones.by_name
    flags = (style.busy, style.alarms)
    cached = EVENT_CACHE_ROWS if cache is not None else 0
    for batch in batches:
        for row in batch:
            if cached:
                cached -= 1
                key, zone = (row[0], flags), by_name.get(row[18])
                known = cache.get(key)
                if known is not None and known[1] is zone and known[0] == row:
                    event = known[2]
                else:
                    event = write_event(row, style, by_name)
                    cache.put(key, row, zone, event)
            else:
                event = write_event(row, style, by_name)
            parts.append(event)
            size += len(event)
            if size >= CHUNK_BYTES:
                yield b"".join(parts)
                parts, size = [], 0
    parts.append(CALENDAR_FOOTER)
    yield b"".join(parts)


def gzip_stream(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Compress a stream of pieces into one gzip member as it goes (mtime 0: identical input, bytes)."""
    compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
    for chunk in chunks:
        compressed = compressor.compress(chunk)
        if compressed:
            yield compressed
    yield compressor.flush()


# ---------------------------------------------------------------------------------------------------
# HTTP plumbing: the request, the response, content negotiation
# ---------------------------------------------------------------------------------------------------

def _wsgi_text(value: str) -> str:
    """A WSGI header or query value ("bytes as latin-1", PEP 3333) as the UTF-8 text the client sent."""
    try:
        return value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "request is not valid UTF-8") from None


def _printable(text: str) -> str:
    """Client text for a log line: control characters escaped, so they cannot forge lines."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _loggable(text: str) -> str:
    """Client text as it may be logged: printable, and anything that looks like a secret masked."""
    return SECRET_IN_PATH.sub("[secret]", _printable(text))


@functools.lru_cache(maxsize=64)
def _environ_key(name: str) -> str:
    """Where PEP 3333 puts a request header: Content-Type -> CONTENT_TYPE, Accept -> HTTP_ACCEPT."""
    key = name.upper().replace("-", "_")
    return key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key


def fresh_request_id() -> str:
    """A random (version 4) UUID as text, for a request that brought no usable X-Request-Id. It only has to
    be unique, not secret: formatting random bits takes a third of uuid.uuid4()'s time."""
    digits = f"{random.getrandbits(128) & ~(0xF000 << 64 | 0xC << 60) | 0x4000 << 64 | 0x8 << 60:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


class Request:
    """The parts of a WSGI environ the service uses, parsed once; ``environ`` itself is untrusted."""

    def __init__(self, environ: dict):
        self._environ = environ
        self.method = environ.get("REQUEST_METHOD", "GET")   # methods are case-sensitive (RFC 9110 §9.1)
        self.path = environ.get("PATH_INFO", "") or "/"
        supplied_id = environ.get("HTTP_X_REQUEST_ID", "")
        self.id = supplied_id if REQUEST_ID_PATTERN.fullmatch(supplied_id) else fresh_request_id()

    def header(self, name: str) -> str:
        """A request header by its HTTP name ('' when absent)."""
        return self._environ.get(_environ_key(name), "")

    @property
    def query_string(self) -> str:
        return self._environ.get("QUERY_STRING", "")

    @property
    def script_path(self) -> str:
        """Where the application is mounted (SCRIPT_NAME), percent-encoded; '' at the root."""
        return urllib.parse.quote(self._environ.get("SCRIPT_NAME", "").encode("latin-1"), safe="/")

    @property
    def base_url(self) -> str:
        """The scheme, host and mount point the client used: the base of the URLs the service hands out when
        TIMESLOT_BASE_URL is not set. A proxy's X-Forwarded-Proto (http or https) names the scheme; a Host
        that is not a host name falls back to the server's own. Only the client that sent them sees them."""
        environ = self._environ
        scheme = environ.get("HTTP_X_FORWARDED_PROTO", "").strip().lower()
        if scheme not in ("http", "https"):
            scheme = "https" if environ.get("wsgi.url_scheme") == "https" else "http"
        default_port = {"http": ":80", "https": ":443"}[scheme]
        host = environ.get("HTTP_HOST", "")
        if not HOST_PATTERN.fullmatch(host):
            host, port = environ.get("SERVER_NAME", "localhost"), environ.get("SERVER_PORT", "")
            host = (host if HOST_PATTERN.fullmatch(host) else "localhost") + (":" + port if port.isdigit() else "")
        if host.endswith(default_port):
            host = host[:-len(default_port)]
        return f"{scheme}://{host}{self.script_path}"

    @property
    def may_have_body(self) -> bool:
        """A Content-Length above 0, or none with a stream the server terminates (chunked uploads)."""
        length = self._environ.get("CONTENT_LENGTH", "").strip()
        return length not in ("", "0") or (not length and bool(self._environ.get("wsgi.input_terminated")))

    def read_body(self, limit: int) -> bytes:
        """The request body, at most ``limit`` bytes (400 for a bad Content-Length, 413 beyond the limit)."""
        length_text = self._environ.get("CONTENT_LENGTH", "").strip()
        stream = self._environ["wsgi.input"]
        if not length_text:
            if not self._environ.get("wsgi.input_terminated"):
                return b""          # no length and no terminated stream: no body we may read (PEP 3333)
            body = _read_from_client(stream, limit + 1)
            if len(body) > limit:
                raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body larger than {limit} bytes")
            return body
        if not re.fullmatch(r"[0-9]{1,18}", length_text):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        length = int(length_text)
        if length > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body larger than {limit} bytes")
        body = _read_from_client(stream, length) if length else b""
        if len(body) != length:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "request body shorter than its Content-Length")
        return body


def _read_from_client(stream, size: int) -> bytes:
    """Up to ``size`` bytes of the request body. A client fault is never a server error (SPEC §3): a body
    that stops arriving past the server's read timeout is 408, a connection reset or a malformed chunked
    body (gunicorn raises OSError subclasses for those) is 400; neither is logged as a failure."""
    try:
        return stream.read(size)
    except socket.timeout:
        raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, "request body not received in time") from None
    except OSError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "request body could not be read") from None


@dataclasses.dataclass
class Response:
    """A status, headers and a body iterable; ``close`` releases what the body holds (a database session)."""

    status: HTTPStatus
    headers: list[tuple[str, str]]
    body: Iterable[bytes] = ()
    close: Callable[[], None] | None = None


def json_response(status: HTTPStatus, payload: dict, headers: Sequence[tuple[str, str]] = ()) -> Response:
    """A JSON body with its Content-Type and Content-Length."""
    body = json.dumps(payload).encode("utf-8")
    return Response(status, [("Content-Type", JSON_TYPE), ("Content-Length", str(len(body))),
                             ("Cache-Control", "no-store"), *headers], [body])


def _media_parameters(header: str) -> Iterator[tuple[str, float]]:
    """(token, q) for each item of an Accept-like header; malformed q-values count as 0."""
    for item in header.split(","):
        token, _, parameters = item.partition(";")
        quality = 1.0
        for parameter in parameters.split(";"):
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 0.0
        yield token.strip().lower(), quality


def accepts(header: str, token: str) -> bool:
    """Whether an Accept or Accept-Encoding header names ``token`` with a quality above zero."""
    return token in header.lower() and any(name == token and quality > 0 for name, quality in _media_parameters(header))


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110 §13.1.2: weak comparison against a list of entity tags, or '*'."""
    opaque = etag[2:] if etag.startswith("W/") else etag
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate == "*" or (candidate[2:] if candidate.startswith("W/") else candidate) == opaque:
            return True
    return False


_MONTH_NUMBERS = {name: number for number, name in enumerate(calendar.month_abbr) if name}
_DAY = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_MONTH = "(" + "|".join(_MONTH_NUMBERS) + ")"
_TIME = "([0-9]{2}):([0-9]{2}):([0-9]{2})"
# RFC 9110 §5.6.7: IMF-fixdate, and the obsolete RFC 850 and asctime forms a recipient must accept too.
_IMF_FIXDATE = re.compile(_DAY + r", ([0-9]{2}) " + _MONTH + r" ([0-9]{4}) " + _TIME + " GMT")
_RFC850_DATE = re.compile(r"(?:Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, ([0-9]{2})-" + _MONTH + r"-([0-9]{2}) "
                          + _TIME + " GMT")
_ASCTIME_DATE = re.compile(_DAY + " " + _MONTH + r" ([ 0-9][0-9]) " + _TIME + r" ([0-9]{4})")


def parse_http_date(text: str, now: float) -> int | None:
    """An HTTP-date in seconds since 1970, or None for anything else (RFC 9110 §5.6.7). A two-digit year
    more than 50 years ahead is the most recent past year with those digits."""
    text = text.strip()
    match = _IMF_FIXDATE.fullmatch(text)
    if match:
        day, month, year, *clock = match.groups()
    elif _RFC850_DATE.fullmatch(text):
        day, month, short_year, *clock = _RFC850_DATE.fullmatch(text).groups()
        year = 2000 + int(short_year)
        if year > time.gmtime(now).tm_year + 50:
            year -= 100
    elif _ASCTIME_DATE.fullmatch(text):
        month, day, *clock, year = _ASCTIME_DATE.fullmatch(text).groups()
    else:
        return None
    try:
        moment = datetime.datetime(int(year), _MONTH_NUMBERS[month], int(day), *map(int, clock))
    except ValueError:
        return None
    return calendar.timegm(moment.timetuple())


@functools.lru_cache(maxsize=1024)
def http_date(seconds: int) -> str:
    """An IMF-fixdate (RFC 9110 §5.6.7); cached, as a calendar's date repeats on every request until it changes."""
    return format_date_time(seconds)


def not_modified(request: Request, etag: str, last_modified: int | None, now: float) -> bool:
    """RFC 9110 §13.2.2 for GET and HEAD: If-None-Match decides when it is sent; otherwise an
    If-Modified-Since that is a valid date, not in the future, and not earlier than the Last-Modified the
    response carries (none: no 304 by date)."""
    if_none_match = request.header("If-None-Match")
    if if_none_match:
        return etag_matches(if_none_match, etag)
    since_text = request.header("If-Modified-Since")
    if last_modified is None or not since_text:
        return False
    since = parse_http_date(since_text, now)
    return since is not None and last_modified <= since <= now


def _prebuffer(chunks: Iterator[bytes], limit: int) -> tuple[list[bytes], bool]:
    """Read pieces until ``limit`` bytes or the end; True when the end was reached (length known)."""
    buffered, size = [], 0
    for chunk in chunks:
        buffered.append(chunk)
        size += len(chunk)
        if size >= limit:
            return buffered, False
    return buffered, True


# ---------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------

class _JSONObject(list):
    """The (key, value) pairs of a JSON object, duplicates kept, so a repeated ``group`` can be seen."""


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _body_text(request: Request, limit: int) -> tuple[str, str]:
    """(media type, text) of the request body: read, type checked and decoded (400, 413, 415)."""
    body = request.read_body(limit)
    if not body:
        return "", ""
    media_type, _, parameters = request.header("Content-Type").partition(";")
    media_type = media_type.strip().lower()
    charset = re.search(r"charset\s*=\s*\"?([A-Za-z0-9_-]+)", parameters, re.IGNORECASE)
    if charset and charset.group(1).lower() not in ("utf-8", "utf8"):
        raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "request bodies must be UTF-8")
    if media_type not in ("application/json", "application/x-www-form-urlencoded"):
        raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                        "request body must be application/json or application/x-www-form-urlencoded")
    try:
        return media_type, body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "request body is not valid UTF-8") from None


def _body_parameters(media_type: str, text: str) -> list[tuple[str, object]]:
    """The (name, value) pairs of a JSON object or form body (422 when it is neither)."""
    if not text:
        return []
    if media_type == "application/x-www-form-urlencoded":
        return _form_pairs(text)
    try:
        document = json.loads(text, object_pairs_hook=_JSONObject, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, "request body is not valid JSON") from None
    if not isinstance(document, _JSONObject):
        raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, "request body must be a JSON object")
    return list(document)


def _form_pairs(text: str) -> list[tuple[str, object]]:
    """Pairs of a form body or query string; percent-escapes must decode as UTF-8."""
    if not text:
        return []
    try:
        return urllib.parse.parse_qsl(text, keep_blank_values=True, encoding="utf-8", errors="strict",
                                      max_num_fields=MAX_FORM_FIELDS)
    except UnicodeDecodeError:
        raise HTTPError(HTTPStatus.BAD_REQUEST, "parameters are not valid UTF-8") from None
    except ValueError:
        raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY,
                        f"too many parameters (at most {MAX_FORM_FIELDS})") from None


class _FormText(str):
    """A parameter's value from a form body or the query string, where every value is text: ``alarms`` reads
    ``true``/``1`` there, while JSON must say ``true``."""


def request_parameters(request: Request, limit: int, names: Sequence[str]) -> dict[str, object]:
    """SPEC §3 Parameters: the named parameters from the body (JSON or form) or the query string, the body
    winning; a parameter repeated where it is read is 422. Form and query values are _FormText."""
    if not request.query_string and not request.may_have_body:
        return {}                                     # the seed's request: no parameters to read
    media_type, body = _body_text(request, limit)
    found: dict[str, object] = {}
    body_pairs = _body_parameters(media_type, body)
    if media_type != "application/json":
        body_pairs = [(name, _FormText(value)) for name, value in body_pairs]
    query_pairs = [(name, _FormText(value)) for name, value in _form_pairs(_wsgi_text(request.query_string))]
    for pairs in (body_pairs, query_pairs):
        here: dict[str, object] = {}
        for name, value in pairs:
            if name in names and name not in found:
                if name in here:
                    raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, f"parameter {name} is repeated")
                here[name] = value
        found.update(here)
    return found


def _invalid(message: str) -> HTTPError:
    return HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY, message)


def group_value(value: object) -> str | None:
    """``group``: the lowercase group uuid, or None (absent, null or "") for all slots."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _invalid("parameter group must be a string (a UUID)")
    if not UUID_PATTERN.fullmatch(value):
        raise _invalid("parameter group is not a UUID")
    return value.lower()


_WINDOW_BOUND = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:T([0-9]{2}):([0-9]{2}):([0-9]{2})Z)?")


def window_bound(name: str, value: object) -> str | None:
    """``from`` or ``to``: a date (that day at 00:00:00Z) or a UTC timestamp, as 'YYYY-MM-DDTHH:MM:SSZ';
    None for no bound (absent, null or "")."""
    if value is None or value == "":
        return None
    match = _WINDOW_BOUND.fullmatch(value) if isinstance(value, str) else None
    try:
        numbers = [int(part or 0) for part in match.groups()] if match else None
        if numbers is None or numbers[0] < 1:
            raise ValueError(value)
        moment = datetime.datetime(*numbers)
    except ValueError:
        raise _invalid(f"parameter {name} must be a date (YYYY-MM-DD) or a UTC time (YYYY-MM-DDTHH:MM:SSZ) "
                       f"from year 0001 to 9999") from None
    return f"{moment.year:04d}-{moment:%m-%dT%H:%M:%SZ}"


def window_value(parameters: Mapping[str, object]) -> Window | None:
    """The date window of ``from`` and ``to`` (None for neither); ``to`` must be later than ``from``."""
    if "from" not in parameters and "to" not in parameters:
        return None
    start, end = window_bound("from", parameters.get("from")), window_bound("to", parameters.get("to"))
    if start is not None and end is not None and end <= start:
        raise _invalid("parameter to must be later than parameter from")
    return None if start is None and end is None else Window(start, end)


_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")    # and lone surrogates (not text)


def _label(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_LABEL_CHARS or _CONTROL_CHARACTERS.search(value):
        raise _invalid(f"parameter label must be a string of at most {MAX_LABEL_CHARS} characters "
                       f"without control characters")
    return str(value)


def _details(value: object) -> str:
    if value not in ("full", "busy"):
        raise _invalid("parameter details must be full or busy")
    return str(value)


def _alarms(value: object) -> int:
    if isinstance(value, _FormText) and value in ("true", "false", "1", "0"):
        return int(value in ("true", "1"))
    if isinstance(value, bool):
        return int(value)
    raise _invalid("parameter alarms must be true or false (in a form or query also 1 or 0)")


def _day_count(name: str) -> Callable[[object], int | None]:
    def parse(value: object) -> int | None:
        if value is None or value == "":
            return None
        if isinstance(value, _FormText) and re.fullmatch(r"[0-9]{1,5}", value):
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_WINDOW_DAYS:
            return int(value)
        raise _invalid(f"parameter {name} must be a whole number from 0 to {MAX_WINDOW_DAYS}, or null")
    return parse


FEED_SETTING_PARSERS = {"label": _label, "details": _details, "alarms": _alarms,
                        "past_days": _day_count("past_days"), "future_days": _day_count("future_days")}
FEED_DEFAULTS = {"label": "", "details": "full", "alarms": 1, "past_days": None, "future_days": None}


def feed_settings(parameters: Mapping[str, object]) -> dict[str, object]:
    """The feed settings among ``parameters``, each checked (422 naming the first that is wrong)."""
    return {name: FEED_SETTING_PARSERS[name](parameters[name]) for name in FEED_SETTINGS if name in parameters}


# ---------------------------------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------------------------------

# Token token=<t>, Token token="<t>" (Rails' form, as in the seed) and Bearer <t>; schemes are case-insensitive.
_AUTHORIZATION = re.compile(r'\s*(?:token\s+token\s*=\s*(?:"([^"\s]+)"|([^"\s,]+))|bearer\s+([^"\s,]+))\s*',
                            re.IGNORECASE)


def _unauthorized() -> HTTPError:
    """The one 401 of SPEC §3, with its challenge (a new instance each time: exceptions carry state)."""
    return HTTPError(HTTPStatus.UNAUTHORIZED, "auth_token invalid or missing",
                     [("WWW-Authenticate", 'Token realm="Application"')])


def _token_in(authorization: str) -> str | None:
    """The token of an Authorization header (_AUTHORIZATION), as the client's bytes in latin-1 (WSGI)."""
    token = authorization[len("Token token="):]
    if (authorization.startswith("Token token=") and token.isprintable() and token
            and " " not in token and '"' not in token and "," not in token):
        return token       # the seed's form, told without the regex: isprintable() is False for other \s
    match = _AUTHORIZATION.fullmatch(authorization)
    return None if match is None else match.group(1) or match.group(2) or match.group(3)


def authenticate(session: Session, authorization: str) -> tuple[int, int, int]:
    """(user id, export version, change clock) for the Authorization header, or 401. The token is only ever
    hashed."""
    token = _token_in(authorization)
    if token is None:
        raise _unauthorized()
    try:                     # WSGI headers carry the client's bytes as latin-1; tokens are UTF-8 text
        token = token.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise _unauthorized() from None
    user = session.user_by_token_digest(token_digest(token))
    if user is None:
        raise _unauthorized()
    return user


# ---------------------------------------------------------------------------------------------------
# The subscribe page: HTML for a person, one link per calendar client (SPEC §3 "The subscribe page")
# ---------------------------------------------------------------------------------------------------

# The page's own style and script, allowed by their hashes in its Content-Security-Policy and by nothing
# else: no other origin, no inline event handler, no framing. The page works with scripts off; the script
# only reveals a Copy button.
PAGE_STYLE = """
:root { color-scheme: light dark; --accent: #1a5fb4; --line: #8888; }
* { box-sizing: border-box; }
body { margin: 0; font: 17px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 34rem; margin: 0 auto; padding: 1.25rem 1rem 2rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; overflow-wrap: anywhere; }
h2 { font-size: 1.05rem; margin: 1.75rem 0 .6rem; }
.label { margin: 0; font-weight: 600; overflow-wrap: anywhere; }
.shows { margin: .5rem 0 0; opacity: .8; }
ul { list-style: none; margin: 0; padding: 0; }
li a { display: block; margin: 0 0 .6rem; padding: .8rem 1rem; border: 1px solid var(--line);
       border-radius: .6rem; color: inherit; text-decoration: none; font-weight: 600; }
li a:hover, li a:focus { border-color: var(--accent); outline: none; }
li a small { display: block; font-weight: 400; opacity: .75; }
.copy { display: flex; gap: .5rem; }
.copy input { flex: 1; min-width: 0; padding: .7rem; font: 15px ui-monospace, Menlo, Consolas, monospace;
              border: 1px solid var(--line); border-radius: .5rem; background: transparent; color: inherit; }
.copy button { padding: .7rem 1.1rem; font: inherit; font-weight: 600; border: 0; border-radius: .5rem;
               background: var(--accent); color: #fff; }
.note { margin-top: 1.75rem; font-size: .9rem; opacity: .8; }
a { color: var(--accent); }
"""
PAGE_SCRIPT = """
(function () {
  var field = document.getElementById("url"), button = document.getElementById("copy");
  if (!field || !button) { return; }
  function copied() { button.textContent = "Copied"; }
  function fallback() { field.select(); if (document.execCommand("copy")) { copied(); } }
  button.hidden = false;
  field.addEventListener("focus", function () { field.select(); });
  button.addEventListener("click", function () {
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(copied, fallback);
    } else {
      fallback();
    }
  });
})();
"""


def _csp_hash(source: str) -> str:
    """A Content-Security-Policy source that allows exactly this inline style or script."""
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


# The 404 and 410 pages run no script; the subscribe page runs its own.
ERROR_PAGE_POLICY = (f"default-src 'none'; style-src {_csp_hash(PAGE_STYLE)}; base-uri 'none'; form-action 'none'; "
                     "frame-ancestors 'none'")
PAGE_POLICY = f"{ERROR_PAGE_POLICY}; script-src {_csp_hash(PAGE_SCRIPT)}"
# What every subscribe page and its 404/410 carry besides: a click on a client's link must not hand the
# secret URL to that site (Referer), no search engine may keep it, and no cache may store it.
PAGE_HEADERS = (("Referrer-Policy", "no-referrer"), ("X-Robots-Tag", "noindex"),
                ("Cache-Control", "private, no-store"))
PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<main>
{content}
</main>
{script}</body>
</html>
"""
SUBSCRIBE_CONTENT = """<h1>{calendar}</h1>
{label}<p class="shows">{shows}</p>
<h2>Subscribe in your calendar app</h2>
<ul>
<li><a id="google" href="{google}" rel="noreferrer">Google Calendar
    <small>Android, and calendar.google.com</small></a></li>
<li><a id="apple" href="{webcal}" rel="noreferrer">Apple Calendar<small>iPhone, iPad and Mac</small></a></li>
<li><a id="outlook" href="{outlook}" rel="noreferrer">Outlook.com<small>Personal Microsoft account</small></a></li>
<li><a id="office" href="{office}" rel="noreferrer">Microsoft 365<small>Work or school account</small></a></li>
<li><a id="thunderbird" href="{webcal}" rel="noreferrer">Thunderbird
    <small>and other apps that open webcal links</small></a></li>
</ul>
<h2>Or copy the address</h2>
<p>Any calendar app that can subscribe to a calendar from the internet takes this address:</p>
<div class="copy"><input id="url" type="text" readonly value="{url}" aria-label="Calendar address">
<button id="copy" type="button" hidden>Copy</button></div>
<p><a id="download" href="{url}" download="{filename}" rel="noreferrer">Download a copy</a>:
a one-time import that does not update.</p>
<p class="note">Your calendar app checks this address for changes on its own schedule (every few hours for
Google and Outlook). Anyone who has the address can see this calendar: share it only with people who may,
and ask for a new link if it got out.</p>"""
PAGE_ERRORS = {
    HTTPStatus.NOT_FOUND: ("Calendar link not found", "This calendar link does not exist. Check that you copied "
                           "the whole address, or ask for a new link."),
    HTTPStatus.GONE: ("Calendar link turned off", "This calendar link was turned off by its owner, who may have "
                      "replaced it with a new one. Ask them for the new link; calendar apps stop updating "
                      "from this one."),
}


def _html(text: str) -> str:
    return html.escape(text, quote=True)


def _window_text(past_days: int | None, future_days: int | None) -> str:
    """What part of the calendar a feed's window shows, in words."""
    def days(count: int) -> str:
        return "1 day" if count == 1 else f"{count} days"
    if past_days is None and future_days is None:
        return "every date"
    if future_days is None:
        return f"from {days(past_days)} ago on" if past_days else "from today on"
    ahead = f"{days(future_days)} ahead" if future_days else "today"
    if past_days is None:
        return f"everything up to {ahead}"
    return f"from {days(past_days) + ' ago' if past_days else 'today'} to {ahead}"


def _shows_text(feed: Feed) -> str:
    if feed.busy:
        kind = "Busy times only: no titles, places, notes or reminders"
    else:
        kind = "All details, " + ("with reminders" if feed.alarms else "without reminders")
    return f"{kind}; {_window_text(feed.past_days, feed.future_days)}."


def client_links(url: str, webcal_url: str, calendar_name: str) -> dict[str, str]:
    """The subscribe link of each calendar client for a feed (SPEC §3 "The subscribe page")."""
    def quoted(value: str) -> str:
        return urllib.parse.quote(value, safe="")
    add_from_web = f"/calendar/0/addfromweb?url={quoted(url)}&name={quoted(calendar_name)}"
    return {"google": "https://calendar.google.com/calendar/render?cid=" + quoted(webcal_url),
            "outlook": "https://outlook.live.com" + add_from_web,
            "office": "https://outlook.office.com" + add_from_web,
            "webcal": webcal_url}


def html_page(status: HTTPStatus, title: str, content: str, script: bool = False) -> Response:
    """A page for a person: the template around ``content`` (already escaped), with the page headers."""
    body = PAGE_TEMPLATE.format(title=_html(title), style=PAGE_STYLE, content=content,
                                script=f"<script>{PAGE_SCRIPT}</script>\n" if script else "").encode("utf-8")
    policy = PAGE_POLICY if script else ERROR_PAGE_POLICY
    return Response(status, [("Content-Type", HTML_TYPE), ("Content-Length", str(len(body))),
                             ("Content-Security-Policy", policy), *PAGE_HEADERS], [body])


def subscribe_page(feed: Feed, calendar_name: str, urls: Mapping[str, str]) -> Response:
    """The page of one live feed: what it shows, a link per client, its address to copy, a download."""
    links = client_links(urls["url"], urls["webcal_url"], calendar_name)
    label = f'<p class="label">{_html(feed.label)}</p>\n' if is_written(feed.label) else ""
    content = SUBSCRIBE_CONTENT.format(calendar=_html(calendar_name), label=label, shows=_html(_shows_text(feed)),
                                       url=_html(urls["url"]), filename=_html(_download_name(calendar_name)),
                                       **{name: _html(link) for name, link in links.items()})
    return html_page(HTTPStatus.OK, f"Subscribe to {calendar_name}", content, script=True)


def _download_name(calendar_name: str) -> str:
    """A file name for the download link: the calendar's name without what file systems refuse."""
    return (re.sub(r'[\x00-\x1f\x7f/\\:*?"<>|]+', " ", calendar_name).strip(" .") or "Timeslot")[:100] + ".ics"


def page_error(status: HTTPStatus) -> Response:
    """The subscribe page's own 404 or 410: a short page a person can read, not JSON."""
    title, text = PAGE_ERRORS[status]
    return html_page(status, title, f"<h1>{_html(title)}</h1>\n<p>{_html(text)}</p>")


# ---------------------------------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4096)
def _entity_tag(*parts: object) -> str:
    """A weak ETag from the module version, the user's export version, what the request asked for, the
    representation's content type and the time zone data the body is written with (cached: a polled
    calendar asks for the same one until its data changes, and the digest costs more than the lookup)."""
    digest = hashlib.sha256("\0".join(map(str, (__version__, *parts))).encode("utf-8")).hexdigest()
    return f'W/"{digest[:32]}"'


class Selection(NamedTuple):       # not a frozen dataclass: its __init__ costs 4 times as much, per request
    """Which calendar a response shows, and what its validators follow: a user's slots (one group's, those
    a window selects), the user's export version (ETag) and change clock (Last-Modified), and when the
    window last moved (a feed's moves at 00:00Z every day)."""

    user_id: int
    version: int
    changed: int
    group: Group | None = None
    window: Window | None = None
    moved: int = 0


# When this module's file last changed: a new release may write other bytes for the same data.
MODULE_CHANGED = _changed_at(getattr(globals().get("__loader__"), "archive", None) or globals().get("__file__"))


def last_modified(app: "ExportApp", session: Session, selection: Selection, zones: CalendarZones,
                  now: float) -> int | None:
    """SPEC §3 Last-Modified in seconds since 1970, or None where a date could hide a change.

    It is the latest of: when the user's data last changed (schema.sql keeps it, rounded up to the second
    after the change), the time zone files the calendar is written with, this module's file, and the
    window's last move; on a replica, also when this process first read this state of the data. It is
    handed out only when it is not later than now (so never later than Date, and never while the second
    of the newest change is still running), and on a primary only from a snapshot taken while no write was
    in progress: then any later state's change was written after that moment, so its date is later than
    any this state was given, and If-Modified-Since names one state, never two."""
    changed = selection.changed
    if app.database.replica:
        changed = max(changed, math.ceil(app.database.first_seen(selection.user_id, selection.version, now)))
    elif not session.quiet:
        return None
    modified = max(changed, zones.changed, MODULE_CHANGED, selection.moved)
    return modified if modified <= now else None


def calendar_response(app: "ExportApp", request: Request, session: Session, selection: Selection, *,
                      style: CalendarStyle, variant: str, content_type: str,
                      headers: list[tuple[str, str]]) -> Response:
    """The calendar as a streamed response, or 304 on GET/HEAD for a matching If-None-Match, or (without
    one) for an If-Modified-Since not earlier than the Last-Modified.

    The validators come from the export version, the change clock and the zones' data (one indexed query),
    so a 304 never reads a slot. The body streams from the cursor; when it fits in PREBUFFER_BYTES it is
    sent whole with a Content-Length (and any database error before the first byte still gets its proper
    status)."""
    group, window = selection.group, selection.window
    zones = calendar_zones(session, selection.user_id, group, window)
    etag = _entity_tag(selection.user_id, selection.version, group.uuid if group else "", window.key if window else "",
                       variant, content_type, zones.fingerprint)
    headers = [("Content-Type", content_type), *headers, ("Cache-Control", "private"), ("ETag", etag)]
    now = session.started                    # when the snapshot began: the moment the date must not pass
    modified = last_modified(app, session, selection, zones, now)
    if modified is not None:
        headers.append(("Last-Modified", http_date(modified)))
    if request.method in ("GET", "HEAD") and not_modified(request, etag, modified, now):
        return Response(HTTPStatus.NOT_MODIFIED, headers, close=session.close)
    chunks = export_calendar(session, selection.user_id, group, style, zones, window, app.events)
    if accepts(request.header("Accept-Encoding"), "gzip"):
        chunks = gzip_stream(chunks)
        headers.append(("Content-Encoding", "gzip"))
    buffered, complete = _prebuffer(chunks, PREBUFFER_BYTES)
    if complete:
        headers.append(("Content-Length", str(sum(map(len, buffered)))))
        body: Iterable[bytes] = buffered
    else:
        body = _chain(buffered, chunks)
    return Response(HTTPStatus.OK, headers, body, close=session.close)


def _chain(first: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """The buffered pieces, then the rest of the stream; closing this closes the stream."""
    try:
        yield from first
        yield from rest
    finally:
        rest.close()


def handle_export(app: "ExportApp", request: Request) -> Response:
    """POST|GET|HEAD /v1/export/ical: the user's slots, all or one group's, all or in a window (SPEC §3)."""
    session = app.database.session()
    try:
        user_id, version, changed = authenticate(session, request.header("Authorization"))
        parameters = request_parameters(request, app.config.max_body_bytes, ("group", "from", "to"))
        group_uuid, window = group_value(parameters.get("group")), window_value(parameters)
        group = None
        if group_uuid is not None:
            group = session.accessible_group(user_id, uuid=group_uuid)
            if group is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, "group not found")
        download = not accepts(request.header("Accept"), "text/calendar")
        filename = f"{group.uuid}.ical" if group else "Timeslot-Export.ical"
        headers = [("Content-Disposition", f'attachment; filename="{filename}"'),
                   ("Content-Transfer-Encoding", "binary"), ("Vary", "Accept, Accept-Encoding, Origin")]
        return calendar_response(app, request, session, Selection(user_id, version, changed, group, window),
                                 style=CalendarStyle.of(group), variant="export",
                                 content_type=DOWNLOAD_TYPE if download else CALENDAR_TYPE, headers=headers)
    except BaseException:
        session.close()
        raise


def _feed_not_found() -> HTTPError:
    return HTTPError(HTTPStatus.NOT_FOUND, "feed not found")


def subscribed_feed(session: Session, secret: str) -> tuple[Feed, Group | None]:
    """The live feed behind a secret URL, and its group: 404 for an unknown secret, a deleted user or a group
    that is deleted or no longer the user's; 410 for a revoked feed, whatever else changed."""
    feed = session.feed_by_digest(token_digest(secret)) if FEED_SECRET_PATTERN.fullmatch(secret) else None
    if feed is None:
        raise _feed_not_found()
    if feed.revoked:
        raise HTTPError(HTTPStatus.GONE, "feed revoked")
    group = None
    if feed.group_id is not None:
        group = session.accessible_group(feed.user_id, group_id=feed.group_id)
    if feed.user_deleted or (feed.group_id is not None and group is None):
        raise _feed_not_found()
    return feed, group


def handle_feed(app: "ExportApp", request: Request, secret: str) -> Response:
    """GET|HEAD /v1/feeds/<secret>.ics: a subscription feed, no Authorization needed (SPEC §3)."""
    if not FEED_SECRET_PATTERN.fullmatch(secret):
        raise _feed_not_found()
    session = app.database.session()
    try:
        feed, group = subscribed_feed(session, secret)
        style = CalendarStyle.of(group, refresh_minutes=app.config.refresh_minutes, busy=feed.busy,
                                 alarms=feed.alarms and not feed.busy)
        # Everything of the feed that its body shows: a PATCH of any of it is a new ETag at once.
        variant = (f"feed {feed.id} {style.refresh_minutes} busy={style.busy} alarms={style.alarms} "
                   f"window={feed.past_days},{feed.future_days}")
        today = int(app.config.clock() // 86400)
        window = feed_window(feed.past_days, feed.future_days, today)
        selection = Selection(feed.user_id, feed.version, feed.changed, group, window,
                              moved=today * 86400 if window else 0)
        return calendar_response(app, request, session, selection, style=style, variant=variant,
                                 content_type=CALENDAR_TYPE, headers=[("Vary", "Accept-Encoding, Origin")])
    except BaseException:
        session.close()
        raise


def feed_window(past_days: int | None, future_days: int | None, today: int) -> Window | None:
    """A feed's window on the day ``today`` (days since 1970, UTC): from 00:00Z ``past_days`` days before
    today, up to 00:00Z ``future_days`` + 1 days after it (SPEC §3 "A feed's window"); None without either."""
    def midnight(day: int) -> str:
        day = min(max(day, FIRST_DAY), LAST_DAY)
        text = _day_text(day)
        return f"{text[:4]}-{text[4:6]}-{text[6:]}T00:00:00Z"
    if past_days is None and future_days is None:
        return None
    return Window(None if past_days is None else midnight(today - past_days),
                  None if future_days is None else midnight(today + future_days + 1))


def handle_subscribe_page(app: "ExportApp", request: Request, secret: str) -> Response:
    """GET|HEAD /v1/feeds/<secret>: the feed's subscribe page, or its HTML 404/410 (SPEC §3)."""
    try:
        with reading(app) as session:
            feed, group = subscribed_feed(session, secret)
    except HTTPError as error:
        return page_error(error.status)
    calendar_name = CalendarStyle.of(group).name          # the calendar's own NAME, as the feed writes it
    return subscribe_page(feed, calendar_name, feed_urls(public_base(app, request), secret))


# --- managing feeds: SPEC §3 "Managing feeds" ---------------------------------------------------------------

@contextlib.contextmanager
def reading(app: "ExportApp") -> Iterator[Session]:
    """A read session for the length of a block (management requests; exports stream theirs)."""
    session = app.database.session()
    try:
        yield session
    finally:
        session.close()


@contextlib.contextmanager
def writing(app: "ExportApp") -> Iterator[WriteSession]:
    """A write transaction for the length of a block: committed when the block ends, undone when it raises.
    It is opened only after the request's read session is closed, so a request never waits for itself."""
    store = app.database.write_session()
    try:
        yield store
        store.commit()
    finally:
        store.close()


def public_base(app: "ExportApp", request: Request) -> str:
    """The base of the URLs handed out: TIMESLOT_BASE_URL, else the address the request came to."""
    return (app.config.base_url or request.base_url).rstrip("/")


def feed_urls(base: str, secret: str) -> dict[str, str]:
    """The secret URLs of a feed: the calendar, the same as webcal://, and its subscribe page."""
    url = f"{base}/v1/feeds/{secret}.ics"
    return {"url": url, "webcal_url": "webcal://" + url.split("://", 1)[1], "page_url": f"{base}/v1/feeds/{secret}"}


def own_feed(session: Session, user_id: int, ident: str) -> dict:
    """The caller's feed with this id; 404 for anything else (another user's, unknown, not a number)."""
    feed = session.feed_of_user(user_id, int(ident)) if FEED_ID_PATTERN.fullmatch(ident) else None
    if feed is None:
        raise _feed_not_found()
    return feed


def _active(feed: dict) -> dict:
    if feed["revoked_at"] is not None:
        raise HTTPError(HTTPStatus.GONE, "feed revoked")
    return feed


def _feed_parameters(app: "ExportApp", request: Request) -> dict[str, object]:
    return request_parameters(request, app.config.max_body_bytes, ("group", *FEED_SETTINGS))


def _feed_created(app: "ExportApp", request: Request, store: WriteSession, user_id: int, feed_id: int,
                  secret: str) -> Response:
    """201 with the new feed's object and, this once, its secret URLs."""
    body = {**store.feed_of_user(user_id, feed_id), **feed_urls(public_base(app, request), secret)}
    return json_response(HTTPStatus.CREATED, body, [("Location", f"{request.script_path}/v1/feeds/{feed_id}")])


def handle_feed_list(app: "ExportApp", request: Request) -> Response:
    """GET|HEAD /v1/feeds: the caller's feeds, revoked ones included, by id; never a secret."""
    with reading(app) as session:
        user_id = authenticate(session, request.header("Authorization"))[0]
        return json_response(HTTPStatus.OK, {"feeds": session.feeds_of_user(user_id)})


def handle_feed_create(app: "ExportApp", request: Request) -> Response:
    """POST /v1/feeds: a new feed (201), at most TIMESLOT_MAX_FEEDS active ones per user (409 beyond)."""
    with reading(app) as session:
        user_id = authenticate(session, request.header("Authorization"))[0]
        parameters = _feed_parameters(app, request)
        settings = {**FEED_DEFAULTS, **feed_settings(parameters)}
        group_uuid = group_value(parameters.get("group"))
        group = None if group_uuid is None else session.accessible_group(user_id, uuid=group_uuid)
        if group_uuid is not None and group is None:
            raise HTTPError(HTTPStatus.NOT_FOUND, "group not found")
    with writing(app) as store:
        if store.active_feeds(user_id) >= app.config.max_feeds:
            raise HTTPError(HTTPStatus.CONFLICT, "too many feeds")
        feed_id, secret = store.insert_feed(user_id, None if group is None else group.id, settings)
        return _feed_created(app, request, store, user_id, feed_id, secret)


def handle_feed_item(app: "ExportApp", request: Request, ident: str) -> Response:
    """GET|HEAD /v1/feeds/<id>: one of the caller's feeds. A path that is no number is a secret: its page."""
    if not ident.isascii() or not ident.isdigit():
        return handle_subscribe_page(app, request, ident)
    with reading(app) as session:
        user_id = authenticate(session, request.header("Authorization"))[0]
        return json_response(HTTPStatus.OK, own_feed(session, user_id, ident))


def handle_feed_change(app: "ExportApp", request: Request, ident: str) -> Response:
    """PATCH /v1/feeds/<id>: change label, details, alarms or the window; the URL shows it at once."""
    with reading(app) as session:
        user_id = authenticate(session, request.header("Authorization"))[0]
        parameters = _feed_parameters(app, request)
        if "group" in parameters:
            raise HTTPError(HTTPStatus.UNPROCESSABLE_ENTITY,
                            "parameter group cannot change: a feed of another group is another feed (create it)")
        changes = feed_settings(parameters)
        feed = _active(own_feed(session, user_id, ident))
    if not changes:
        return json_response(HTTPStatus.OK, feed)
    with writing(app) as store:
        if not store.change_feed(user_id, feed["id"], changes):
            raise HTTPError(HTTPStatus.GONE, "feed revoked")        # revoked since it was read
        return json_response(HTTPStatus.OK, store.feed_of_user(user_id, feed["id"]))


def handle_feed_revoke(app: "ExportApp", request: Request, ident: str) -> Response:
    """DELETE /v1/feeds/<id>: revoke the feed (204, again 204 for a revoked one); its URL answers 410."""
    with reading(app) as session:
        user_id = authenticate(session, request.header("Authorization"))[0]
        feed = own_feed(session, user_id, ident)
    if feed["revoked_at"] is None:
        with writing(app) as store:
            store.revoke_feed(feed["id"])
    return Response(HTTPStatus.NO_CONTENT, [("Cache-Control", "no-store")])


def handle_feed_reset(app: "ExportApp", request: Request, ident: str) -> Response:
    """POST /v1/feeds/<id>/reset: in one transaction revoke the feed and create one with its settings (201)."""
    with reading(app) as session:
        user_id = authenticate(session, request.header("Authorization"))[0]
        feed = _active(own_feed(session, user_id, ident))
    with writing(app) as store:
        if not store.revoke_feed(feed["id"]):
            raise HTTPError(HTTPStatus.GONE, "feed revoked")        # revoked since it was read
        feed_id, secret = store.copy_feed(feed["id"])
        return _feed_created(app, request, store, user_id, feed_id, secret)


def handle_preflight(app: "ExportApp", request: Request, methods: Sequence[str]) -> Response:
    """OPTIONS on any API path: 204 with Allow (that path's methods); CORS preflight headers for an allowed
    Origin."""
    headers = [("Allow", ", ".join(methods))]
    if request.header("Origin") in app.config.cors_origins:
        headers += [("Access-Control-Allow-Methods", ", ".join(methods)),
                    ("Access-Control-Allow-Headers", "Authorization, Content-Type, If-None-Match, X-Request-Id"),
                    ("Access-Control-Max-Age", "600"), ("Vary", "Origin")]
    return Response(HTTPStatus.NO_CONTENT, headers)


# ---------------------------------------------------------------------------------------------------
# Routing: a table of compiled paths and the handlers of their methods
# ---------------------------------------------------------------------------------------------------

Handler = Callable[..., Response]
# A path's OPTIONS is its CORS preflight, answered with that path's methods. /v1/feeds/<x> is a feed of the
# management API when x is a number and a subscribe page otherwise (secrets are 43 URL-safe characters).
ROUTES: tuple[tuple[re.Pattern, dict[str, Handler]], ...] = (
    (re.compile(r"/v1/export/ical"),
     {"GET": handle_export, "HEAD": handle_export, "POST": handle_export, "OPTIONS": handle_preflight}),
    (re.compile(r"/v1/feeds/(?P<secret>.*)\.ics", re.DOTALL), {"GET": handle_feed, "HEAD": handle_feed}),
    (re.compile(r"/v1/feeds"),
     {"GET": handle_feed_list, "HEAD": handle_feed_list, "POST": handle_feed_create, "OPTIONS": handle_preflight}),
    (re.compile(r"/v1/feeds/(?P<ident>[^/]+)"),
     {"GET": handle_feed_item, "HEAD": handle_feed_item, "PATCH": handle_feed_change, "DELETE": handle_feed_revoke,
      "OPTIONS": handle_preflight}),
    (re.compile(r"/v1/feeds/(?P<ident>[^/]+)/reset"), {"POST": handle_feed_reset, "OPTIONS": handle_preflight}),
)


def _methods_of(path: str) -> tuple[dict[str, Handler], dict[str, str]] | None:
    """The methods of the first route whose pattern matches the whole path, and its path parameters."""
    for pattern, methods in ROUTES:
        match = pattern.fullmatch(path)
        if match:
            return methods, match.groupdict()
    return None


# The paths without parameters (the export's among them), answered by one lookup instead of the patterns.
LITERAL_PATHS = {pattern.pattern: _methods_of(pattern.pattern) for pattern, _ in ROUTES
                 if re.escape(pattern.pattern) == pattern.pattern}


def route(method: str, path: str) -> tuple[Handler, dict[str, str]]:
    """The handler and path parameters for a request: 404 for an unknown path, 405 (with Allow) for a method."""
    found = LITERAL_PATHS.get(path) or _methods_of(path)
    if found is None:
        raise HTTPError(HTTPStatus.NOT_FOUND, "not found")
    methods, arguments = found
    if method not in methods:
        raise HTTPError(HTTPStatus.METHOD_NOT_ALLOWED, f"method {method} not allowed",
                        [("Allow", ", ".join(methods))])
    if method == "OPTIONS":
        return functools.partial(handle_preflight, methods=tuple(methods)), {}
    return methods[method], arguments


# ---------------------------------------------------------------------------------------------------
# Application: the WSGI callable
# ---------------------------------------------------------------------------------------------------

# What a 204 or 304 must not carry: they have no content (RFC 9110 §15.3.5, §15.4.5).
CONTENT_HEADERS = frozenset({"Content-Type", "Content-Length", "Content-Disposition", "Content-Transfer-Encoding",
                             "Content-Encoding"})
SECURITY_HEADERS = [("X-Frame-Options", "SAMEORIGIN"), ("X-Content-Type-Options", "nosniff"),
                    ("X-XSS-Protection", "1; mode=block")]
CORS_EXPOSED = "Content-Disposition, ETag, X-Request-Id"
CORS_EXPOSED_FEEDS = "ETag, Location, X-Request-Id"          # the management API's paths: a 201's Location
STATUS_LINES = {status: f"{status.value} {status.phrase}" for status in HTTPStatus}   # enum lookups are slow
BODILESS = frozenset({HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED})


class _Body:
    """The iterable handed to the server: counts bytes, and on close releases the response's resources
    and writes the access line (so a client that goes away mid-body frees its cursor and connection)."""

    def __init__(self, request: Request, response: Response, body: Iterable[bytes], started: float):
        self._request, self._response = request, response
        self._body, self._started = body, started
        self._sent = 0
        self._failed = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._body:
                self._sent += len(chunk)
                yield chunk
        except Exception:
            self._failed = True
            logger.exception("request %s: export failed after %d bytes", self._request.id, self._sent)
            raise

    def close(self) -> None:
        try:
            if hasattr(self._body, "close"):
                self._body.close()
        finally:
            if self._response.close is not None:
                self._response.close()
            request = self._request
            if logger.isEnabledFor(logging.INFO):     # the arguments cost more than a disabled call
                logger.info("%s %s %d %dB %.6fs id=%s%s", _printable(request.method), _loggable(request.path),
                            self._response.status, self._sent, time.perf_counter() - self._started, request.id,
                            " aborted" if self._failed else "")


class ExportApp:
    """The WSGI application of SPEC §3; ``make_app`` builds one."""

    def __init__(self, config: Config):
        self.config = config
        self.database = Database(config.db_path, config.busy_timeout_ms, config.replica, config.clock)
        self.events = EventCache()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        request = Request(environ)
        try:
            handler, arguments = route(request.method, request.path)
            response = handler(self, request, **arguments)
        except HTTPError as error:
            response = json_response(error.status, {"error": error.message}, error.headers)
        except DatabaseReadOnly as error:
            logger.warning("request %s: feed change refused: %s", request.id, error)
            response = json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                     {"error": f"feeds cannot be changed here: {error}", "request_id": request.id})
        except DatabaseUnavailable as error:
            logger.warning("request %s: database unavailable: %s", request.id, error)
            response = json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                     {"error": "database unavailable", "request_id": request.id},
                                     [("Retry-After", str(RETRY_AFTER_SECONDS))])
        except Exception:
            logger.exception("request %s: export failed", request.id)
            response = json_response(HTTPStatus.INTERNAL_SERVER_ERROR,
                                     {"error": "export failed", "request_id": request.id})
        return self._send(request, response, start_response, started)

    def _send(self, request: Request, response: Response, start_response: Callable,
              started: float) -> Iterable[bytes]:
        """The one place that calls start_response: common headers, CORS, no body for HEAD."""
        status = response.status
        headers = response.headers
        values = "".join(map(operator.itemgetter(1), headers))
        if "\r" in values or "\n" in values:     # header injection; the headers added below are constants,
            if response.close is not None:       # a validated request id, and origins checked at start-up
                response.close()
            raise ValueError(f"a header would contain a line break: {headers!r}")
        if status in BODILESS:
            headers = [(name, value) for name, value in headers if name not in CONTENT_HEADERS]
        headers = headers + SECURITY_HEADERS + [("X-Request-Id", request.id)]
        origin = request.header("Origin")
        if origin and origin in self.config.cors_origins:
            managing = request.path.startswith("/v1/feeds") and not request.path.endswith(".ics")
            headers += [("Access-Control-Allow-Origin", origin),
                        ("Access-Control-Expose-Headers", CORS_EXPOSED_FEEDS if managing else CORS_EXPOSED)]
        headers.append(("X-Runtime", f"{time.perf_counter() - started:.6f}"))
        start_response(STATUS_LINES[status], headers)
        body = response.body if request.method != "HEAD" else ()
        if request.method == "HEAD" and hasattr(response.body, "close"):
            response.body.close()
        return _Body(request, response, body, started)


def make_app(db_path: str, **options) -> ExportApp:
    """A WSGI application over the database at ``db_path``; ``options`` are Config fields."""
    return ExportApp(Config(db_path=db_path, **options))


def _application_from_environ() -> ExportApp:
    """The module's ``application``, configured from the environment (TIMESLOT_*), built on first use."""
    config = Config.from_environ(os.environ)
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False    # a server that configures the root logger later (waitress) would repeat lines
        logger.setLevel(config.log_level.upper())
    return ExportApp(config)


class EnvironmentApplication:
    """The module's ``application``: a real module attribute, because uWSGI and mod_wsgi look the callable up
    in the module's dictionary, that builds the ExportApp from the TIMESLOT_* variables on its first call,
    so importing the module reads no environment (mod_wsgi sets it after the import, from a .wsgi file).

    A bad setting cannot stop a WSGI server that imported the module, so each request answers 500
    ``service misconfigured`` and the log says which setting is wrong, without a traceback, until the
    server is restarted with a good one."""

    def __init__(self) -> None:
        self._app: ExportApp | None = None
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        app = self._app
        if app is None:
            try:
                app = self.build()
            except ConfigError as error:
                logger.critical("configuration error: %s", error)
                response = json_response(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "service misconfigured"})
                start_response(STATUS_LINES[response.status], response.headers)
                return response.body
        return app(environ, start_response)

    def build(self) -> ExportApp:
        """The application, built from the environment once (ConfigError for a bad setting)."""
        with self._lock:
            if self._app is None:
                self._app = _application_from_environ()
            return self._app


application = EnvironmentApplication()


# ---------------------------------------------------------------------------------------------------
# serve: a small HTTP/1.1 server for appliances, from the standard library's pieces
# ---------------------------------------------------------------------------------------------------

IDLE_TIMEOUT = 15           # seconds a kept-alive connection may wait for its next request
READ_TIMEOUT = 30           # seconds a request line, its headers or its body may take to arrive (then 408)
MAX_CONNECTIONS = 1000      # open connections; at the bound the oldest idle ones are closed to make room
MAX_DRAIN_BYTES = 64 * 1024  # an unread request body up to this size is skipped; a larger one closes


class _RequestBody:
    """``wsgi.input``: at most Content-Length bytes, so an application can never read into the next request
    on the connection; what it leaves unread is skipped before the next request (``drain``)."""

    def __init__(self, stream, length: int):
        self._stream, self._left = stream, length

    def read(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._stream.read(size) if size else b""
        self._left -= len(data)
        if len(data) < size:
            self._left = 0                      # the client ended the body early: nothing more will come
        return data

    def readline(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._stream.readline(size) if size else b""
        self._left -= len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def drain(self) -> bool:
        """Skip what the application did not read; False when that is too much to wait for (close instead)."""
        if self._left > MAX_DRAIN_BYTES:
            return False
        try:
            while self._left:
                if not self.read(self._left):
                    return False
        except OSError:                                       # the read timeout, or a reset
            return False
        return True


class _ResponseWriter(simple_server.ServerHandler):
    """wsgiref's handler, speaking HTTP/1.1: a body without Content-Length goes chunked, so a client can tell
    an export cut short from a complete one; no body at all for HEAD, 1xx, 204 and 304; ``Connection: close``
    when the connection ends after this response. An HTTP/1.0 client keeps its connection only when it asked
    (``Connection: keep-alive``) and the response has a length, and is then told so with ``Connection:
    keep-alive`` (RFC 9112 §9.3, Appendix C.2.2): a 1.0 client that is not told waits for the close."""

    http_version = "1.1"

    def __init__(self, connection: "_Connection", body: _RequestBody, environ: dict):
        super().__init__(body, connection.wfile, connection.get_stderr(), environ, multithread=True)
        self.request_handler = connection
        self._chunked = self._framing = False

    def _bodiless(self) -> bool:
        return self.request_handler.command == "HEAD" or self.status[:1] == "1" or self.status[:3] in ("204", "304")

    def cleanup_headers(self) -> None:
        super().cleanup_headers()                              # Content-Length for a one-piece body
        if not self._bodiless() and "Content-Length" not in self.headers:
            if self.request_handler.request_version == "HTTP/1.1":
                self.headers["Transfer-Encoding"] = "chunked"
                self._chunked = True
            else:                                             # an HTTP/1.0 client reads to the close
                self.request_handler.close_connection = True
        if self.request_handler.close_connection:
            self.headers["Connection"] = "close"
        elif self.request_handler.request_version == "HTTP/1.0":
            self.headers["Connection"] = "keep-alive"       # http.server kept it open: the client asked

    def send_headers(self) -> None:
        super().send_headers()
        self._framing = self._chunked

    def _write(self, data: bytes) -> None:
        if not self._framing:
            super()._write(data)
        elif data:                                             # an empty chunk would end the body
            super()._write(b"%x\r\n%s\r\n" % (len(data), data))

    def finish_content(self) -> None:
        if self._chunked or self._bodiless():                 # wsgiref would add Content-Length: 0
            if not self.headers_sent:
                self.send_headers()
            if self._chunked:
                self._framing = False
                super()._write(b"0\r\n\r\n")
        else:
            super().finish_content()

    def handle_error(self) -> None:
        self.request_handler.close_connection = True          # a body cut short: the client sees it end
        super().handle_error()

    def log_exception(self, exc_info) -> None:
        logger.debug("response aborted: %s", exc_info[1])     # the app logged it with its request id


class _Connection(simple_server.WSGIRequestHandler):
    """One client connection. The standard library parses each request (http.server's parse_request, with
    its header limits, Connection and Expect handling) and wsgiref builds the environ and runs the app;
    this class only frames bodies and answers one request per call, so an idle connection waits in the
    server's selector, never in a worker."""

    protocol_version = "HTTP/1.1"
    # Status line, headers and the first piece of the body leave in one send (wsgiref writes them
    # separately, and small sends on a kept-alive connection stall 40 ms on delayed ACKs), and no send waits.
    wbufsize = -1
    disable_nagle_algorithm = True

    def __init__(self, sock: socket.socket, address: tuple, server: "HTTPServer11"):
        self.request, self.client_address, self.server = sock, address, server
        self.timeout = server.read_timeout
        self.setup()
        self.close_connection = False

    def log_message(self, format: str, *args) -> None:
        logger.debug("http: %s", _loggable(format % args))

    def handle_expect_100(self) -> bool:
        """http.server's interim 100 Continue, sent now: the client (curl, for bodies over 1 KiB) waits for
        it before sending the body, and the buffered writer would otherwise hold it back."""
        answered = super().handle_expect_100()
        self.wfile.flush()
        return answered

    def serve_one(self) -> bool:
        """Read and answer one request; True when the connection stays open for the next."""
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(65537)
        except OSError:                                       # a timeout or reset before the request line
            return False
        if not self.raw_requestline:
            return False
        if len(self.raw_requestline) > 65536:
            self.requestline, self.request_version, self.command = "", "", ""
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        if not self.parse_request():                          # answers 400, 414, 431, 505 itself
            return False
        length = self._content_length()
        if length is None:
            return False
        body = _RequestBody(self.rfile, length)
        _ResponseWriter(self, body, self.get_environ()).run(self.server.get_app())
        try:
            self.wfile.flush()                                # the end of a buffered response
        except OSError:
            return False
        if not body.drain():
            self.close_connection = True
        return not self.close_connection

    def _content_length(self) -> int | None:
        """The body's length, or None after answering a request whose framing is refused: chunked uploads
        (411; no client of this API sends one), or Content-Length that is invalid or given twice (400).
        Either way the connection closes, so no second request can hide in a body (RFC 9112 §6.3)."""
        if "Transfer-Encoding" in self.headers:
            self.send_error(HTTPStatus.LENGTH_REQUIRED, "Transfer-Encoding is not accepted; send Content-Length")
            return None
        values = self.headers.get_all("Content-Length") or ["0"]
        if len(values) != 1 or not re.fullmatch(r"[0-9]{1,18}", values[0].strip()):
            self.send_error(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
            return None
        return int(values[0])

    def has_buffered_request(self) -> bool:
        """Whether the next (pipelined) request has already arrived, without waiting for one (a non-blocking
        peek: a timeout on the socket would leave its reader unusable)."""
        self.connection.settimeout(0)
        try:
            return bool(self.rfile.peek(1))
        except OSError:
            return False
        finally:
            self.connection.settimeout(self.timeout)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.finish()
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_WR)
        self.connection.close()


class HTTPServer11:
    """`serve`: HTTP/1.1 with persistent connections over a bounded pool of worker threads, each keeping its
    database connection (a new one costs about 500 µs with its statements).

    The main thread accepts connections and watches the idle ones with a selector; a connection with a
    request to read goes to a worker, which answers it (and any pipelined after it) and hands the
    connection back. So hundreds of idle keep-alive clients hold no worker, a new client is answered at
    once, an idle connection closes after ``idle_timeout``, and at ``max_connections`` the oldest idle
    ones close to make room. Shutdown stops accepting, lets the workers finish what they hold, then closes."""

    request_queue_size = 128                          # the listen backlog

    def __init__(self, address: tuple[str, int], threads: int, idle_timeout: float = IDLE_TIMEOUT,
                 read_timeout: float = READ_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                 listener: socket.socket | None = None, shared: bool = False):
        """Listen on ``address``, or on ``listener`` if given. A listener ``shared`` with other worker
        processes (``serve --workers``) has each wake-up accept one connection, so that connections spread
        over the workers instead of all going to whichever woke first."""
        self.read_timeout, self._idle_timeout, self._max_connections = read_timeout, idle_timeout, max_connections
        self._shared = shared
        self._listener = listener or socket.create_server(address, backlog=self.request_queue_size)
        self._listener.setblocking(False)
        self.server_address = self._listener.getsockname()
        self.server_name, self.server_port = socket.getfqdn(address[0]), self.server_address[1]
        self.base_environ = {"SERVER_NAME": self.server_name, "GATEWAY_INTERFACE": "CGI/1.1",   # wsgiref's
                             "SERVER_PORT": str(self.server_port), "REMOTE_HOST": "", "CONTENT_LENGTH": "",
                             "SCRIPT_NAME": ""}
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        self._idle: dict[_Connection, float] = {}      # waiting in the selector, oldest first
        self._open: set[_Connection] = set()
        self._open_lock = threading.Lock()
        self._ready: queue.Queue = queue.Queue()       # connections with a request, for the workers
        self._returned: queue.Queue = queue.Queue()    # kept-alive connections, back to the selector
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._app: Callable | None = None
        self._workers = [threading.Thread(target=self._work, name=f"worker-{n}", daemon=True) for n in range(threads)]
        for worker in self._workers:
            worker.start()

    def set_app(self, app: Callable) -> None:
        self._app = app

    def get_app(self) -> Callable:
        return self._app

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select(timeout=min(poll_interval, 1.0)):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_reader:
                        with contextlib.suppress(OSError):
                            self._wake_reader.recv(4096)
                    else:
                        self._selector.unregister(key.fileobj)
                        self._idle.pop(key.data, None)
                        self._ready.put(key.data)
                self._take_back_returned()
                self._close_idle(older_than=time.monotonic() - self._idle_timeout)
        finally:
            self._stopped.set()

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:                      # out of file descriptors, say: try again later
                logger.warning("accept failed: %s", error)
                return
            with self._open_lock:
                crowded = len(self._open) >= self._max_connections
            if crowded and self._idle:
                self._close(next(iter(self._idle)))       # the oldest idle connection makes room
            elif crowded:
                sock.close()                              # every connection busy: refuse the newcomer
                continue
            try:
                connection = _Connection(sock, address, self)
            except OSError:
                sock.close()
                continue
            with self._open_lock:
                self._open.add(connection)
            self._wait_for_request(connection)
            if self._shared:
                return

    def _wait_for_request(self, connection: _Connection) -> None:
        self._idle[connection] = time.monotonic()
        self._selector.register(connection.connection, selectors.EVENT_READ, connection)

    def _take_back_returned(self) -> None:
        while True:
            try:
                connection = self._returned.get_nowait()
            except queue.Empty:
                return
            if self._stopping.is_set():
                self._close(connection)
            else:
                self._wait_for_request(connection)

    def _close_idle(self, older_than: float) -> None:
        for connection, since in list(self._idle.items()):
            if since >= older_than:
                break
            self._close(connection)

    def _close(self, connection: _Connection) -> None:
        if self._idle.pop(connection, None) is not None:
            self._selector.unregister(connection.connection)
        with self._open_lock:
            self._open.discard(connection)
        connection.close()

    def _work(self) -> None:
        while True:
            connection = self._ready.get()
            if connection is None:
                return
            try:
                keep = connection.serve_one()
                while keep and not self._stopping.is_set() and connection.has_buffered_request():
                    keep = connection.serve_one()
            except Exception:
                logger.debug("connection from %s ended with an error", connection.client_address[0], exc_info=True)
                keep = False
            if keep and not self._stopping.is_set():
                self._returned.put(connection)
                with contextlib.suppress(OSError):
                    self._wake_writer.send(b"\0")
            else:
                with self._open_lock:
                    self._open.discard(connection)
                connection.close()

    def shutdown(self) -> None:
        """Stop serve_forever (from another thread) and wait until it has returned."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
        self._stopped.wait()

    def server_close(self) -> None:
        """Stop accepting, let the workers finish the requests they have, then close every connection."""
        self._stopping.set()
        self._listener.close()
        for _ in self._workers:
            self._ready.put(None)
        for worker in self._workers:
            worker.join(timeout=30)
        for connection in list(self._idle):
            self._close(connection)
        self._take_back_returned()
        self._selector.close()
        self._wake_reader.close()
        self._wake_writer.close()


def serve(app: ExportApp, host: str, port: int, threads: int, ready: Callable[[str], None] = print,
          workers: int = 1) -> None:
    """Serve ``app`` until SIGTERM or SIGINT, then finish in-flight requests and return.

    With ``workers`` > 1, that many processes forked from this one answer on the port, each with its own
    ``threads``, and this process only watches them: Python runs one thread at a time per process, so one
    process uses one core however many threads it has. The bound on open connections is shared out among
    the workers. A worker that dies is replaced (after a second, when it died at once)."""
    listeners = _listeners(host, port, workers)
    shape = f"{threads} threads" if workers == 1 else f"{workers} workers x {threads} threads"
    line = (f"Serving {app.database.path} on http://{host}:{listeners[0].getsockname()[1]} ({shape}, HTTP/1.1); "
            "Ctrl-C stops.")
    if workers == 1:
        _serve_in_this_process(app, HTTPServer11((host, port), threads, listener=listeners[0]), lambda: ready(line))
    else:
        _supervise_workers(app, listeners, threads, workers, lambda: ready(line))


# Linux balances the connections of a port over SO_REUSEPORT sockets; other systems may not.
_SPREADS_CONNECTIONS = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def _listeners(host: str, port: int, workers: int) -> list[socket.socket]:
    """One listening socket per worker on Linux, all bound to the port with SO_REUSEPORT, so the kernel
    spreads new connections evenly over the workers (measured: with one socket shared by two workers,
    whichever woke first took 15 of 16 keep-alive clients, and kept them). Elsewhere one socket, shared."""
    first = socket.create_server((host, port), backlog=HTTPServer11.request_queue_size,
                                 reuse_port=workers > 1 and _SPREADS_CONNECTIONS)
    if workers == 1 or not _SPREADS_CONNECTIONS:
        return [first]
    port = first.getsockname()[1]                     # the port chosen for port 0
    return [first] + [socket.create_server((host, port), backlog=HTTPServer11.request_queue_size, reuse_port=True)
                      for _ in range(workers - 1)]


def _serve_in_this_process(app: ExportApp, server: HTTPServer11, on_ready: Callable[[], None],
                           supervisor: int | None = None) -> None:
    """Serve until SIGTERM or SIGINT; a worker (``supervisor`` is its parent's pid) also stops once its
    parent is gone, killed without the chance to stop it, so no orphan keeps answering on the port."""
    server.set_app(app)

    def stop(signum=None, frame=None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    def stop_when_orphaned() -> None:
        while os.getppid() == supervisor:
            time.sleep(1)
        logger.error("worker %d: the supervisor %d is gone; stopping", os.getpid(), supervisor)
        stop()

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        if supervisor is not None:
            threading.Thread(target=stop_when_orphaned, name="orphan-watch", daemon=True).start()
        on_ready()
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        logger.info("server stopped")


def _supervise_workers(app: ExportApp, listeners: list[socket.socket], threads: int, workers: int,
                       on_ready: Callable[[], None]) -> None:
    """Fork the workers, pass SIGTERM and SIGINT on to them, replace one that dies, and return once every
    worker has finished after a stop. Nothing is open on the database yet (see Database.release), and no
    thread runs here, so each worker starts as clean as a new process. This process keeps every listening
    socket open, so connections that reach a dead worker's socket wait there for its replacement."""
    supervisor = os.getpid()
    children: dict[int, tuple[int, float]] = {}       # pid -> (worker number, when it started)
    stopping = False

    def start_worker(number: int) -> None:
        pid = os.fork()
        if pid == 0:                                  # the worker
            status = 1
            try:
                if not stopping:
                    own = listeners[number % len(listeners)]
                    for listener in listeners:
                        if listener is not own:
                            listener.close()
                    server = HTTPServer11(own.getsockname()[:2], threads, listener=own, shared=len(listeners) == 1,
                                          max_connections=max(1, MAX_CONNECTIONS // workers))
                    _serve_in_this_process(app, server, lambda: None, supervisor=supervisor)
                status = 0
            except BaseException:
                logger.exception("worker %d failed", os.getpid())
            finally:
                os._exit(status)
        children[pid] = (number, time.monotonic())

    def stop(signum, frame) -> None:
        nonlocal stopping
        if os.getpid() != supervisor:                 # a worker between fork and its own handlers
            os._exit(0)
        stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    previous = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        for number in range(workers):
            start_worker(number)
        on_ready()
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            number, started = children.pop(pid, (None, 0.0))
            if number is None or stopping:
                continue
            logger.error("worker %d ended (%s); starting another", pid,
                         f"signal {-os.waitstatus_to_exitcode(status)}" if os.WIFSIGNALED(status)
                         else f"exit status {os.waitstatus_to_exitcode(status)}")
            if time.monotonic() - started < 1:
                time.sleep(1)                         # no tight loop of workers failing at start
            if not stopping:
                start_worker(number)
    finally:
        for pid in list(children):                    # only after an error here: leave none behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for listener in listeners:
            listener.close()
        for number, handler in previous.items():
            signal.signal(number, handler)
        logger.info("server stopped")


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------

def cli_window(start: str | None, end: str | None) -> Window | None:
    """--from and --to, checked as the API checks ``from`` and ``to`` (one line naming the option)."""
    try:
        return window_value({"from": start, "to": end})
    except HTTPError as error:
        raise ConfigError(error.message.replace("parameter ", "--")) from None


def export_to(database: Database, username: str, group_uuid: str | None, output,
              window: Window | None = None) -> None:
    """The CLI export: the same calendar as the HTTP export, written to a binary file object."""
    session = database.session()
    try:
        user = session.user_by_name(username)
        if user is None:
            raise NotFound(f"no such user: {username}")
        group = None
        if group_uuid is not None:
            if not UUID_PATTERN.fullmatch(group_uuid):
                raise NotFound(f"not a group uuid: {group_uuid}")
            group = session.accessible_group(user[0], uuid=group_uuid.lower())
            if group is None:
                raise NotFound(f"group not found: {group_uuid}")
        for chunk in export_calendar(session, user[0], group, CalendarStyle.of(group), window=window):
            output.write(chunk)
    finally:
        session.close()


def create_user(connection: sqlite3.Connection, username: str) -> str:
    """Insert a user and return their fresh API token (only its digest is stored)."""
    token = secrets.token_urlsafe(20)
    try:
        connection.execute(SQL_INSERT_USER, (str(uuidlib.uuid4()), username, token_digest(token)))
    except sqlite3.IntegrityError as error:
        if "UNIQUE" in str(error):
            raise NotFound(f"user {username} exists already") from error
        raise NotFound(f"invalid username {username!r}") from error
    return token


def _user_id(connection: sqlite3.Connection, username: str) -> int:
    row = connection.execute(SQL_USER_ID_BY_NAME, (username,)).fetchone()
    if row is None:
        raise NotFound(f"no such user: {username}")
    return row[0]


def create_feed(connection: sqlite3.Connection, username: str, group_uuid: str | None,
                settings: Mapping[str, object]) -> str:
    """Insert a feed with ``settings`` (checked as the API checks them) and return its secret (only its
    digest is stored): the same write as ``POST /v1/feeds``, without the per-user bound (an operator's)."""
    try:
        checked = {**FEED_DEFAULTS, **feed_settings(settings)}
    except HTTPError as error:
        raise ConfigError(error.message.replace("parameter ", "--").replace("_", "-")) from None
    user_id = _user_id(connection, username)
    store = WriteSession(connection)
    try:
        group = None
        if group_uuid is not None and UUID_PATTERN.fullmatch(group_uuid):
            group = store.accessible_group(user_id, uuid=group_uuid.lower())
        if group_uuid is not None and group is None:
            raise NotFound(f"group not found or not {username}'s: {group_uuid}")
        _, secret = store.insert_feed(user_id, None if group is None else group.id, checked)
        store.commit()
    finally:
        store.close()
    return secret


DEMO_NAMESPACE = uuidlib.UUID("6f0b7c1e-5a43-4d2b-9c4e-2f1d8a7b3c10")


def _demo_uuid(name: str) -> str:
    return str(uuidlib.uuid5(DEMO_NAMESPACE, name))


def create_demo(connection: sqlite3.Connection) -> tuple[str, str, str]:
    """The demo data (once), a fresh token for the demo user and a fresh demo feed (the previous one is
    revoked, as the previous token stops working): (token, uuid of the demo's Work group, feed secret)."""
    apply_schema(connection)
    token = secrets.token_urlsafe(20)
    store = WriteSession(connection)
    try:
        row = connection.execute(SQL_USER_ID_BY_NAME, ("demo",)).fetchone()
        if row is None:
            _insert_demo_data(connection, token_digest(token))
            row = connection.execute(SQL_USER_ID_BY_NAME, ("demo",)).fetchone()
        else:
            connection.execute(SQL_SET_USER_TOKEN, (token_digest(token), row[0]))
        store.revoke_demo_feeds(row[0])
        _, secret = store.insert_feed(row[0], None, {**FEED_DEFAULTS, "label": "Demo"})
        store.commit()
    finally:
        store.close()
    return token, _demo_uuid("group:work"), secret


def _insert_demo_data(connection: sqlite3.Connection, digest: str) -> None:
    """A user, groups and slots that exercise every feature of the export (SPEC §4)."""
    run = connection.execute
    run(SQL_DEMO_USER, (_demo_uuid("user:demo"), "demo", digest))
    demo = run(SQL_USER_ID_BY_NAME, ("demo",)).fetchone()[0]
    run(SQL_DEMO_USER, (_demo_uuid("user:friend"), "demo-friend", None))
    friend = run(SQL_USER_ID_BY_NAME, ("demo-friend",)).fetchone()[0]
    groups = {key: run(SQL_DEMO_GROUP, (_demo_uuid("group:" + key), name, owner)).lastrowid
              for key, name, owner in (("work", "Work", demo), ("family", "Family; Friends, and more", demo),
                                       ("club", "Book club (shared with demo)", friend))}
    run(SQL_DEMO_MEMBERSHIP, (groups["club"], demo))
    office = run(SQL_DEMO_LOCATION, ("Office", "Friedrichstraße 123", "10117", "Berlin", "Germany", 52.520008,
                                     13.404954)).lastrowid
    cafe = run(SQL_DEMO_LOCATION, ("Café Noir", None, None, "Paris", None, None, None)).lastrowid
    slots = (
        # key, title, description, start, end, all_day, rrule, time zone, cancelled occurrences, visibility,
        # location, alerts, groups. The stand-up stays at 09:00 in Berlin when the clocks change on 28 March.
        ("standup", "Team stand-up", "Daily sync; keep it short, please.", "2026-12-01T08:00:00Z",
         "2026-12-01T08:15:00Z", 0, "FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;UNTIL=20270331", "Europe/Berlin",
         ("2026-12-24T08:00:00Z", "2026-12-31T08:00:00Z"), "friends", office, (5, 15), ("work",)),
        ("review", "Quarterly review \u2013 Q4 \U0001F4C8", "Agenda:\n1. Numbers\n2. Plans\\Ideas",
         "2026-12-10T13:00:00Z", "2026-12-10T15:30:00Z", 0, "", "Europe/Berlin", (), "private", office, (30,),
         ("work",)),
        ("holiday", "Winter holiday", "", "2026-12-24T00:00:00Z", "2026-12-31T00:00:00Z", 1, "", "", (), "public",
         None, (), ("family",)),
        ("birthday", "Grandma's birthday \U0001F382", "Bring flowers", "2026-03-14T00:00:00Z", None, 1,
         "FREQ=YEARLY", "", (), "foaf", cafe, (1440,), ("family",)),
        ("book", "Book club: \u00ab\u0391\u03bd\u03b1\u03b3\u03ad\u03bd\u03bd\u03b7\u03c3\u03b7\u00bb", "We read "
         "a long novel this month; the description is long enough to be folded across several lines of the "
         "calendar file, which every client must unfold again.", "2026-12-05T18:00:00Z", None, 0,
         "FREQ=MONTHLY;BYDAY=1SA;COUNT=6", "", (), "public", cafe, (), ("club",)),
        ("gym", "Gym", "", "2026-12-02T17:00:00Z", "2026-12-02T18:00:00Z", 0, "", "", (), "private", None, (0,), ()),
        ("deleted", "A deleted slot (never exported)", "", "2026-12-03T10:00:00Z", None, 0, "", "", (), "public",
         None, (), ("work",)),
    )
    for (key, title, description, start, end, all_day, rule, zone, cancelled, visibility, location, alerts,
         in_groups) in slots:
        slot = run(SQL_DEMO_SLOT, (_demo_uuid("slot:" + key), demo, title, description, start, end, all_day, rule,
                                   zone, visibility, location, "2026-11-21T00:00:00Z" if key == "deleted" else None)
                   ).lastrowid
        for occurrence in cancelled:
            run(SQL_DEMO_EXDATE, (slot, occurrence))
        for minutes in alerts:
            run(SQL_DEMO_ALERT, (slot, minutes))
        for group in in_groups:
            run(SQL_DEMO_GROUP_SLOT, (groups[group], slot))


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line on stderr (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    database = _ArgumentParser(add_help=False)
    database.add_argument("--db", default=None,
                          help=f"SQLite database (default: $TIMESLOT_DB, else {DEFAULT_DB})")
    parser = _ArgumentParser(prog="timeslot-export", description=__doc__.split("\n")[0],
                             epilog="Documentation: README.md (the front door) and docs/: production.md, "
                                    "several-machines.md, time-zones.md, performance.md, decisions.md and more.")
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_ArgumentParser)
    commands.add_parser("initdb", parents=[database], help="create the schema (idempotent)")
    add_user = commands.add_parser("add-user", parents=[database], help="create a user and print a token")
    add_user.add_argument("username")
    commands.add_parser("demo", parents=[database], help="a demo database; prints a token and a curl command")
    serve_command = commands.add_parser("serve", parents=[database], help="serve the WSGI application")
    serve_command.add_argument("--host", default="127.0.0.1")
    serve_command.add_argument("--port", type=int, default=8000)
    serve_command.add_argument("--threads", type=int, default=16, help="worker threads (per worker process)")
    serve_command.add_argument("--workers", type=int, default=1,
                               help="worker processes sharing the port (default 1; one per core uses every core)")
    serve_command.add_argument("--replica", action="store_true", default=None,
                               help="the database is a replica that a follower (litestream restore -f) updates "
                                    "in place (default: $TIMESLOT_DB_REPLICA)")
    export = commands.add_parser("export", parents=[database], help="write a user's calendar")
    export.add_argument("username")
    export.add_argument("--group", help="uuid of one group")
    export.add_argument("--from", dest="start", metavar="X",
                        help="only slots that reach into the window from X (YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ) on")
    export.add_argument("--to", dest="end", metavar="Y", help="only slots that begin before Y (the same forms)")
    export.add_argument("-o", "--output", help="file to write (default: standard output)")
    feed = commands.add_parser("feed", help="subscription feeds").add_subparsers(
        dest="feed_command", required=True, parser_class=_ArgumentParser)
    create = feed.add_parser("create", parents=[database], help="create a feed and print its secret URL once")
    create.add_argument("username")
    create.add_argument("--group", help="uuid of one group (default: all the user's slots)")
    create.add_argument("--label", default="")
    create.add_argument("--busy", action="store_true", help="show only busy times")
    create.add_argument("--no-alarms", action="store_true", help="leave out alarms")
    create.add_argument("--past-days", type=int, metavar="N", help="show slots from N days before today on "
                        f"(0-{MAX_WINDOW_DAYS}; default: no bound)")
    create.add_argument("--future-days", type=int, metavar="N", help="show slots up to N days after today "
                        f"(0-{MAX_WINDOW_DAYS}; default: no bound)")
    create.add_argument("--base-url", default="http://127.0.0.1:8000")
    listing = feed.add_parser("list", parents=[database], help="list a user's feeds (never their secrets)")
    listing.add_argument("username")
    revoke = feed.add_parser("revoke", parents=[database], help="revoke a feed")
    revoke.add_argument("id", type=int)
    return parser


def _command(arguments: argparse.Namespace, config: Config, out) -> int:
    """Run one parsed command; errors are raised and turned into one line by ``main``."""
    path = config.db_path
    command = arguments.command
    if command == "serve":
        if not 0 <= arguments.port <= 65535 or not 1 <= arguments.threads <= 1024:
            raise ConfigError("--port must be 0-65535 (0: any free port) and --threads 1-1024")
        if not 1 <= arguments.workers <= 64 or (arguments.workers > 1 and not hasattr(os, "fork")):
            raise ConfigError("--workers must be 1-64 (more than 1 needs fork(), which this system lacks)")
        logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app = ExportApp(config)
        app.database.check()
        serve(app, arguments.host, arguments.port, arguments.threads,
              ready=lambda line: print(line, file=out, flush=True), workers=arguments.workers)
        return 0
    if command == "export":
        window = cli_window(arguments.start, arguments.end)
        database = Database(path, config.busy_timeout_ms, config.replica)
        database.check()
        if arguments.output is None:
            export_to(database, arguments.username, arguments.group, out.buffer, window)
            out.flush()
            return 0
        partial = arguments.output + ".part"
        try:
            with open(partial, "wb") as output:
                export_to(database, arguments.username, arguments.group, output, window)
            os.replace(partial, arguments.output)   # the old file stays whole until the new one is
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        return 0
    connection = connect_for_writing(path, create=command in ("initdb", "demo"))
    try:
        if command == "initdb":
            apply_schema(connection)
            print(f"Database ready: {path}", file=out)
        elif command == "add-user":
            token = create_user(connection, arguments.username)
            print(f"User {arguments.username} created. API token (shown once):\n{token}", file=out)
        elif command == "demo":
            token, group, secret = create_demo(connection)
            _print_demo(path, token, group, secret, out)
        elif command == "feed":
            _feed_command(connection, arguments, out)
    finally:
        connection.close()
    return 0


def _print_demo(path: str, token: str, group: str, secret: str, out) -> None:
    curl = ('curl "http://127.0.0.1:8000/v1/export/ical" -d \'{data}\' -X POST \\\n'
            '    -H "Content-Type: application/json" -H "Accept: text/plain" \\\n'
            f'    -H "Authorization: Token token={token}"')
    urls = feed_urls("http://127.0.0.1:8000", secret)
    print(f"Demo database ready: {path}\nUser: demo\nAPI token: {token}\n\n"
          f"Export all the demo user's slots (with `make run` serving):\n{curl.format(data='')}\n\n"
          f"Export the Work group:\n{curl.format(data=json.dumps({'group': group}))}\n\n"
          f"Subscribe to the demo calendar (a feed; this run's replaces the last run's):\n"
          f"Feed URL: {urls['url']}\nSubscribe page: {urls['page_url']}", file=out)


def _feed_command(connection: sqlite3.Connection, arguments: argparse.Namespace, out) -> None:
    if arguments.feed_command == "create":
        if not BASE_URL_PATTERN.fullmatch(arguments.base_url):
            raise ConfigError(f"--base-url must be an http:// or https:// URL, not {arguments.base_url!r}")
        settings = {"label": arguments.label, "details": "busy" if arguments.busy else "full",
                    "alarms": not arguments.no_alarms, "past_days": arguments.past_days,
                    "future_days": arguments.future_days}
        secret = create_feed(connection, arguments.username, arguments.group, settings)
        urls = feed_urls(arguments.base_url.rstrip("/"), secret)
        print(f"Feed created for {arguments.username}. Its URLs are shown only now:\n{urls['url']}\n"
              f"{urls['webcal_url']}\nSubscribe page: {urls['page_url']}", file=out)
    elif arguments.feed_command == "list":
        user_id = _user_id(connection, arguments.username)
        print("id\tlabel\tgroup\tkind\twindow\tcreated\trevoked", file=out)
        for row in connection.execute(SQL_FEEDS_OF_USER, {"user": user_id}).fetchall():
            feed = feed_object(row)
            kind = feed["details"] + ("" if feed["alarms"] else ", no alarms")
            print(f"{feed['id']}\t{_printable(feed['label'])}\t{feed['group'] or 'all'}\t{kind}\t"
                  f"{_window_text(feed['past_days'], feed['future_days'])}\t{feed['created_at']}\t"
                  f"{feed['revoked_at'] or '-'}", file=out)
    else:
        row = connection.execute(SQL_FEED_EXISTS, (arguments.id,)).fetchone()
        if row is None:
            raise NotFound(f"no feed with id {arguments.id}")
        if row[0] is not None:
            print(f"Feed {arguments.id} was already revoked at {row[0]}.", file=out)
        else:
            connection.execute(SQL_REVOKE_FEED, (arguments.id,))
            print(f"Feed {arguments.id} revoked.", file=out)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, out=None) -> int:
    """The command line (SPEC §5): every error is one line on stderr and a non-zero exit."""
    out = out or sys.stdout
    arguments = _parser().parse_args(argv)
    try:
        config = Config.from_environ(os.environ if environ is None else environ, db_path=arguments.db,
                                     replica=getattr(arguments, "replica", None))
        return _command(arguments, config, out)
    except (ConfigError, NotFound) as error:
        print(f"timeslot-export: {error}", file=sys.stderr)
        return 1
    except DatabaseUnavailable as error:
        print(f"timeslot-export: database unavailable: {error}", file=sys.stderr)
        return 1
    except sqlite3.Error as error:
        print(f"timeslot-export: database error: {error}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1                                   # the reader of standard output went away
    except OSError as error:
        print(f"timeslot-export: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
