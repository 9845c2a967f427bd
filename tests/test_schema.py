"""SPEC §2: the schema rejects every value the exporter could not represent, and exports are index scans."""

import datetime
import os
import random
import sqlite3
import time

import pytest

import timeslot_export
from conftest import make_client

GOOD_SLOT = {"uuid": "00000000-0000-4000-8000-0000000000aa", "creator_id": 1, "title": "t",
             "start_at": "2019-02-28T10:00:00Z"}


@pytest.fixture
def db(data):
    data.user("owner")
    return data.db


def insert(db, table, **values):
    names = ", ".join(values)
    db.execute(f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' for _ in values)})", tuple(values.values()))


@pytest.mark.parametrize("column, value", [
    ("start_at", "2019-02-30T10:00:00Z"), ("start_at", "2019-02-28T24:00:00Z"), ("start_at", "2019-02-28 10:00:00Z"),
    ("start_at", "2019-02-28T10:00:00"), ("start_at", "2019-02-28T10:00:00.000Z"), ("start_at", "2019-02-28T10:00Z"),
    ("start_at", "2019-02-28T10:00:00+01:00"), ("start_at", "2019-13-01T10:00:00Z"), ("start_at", "2019-2-28T10:00:00Z"),
    ("start_at", "0000-01-01T00:00:00Z"), ("start_at", " 2019-02-28T10:00:00Z"), ("start_at", 20190228),
    ("start_at", None), ("start_at", "2019-04-31T00:00:00Z"), ("start_at", "2019-02-28T10:60:00Z"),
    ("end_at", "2019-02-28T09:59:59Z"), ("end_at", "2019-02-29T10:00:00Z"),
    ("created_at", "yesterday"), ("updated_at", "2019-02-28T10:00:61Z"), ("deleted_at", "2019-02-28"),
    ("uuid", "00000000-0000-4000-8000-0000000000AA"), ("uuid", "000000000000-4000-8000-0000000000aa0000"),
    ("uuid", "{00000000-0000-4000-8000-0000000000aa}"), ("uuid", "00000000000040008000000000000aa"),
    ("uuid", "------------------------------------"), ("uuid", "00000000-0000-4000-8000-0000000000ag"),
    ("visibility", "secret"), ("visibility", "PUBLIC"), ("all_day", 2), ("all_day", None),
    ("rrule", "FREQ=DAILY\r\nX-EVIL:1"), ("rrule", "FREQ=DAILY\n"), ("rrule", "FREQ=DAILY:"), ("rrule", "FREQ DAILY"),
    ("rrule", None), ("title", None), ("title", b"blob"), ("description", None),
    ("creator_id", 99), ("location_id", 99),
])
def test_slot_values_the_exporter_cannot_represent_are_rejected(db, column, value):
    db.execute("PRAGMA foreign_keys = ON")
    with pytest.raises(sqlite3.IntegrityError):
        insert(db, "slots", **{**GOOD_SLOT, column: value})


@pytest.mark.parametrize("values", [
    {"latitude": 1.0}, {"longitude": 1.0}, {"latitude": 90.5, "longitude": 0}, {"latitude": 0, "longitude": -180.1},
    {"latitude": float("inf"), "longitude": 0}, {"latitude": "north", "longitude": 0}, {"name": None}, {"country": b"x"},
])
def test_location_values_the_exporter_cannot_represent_are_rejected(db, values):
    with pytest.raises(sqlite3.IntegrityError):
        insert(db, "locations", **values)


@pytest.mark.parametrize("table, values", [
    ("slot_alerts", {"slot_id": 1, "minutes_before": -1}),
    ("slot_alerts", {"slot_id": 1, "minutes_before": 1.5}),
    ("users", {"uuid": "00000000-0000-4000-8000-000000000009", "username": ""}),
    ("users", {"uuid": "00000000-0000-4000-8000-000000000009", "username": "x", "token_digest": "ABC"}),
    ("users", {"uuid": "00000000-0000-4000-8000-000000000009", "username": "x", "token_digest": "A" * 64}),
    ("feeds", {"user_id": 1, "token_digest": "a" * 64, "details": "partial"}),
    ("feeds", {"user_id": 1, "token_digest": "a" * 64, "alarms": 2}),
    ("feeds", {"user_id": 1, "token_digest": "a" * 63}),
])
def test_other_values_the_exporter_cannot_represent_are_rejected(db, table, values):
    insert(db, "slots", **GOOD_SLOT)
    with pytest.raises(sqlite3.IntegrityError):
        insert(db, table, **values)


def test_valid_values_are_accepted_with_the_documented_defaults(db):
    insert(db, "locations", name="x", latitude=-90, longitude=180.0)
    insert(db, "slots", **GOOD_SLOT, end_at="2019-02-28T10:00:00Z", location_id=1,
           rrule="FREQ=WEEKLY;BYDAY=-1SU,+2MO;UNTIL=20200101T000000Z")
    row = db.execute("SELECT all_day, visibility, description, rrule FROM slots").fetchone()
    assert row == (0, "private", "", "FREQ=WEEKLY;BYDAY=-1SU,+2MO;UNTIL=20200101T000000Z")
    insert(db, "slot_alerts", slot_id=1, minutes_before=0)
    insert(db, "feeds", user_id=1, token_digest="a" * 64)
    assert db.execute("SELECT details, alarms, label FROM feeds").fetchone() == ("full", 1, "")


def test_column_affinity_stores_convertible_values_in_the_right_type(db):
    """'1' in an INTEGER column and 5 in a TEXT column are converted on insert, so they are exportable."""
    insert(db, "slots", **{**GOOD_SLOT, "all_day": "1", "title": 5})
    insert(db, "slot_alerts", slot_id=1, minutes_before="5")
    assert db.execute("SELECT typeof(all_day), typeof(title) FROM slots").fetchone() == ("integer", "text")
    assert db.execute("SELECT typeof(minutes_before) FROM slot_alerts").fetchone() == ("integer",)


def test_every_real_instant_is_accepted(db):
    """A seeded sample of valid instants, leap days and the range's ends included, all pass the CHECK."""
    generator = random.Random(5545)
    start = datetime.datetime(1, 1, 1)
    instants = [datetime.datetime(9999, 12, 31, 23, 59, 59), datetime.datetime(2020, 2, 29, 12), start]
    instants += [start + datetime.timedelta(seconds=generator.randrange(315537897600)) for _ in range(3000)]
    for number, instant in enumerate(instants):
        text = f"{instant.year:04d}-{instant:%m-%dT%H:%M:%S}Z"
        insert(db, "slots", **{**GOOD_SLOT, "uuid": f"00000000-0000-4000-8000-{number:012d}", "start_at": text})


def test_foreign_keys_are_declared(db):
    declared = {(table, row[2]) for table in ("slot_groups", "memberships", "slots", "slot_alerts", "group_slots",
                                              "feeds", "slot_exdates")
                for row in db.execute(f"PRAGMA foreign_key_list({table})")}
    assert declared == {("slot_groups", "users"), ("memberships", "slot_groups"), ("memberships", "users"),
                        ("slots", "users"), ("slots", "locations"), ("slot_alerts", "slots"),
                        ("group_slots", "slot_groups"), ("group_slots", "slots"), ("feeds", "users"),
                        ("feeds", "slot_groups"), ("slot_exdates", "slots")}


@pytest.mark.parametrize("sql, parameters", [
    (timeslot_export.SQL_USER_SLOTS, (1,)), (timeslot_export.SQL_GROUP_SLOTS, (1, 1)),
    (timeslot_export.SQL_USER_BY_TOKEN, ("a" * 64,)), (timeslot_export.SQL_FEED_BY_DIGEST, ("a" * 64,)),
    (timeslot_export.SQL_GROUP_BY_UUID, {"group": "x", "user": 1}),
    (timeslot_export.SQL_GROUP_BY_ID, {"group": 1, "user": 1}),
    (timeslot_export.SQL_USER_ZONES, {"user": 1}), (timeslot_export.SQL_GROUP_ZONES, {"group": 1, "user": 1}),
])
def test_export_queries_are_index_searches_not_table_scans(db, sql, parameters):
    # The zone query's recursive CTE adds steps of its own; "SCAN zones" reads the CTE's rows, not a table.
    recursion = {"CO-ROUTINE zones", "SETUP", "RECURSIVE STEP", "SCAN zones"}
    steps = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql, parameters) if row[3] not in recursion]
    assert not [step for step in steps if step.startswith("SCAN") or "TEMP B-TREE" in step], steps
    assert all(step.startswith("SEARCH") for step in steps if not step.startswith("CORRELATED")), steps


def version(db, user_id):
    row = db.execute("SELECT version FROM export_versions WHERE user_id = ?", (user_id,)).fetchone()
    return None if row is None else row[0]


def test_export_version_advances_on_every_change_the_users_exports_show(data):
    alice, _ = data.user("alice")
    bob, _ = data.user("bob")
    group_id, _ = data.group(alice)
    data.member(group_id, bob)
    location = data.location(name="Here")
    slot_id, _ = data.slot(alice, groups=[group_id], location_id=location)
    changes = [
        "UPDATE slots SET title = 'new' WHERE id = :slot",
        "INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (:slot, 5)",
        "DELETE FROM slot_alerts WHERE slot_id = :slot",
        "UPDATE locations SET name = 'There' WHERE id = :location",
        "UPDATE group_slots SET deleted_at = '2020-01-01T00:00:00Z' WHERE slot_id = :slot",
        "UPDATE slot_groups SET name = 'Renamed' WHERE id = :group",
        "INSERT INTO slot_exdates (slot_id, occurrence_at) VALUES (:slot, '2020-01-08T00:00:00Z')",
        "UPDATE slot_exdates SET occurrence_at = '2020-01-15T00:00:00Z' WHERE slot_id = :slot",
        "DELETE FROM slot_exdates WHERE slot_id = :slot",
        "UPDATE slots SET time_zone = 'Europe/Berlin' WHERE id = :slot",
        "UPDATE slots SET deleted_at = '2020-01-01T00:00:00Z' WHERE id = :slot",
    ]
    for change in changes:
        before = version(data.db, alice)
        data.db.execute(change, {"slot": slot_id, "location": location, "group": group_id})
        assert version(data.db, alice) > before, change
    before = version(data.db, bob)
    data.db.execute("UPDATE slot_groups SET name = 'Again' WHERE id = ?", (group_id,))
    assert version(data.db, bob) > before, "a member sees the group's name"
    data.db.execute("UPDATE memberships SET deleted_at = '2020-01-01T00:00:00Z'")
    assert version(data.db, bob) > before + 1


def test_export_version_ignores_other_users_changes(data):
    alice, _ = data.user("alice")
    bob, _ = data.user("bob")
    data.slot(alice)
    before = version(data.db, alice)
    bob_slot, _ = data.slot(bob)
    data.db.execute("UPDATE slots SET title = 'x' WHERE id = ?", (bob_slot,))
    data.group(bob)
    assert version(data.db, alice) == before


# --- time zones and cancelled occurrences (SPEC §2) -----------------------------------------------------------

@pytest.mark.parametrize("name", ["", "UTC", "Europe/Berlin", "America/Argentina/Buenos_Aires", "Etc/GMT+5",
                                  "Etc/GMT-14", "America/Port-au-Prince", "EST5EDT", "Z", "a" * 64, "Not/A_Zone"])
def test_time_zone_names_of_the_right_shape_are_accepted(db, name):
    insert(db, "slots", **GOOD_SLOT, time_zone=name)
    assert db.execute("SELECT time_zone FROM slots").fetchone() == (name,)


@pytest.mark.parametrize("name", ["/Europe/Berlin", "Europe/Berlin/", "Europe//Berlin", "/", "Europe/Ber.lin",
                                  "../../etc/passwd", "a" * 65, "Europe/Berlin ", " UTC", "Europe Berlin",
                                  "Europe/Berlin\n", "Zürich", "Europe\\Berlin", "UTC;DROP", None, b"UTC"])
def test_time_zone_names_of_another_shape_are_rejected_with_a_clear_error(db, name):
    with pytest.raises(sqlite3.IntegrityError, match="time_zone"):
        insert(db, "slots", **GOOD_SLOT, time_zone=name)


def test_a_time_zone_name_defaults_to_utc(db):
    insert(db, "slots", **GOOD_SLOT)
    assert db.execute("SELECT time_zone FROM slots").fetchone() == ("",)


@pytest.mark.parametrize("values", [
    {"slot_id": 1, "occurrence_at": "2019-02-30T10:00:00Z"}, {"slot_id": 1, "occurrence_at": "2019-03-01 10:00:00Z"},
    {"slot_id": 1, "occurrence_at": None}, {"slot_id": 1, "occurrence_at": 20190301},
    {"slot_id": 99, "occurrence_at": "2019-03-01T10:00:00Z"},
])
def test_cancelled_occurrences_the_exporter_cannot_represent_are_rejected(db, values):
    db.execute("PRAGMA foreign_keys = ON")
    insert(db, "slots", **GOOD_SLOT)
    with pytest.raises(sqlite3.IntegrityError):
        insert(db, "slot_exdates", **values)


def test_a_cancelled_occurrence_is_stored_once(db):
    insert(db, "slots", **GOOD_SLOT)
    insert(db, "slot_exdates", slot_id=1, occurrence_at="2019-03-07T10:00:00Z")
    with pytest.raises(sqlite3.IntegrityError):
        insert(db, "slot_exdates", slot_id=1, occurrence_at="2019-03-07T10:00:00Z")


def database_of_release(path, release):
    """A database file built by schema.sql as ``release`` shipped it (kept in tests/data/); an open connection."""
    old = sqlite3.connect(path, isolation_level=None)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", f"schema-{release}.sql"),
              encoding="utf-8") as schema:
        old.executescript(schema.read())
    return old


def assert_change_clocks_started(rows, upgraded_at):
    """After `initdb`, every user's change clock (Last-Modified) runs from the upgrade on, as the triggers
    keep it: the data's older changes are of unknown time, so they count as of the upgrade."""
    assert rows and all(upgraded_at < row[2] <= time.time() + 2 for row in rows)


def initdb_twice(path):
    """`initdb` on the file, twice: the second run must change nothing."""
    for _ in range(2):
        connection = timeslot_export.connect_for_writing(str(path))
        timeslot_export.apply_schema(connection)
        connection.close()


def assert_defined_as_a_new_database(db, tmp_path):
    """Every table, index and trigger as a database made by this release's schema.sql defines it."""
    fresh = timeslot_export.connect_for_writing(str(tmp_path / "new.sqlite3"), create=True)
    timeslot_export.apply_schema(fresh)
    definitions = "SELECT type, name, sql FROM sqlite_master ORDER BY type, name"
    assert db.execute(definitions).fetchall() == fresh.execute(definitions).fetchall()
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fresh.close()


def test_initdb_brings_a_database_of_the_first_schema_up_to_date_and_keeps_every_row(tmp_path):
    """A database of release 1.0.0, before time zones and cancelled occurrences."""
    path = tmp_path / "old.sqlite3"
    old = database_of_release(path, "1.0.0")
    old.execute("INSERT INTO users (id, uuid, username) VALUES (1, '00000000-0000-4000-8000-000000000001', 'kept')")
    for number in range(50):
        old.execute("INSERT INTO slots (uuid, creator_id, title, start_at, rrule) VALUES (?, 1, ?, ?, 'FREQ=DAILY')",
                    (f"00000000-0000-4000-8000-{number:012d}", f"slot {number}", f"2019-03-{1 + number % 28:02d}T10:00:00Z"))
        old.execute("INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (?, 5)", (number + 1,))
    before = {table: old.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
              for table in ("users", "slots", "slot_alerts", "export_versions")}
    old.close()
    with pytest.raises(timeslot_export.DatabaseUnavailable, match="run initdb"):
        timeslot_export.Database(str(path)).check()          # the service says what to do, no traceback
    upgraded_at = int(time.time())
    initdb_twice(path)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    after = {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in before}
    assert after["users"] == before["users"] and after["slot_alerts"] == before["slot_alerts"]
    assert [row[:2] for row in after["export_versions"]] == before["export_versions"]
    assert_change_clocks_started(after["export_versions"], upgraded_at)
    assert [row[:-1] for row in after["slots"]] == before["slots"] and {row[-1] for row in after["slots"]} == {""}
    timeslot_export.Database(str(path)).check()
    with pytest.raises(sqlite3.IntegrityError, match="time_zone"):
        db.execute("UPDATE slots SET time_zone = 'Europe//Berlin' WHERE id = 1")
    db.execute("UPDATE slots SET time_zone = 'Europe/Berlin' WHERE id = 1")
    db.execute("INSERT INTO slot_exdates (slot_id, occurrence_at) VALUES (1, '2019-03-02T10:00:00Z')")
    assert db.execute("SELECT version FROM export_versions").fetchone()[0] > before["export_versions"][0][1] + 2
    assert_defined_as_a_new_database(db, tmp_path)


def test_a_failed_initdb_leaves_the_database_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "old.sqlite3"
    database_of_release(path, "1.0.0").close()
    broken = tmp_path / "schema.sql"
    with open(timeslot_export.SCHEMA_PATH, encoding="utf-8") as schema:
        broken.write_text(schema.read() + "\nCREATE TABLE users (id INTEGER);\n")    # fails at the very end
    monkeypatch.setattr(timeslot_export, "SCHEMA_PATH", str(broken))
    connection = timeslot_export.connect_for_writing(str(path))
    with pytest.raises(sqlite3.OperationalError):
        timeslot_export.apply_schema(connection)
    assert not [row for row in connection.execute("SELECT name FROM pragma_table_info('slots') WHERE name = 'time_zone'")]
    assert not connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'slot_exdates'").fetchall()


GOOD_FEED = {"user_id": 1, "token_digest": "a" * 64}


@pytest.mark.parametrize("column", ["past_days", "future_days"])
@pytest.mark.parametrize("value", [-1, 36601, 1.5, "thirty", "", b"\x01", 10 ** 12])
def test_a_feed_window_the_service_cannot_use_is_rejected(db, column, value):
    with pytest.raises(sqlite3.IntegrityError, match=column):
        insert(db, "feeds", **{**GOOD_FEED, column: value})


@pytest.mark.parametrize("value", [None, 0, 1, 36600])
def test_feed_windows_from_0_to_36600_days_or_none(db, value):
    insert(db, "feeds", **GOOD_FEED, past_days=value, future_days=value)
    assert db.execute("SELECT past_days, future_days FROM feeds").fetchone() == (value, value)


def test_a_feed_without_a_window_has_none(db):
    insert(db, "feeds", **GOOD_FEED)
    assert db.execute("SELECT past_days, future_days FROM feeds").fetchone() == (None, None)


def test_initdb_brings_a_1_1_database_up_to_date_keeping_every_row_and_its_feeds_show_everything(tmp_path):
    """A database of release 1.1.0: time zones, and feeds without windows."""
    path = tmp_path / "previous.sqlite3"
    old = database_of_release(path, "1.1.0")
    old.execute("INSERT INTO users (id, uuid, username, token_digest) VALUES "
                "(1, '00000000-0000-4000-8000-000000000001', 'kept', ?)", (timeslot_export.token_digest("t"),))
    for number in range(30):
        old.execute("INSERT INTO slots (uuid, creator_id, title, start_at, time_zone) VALUES (?, 1, ?, ?, ?)",
                    (f"00000000-0000-4000-8000-{number:012d}", f"slot {number}",
                     f"{1990 + number}-03-01T10:00:00Z", "Europe/Berlin" if number % 2 else ""))
    secrets = [f"Kept-Feed-{number:02d}-AbCdEfGhIjKlMnOpQrStUvWxYz0123" for number in range(3)]
    for number, secret in enumerate(secrets):
        old.execute("INSERT INTO feeds (user_id, token_digest, label, details, alarms, revoked_at) VALUES "
                    "(1, ?, ?, ?, ?, ?)", (timeslot_export.token_digest(secret), f"feed {number}",
                                           "busy" if number == 1 else "full", number % 2,
                                           "2020-01-01T00:00:00Z" if number == 2 else None))
    before = {table: old.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
              for table in ("users", "slots", "feeds", "export_versions")}
    old.close()
    with pytest.raises(timeslot_export.DatabaseUnavailable, match="run initdb"):
        timeslot_export.Database(str(path)).check()
    upgraded_at = int(time.time())
    initdb_twice(path)
    db = sqlite3.connect(path, isolation_level=None)
    after = {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in before}
    assert after["users"] == before["users"] and after["slots"] == before["slots"]
    assert [row[:2] for row in after["export_versions"]] == before["export_versions"]
    assert_change_clocks_started(after["export_versions"], upgraded_at)
    assert [row[:-2] for row in after["feeds"]] == before["feeds"]
    assert {row[-2:] for row in after["feeds"]} == {(None, None)}             # no window: everything, as before
    timeslot_export.Database(str(path)).check()
    client = make_client(path)
    for secret in secrets[:2]:
        body = client.get(f"/v1/feeds/{secret}.ics").body
        assert body.count(b"BEGIN:VEVENT") == 30
    client.get(f"/v1/feeds/{secrets[2]}.ics", status=410)
    listed = client.get("/v1/feeds", headers={"Authorization": "Token token=t"}).json["feeds"]
    assert [(feed["label"], feed["past_days"], feed["future_days"]) for feed in listed] == \
           [("feed 0", None, None), ("feed 1", None, None), ("feed 2", None, None)]
    with pytest.raises(sqlite3.IntegrityError, match="past_days"):
        db.execute("UPDATE feeds SET past_days = -1 WHERE id = 1")
    assert_defined_as_a_new_database(db, tmp_path)
