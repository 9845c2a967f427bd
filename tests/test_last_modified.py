"""SPEC §3 Last-Modified and If-Modified-Since: a date that never lies. A client that got `Last-Modified: L`
and sends `If-Modified-Since: L` gets 304 only for the same bytes, whatever changed in between and however
fast; the date is never later than Date, and is there once the newest change's second is over."""

import calendar
import email.utils
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

import timeslot_export
from conftest import auth, make_client
from test_hardening import running_server

EXPORT = "/v1/export/ical"


def seconds(http_date):
    return calendar.timegm(email.utils.parsedate(http_date))


@pytest.fixture
def world(data):
    """A user with a group, a location, alarms and a cancelled occurrence, and a feed of everything."""
    user_id, token = data.user("owner")
    group_id, group_uuid = data.group(user_id, name="Team")
    member_id, _ = data.user("member")
    data.member(group_id, member_id)
    location = data.location(name="Room 1")
    slot_id, _ = data.slot(user_id, title="Weekly", rrule="FREQ=WEEKLY", alerts=[10], location_id=location,
                           groups=[group_id], start_at="2026-01-05T09:00:00Z", end_at="2026-01-05T10:00:00Z")
    data.run("INSERT INTO slot_exdates (slot_id, occurrence_at) VALUES (?, '2026-01-12T09:00:00Z')", (slot_id,))
    _, secret = data.feed(user_id)
    return {"id": user_id, "token": token, "group_id": group_id, "group": group_uuid, "slot": slot_id,
            "location": location, "member": member_id, "feed": f"/v1/feeds/{secret}.ics"}


def settle():
    """Wait for the current second to end: the second of every change made so far is over."""
    time.sleep(1.002 - time.time() % 1)


def counter():
    counter.value = getattr(counter, "value", 0) + 1
    return counter.value


def nothing(data, world):
    pass


def ensure_alert(data, world):
    data.run("INSERT OR IGNORE INTO slot_alerts (slot_id, minutes_before) VALUES (?, 10)", (world["slot"],))


def ensure_link(data, world):
    data.run("UPDATE group_slots SET deleted_at = NULL")


# Each kind of change SPEC §3 lists: (what makes it possible again, the change), each a write of its own.
CHANGES = {
    "slot inserted": (nothing, lambda data, w: data.slot(w["id"], title=f"New {counter()}", groups=[w["group_id"]])),
    "slot updated": (nothing, lambda data, w: data.run("UPDATE slots SET title = ? WHERE id = ?",
                                                       (f"Title {counter()}", w["slot"]))),
    "slot soft-deleted": (lambda data, w: data.run("UPDATE slots SET deleted_at = NULL"),
                          lambda data, w: data.run("UPDATE slots SET deleted_at = '2026-01-01T00:00:00Z'")),
    "slot hard-deleted": (lambda data, w: w.update(doomed=data.slot(w["id"], title="Doomed",
                                                                   groups=[w["group_id"]])[0]),
                          lambda data, w: data.run("DELETE FROM group_slots WHERE slot_id = ?", (w["doomed"],))
                          or data.run("DELETE FROM slots WHERE id = ?", (w["doomed"],))),
    "alert added": (nothing, lambda data, w: data.run(
        "INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (?, ?)", (w["slot"], 100 + counter()))),
    "alert removed": (ensure_alert, lambda data, w: data.run("DELETE FROM slot_alerts WHERE slot_id = ?",
                                                             (w["slot"],))),
    "occurrence cancelled": (nothing, lambda data, w: data.run(
        "INSERT INTO slot_exdates (slot_id, occurrence_at) VALUES (?, ?)",
        (w["slot"], f"2026-{1 + counter() % 12:02d}-05T09:00:00Z".replace("-05T", f"-{10 + counter() % 18:02d}T")))),
    "cancellation removed": (lambda data, w: data.run(
        "INSERT OR IGNORE INTO slot_exdates (slot_id, occurrence_at) VALUES (?, '2026-01-12T09:00:00Z')",
        (w["slot"],)), lambda data, w: data.run("DELETE FROM slot_exdates WHERE slot_id = ?", (w["slot"],))),
    "location renamed": (nothing, lambda data, w: data.run("UPDATE locations SET name = ? WHERE id = ?",
                                                           (f"Room {counter()}", w["location"]))),
    "group link removed": (ensure_link, lambda data, w: data.run(
        "UPDATE group_slots SET deleted_at = '2026-01-01T00:00:00Z'")),
    "group renamed": (nothing, lambda data, w: data.run("UPDATE slot_groups SET name = ?", (f"Team {counter()}",))),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_every_change_at_once_after_a_fetch_is_a_200_and_again(db_path, data, world, change):
    """For each kind of change: a fetch, the change at once (the same second), then If-Modified-Since with
    the fetch's date is 200 with the new body, on the export, the group's export and the feed; twice."""
    client = make_client(db_path)
    requests = [lambda headers: client.get(EXPORT, headers={**auth(world["token"]), **headers}),
                lambda headers: client.get(EXPORT, {"group": world["group"]}, headers={**auth(world["token"]), **headers}),
                lambda headers: client.get(world["feed"], headers=headers)]
    prepare, apply = CHANGES[change]
    for _ in range(2):
        prepare(data, world)
        settle()
        fetched = [request({}) for request in requests]
        for request, first in zip(requests, fetched):
            assert request({"If-Modified-Since": first.headers["Last-Modified"]}).status_int == 304
        apply(data, world)
        shown = 0
        for request, first in zip(requests, fetched):
            again = request({"If-Modified-Since": first.headers["Last-Modified"]})
            if again.status_int == 304:                                  # only for the same bytes
                assert request({}).body == first.body
            else:                                                        # (a 200 of the same bytes is allowed)
                assert again.status_int == 200
                shown += again.body != first.body
        assert shown >= 1                                                # the change shows somewhere


def test_no_date_names_two_bodies_however_fast_the_changes(db_path, data, world):
    """Changes and fetches back to back for two and a half seconds: a date is given only once the second of
    the newest change is over, and never to two different bodies."""
    client = make_client(db_path)
    seen = {}
    deadline = time.time() + 2.5
    number = 0
    while time.time() < deadline:
        data.run("UPDATE slots SET title = ? WHERE id = ?", (f"state {number}", world["slot"]))
        number += 1
        for _ in range(3):
            response = client.get(world["feed"])
            if "Last-Modified" in response.headers:
                seen.setdefault(response.headers["Last-Modified"], set()).add(response.body)
    settle()
    final = client.get(world["feed"])
    seen.setdefault(final.headers["Last-Modified"], set()).add(final.body)
    assert all(len(bodies) == 1 for bodies in seen.values()), {date: len(bodies) for date, bodies in seen.items()}
    for date, (body,) in seen.items():
        expected = 304 if body == final.body else 200
        assert client.get(world["feed"], headers={"If-Modified-Since": date}).status_int == expected


def test_a_change_committed_late_is_never_hidden_by_a_date(db_path, data, world):
    """A transaction that wrote in the same second as the change before it and commits after a fetch: the
    fetch gets no date it could later share with the new state (none, while a write is in progress)."""
    client = make_client(db_path)
    writer = sqlite3.connect(db_path, isolation_level=None)
    data.run("UPDATE slots SET title = 'before' WHERE id = ?", (world["slot"],))
    writer.execute("BEGIN")
    writer.execute("UPDATE slots SET title = 'late' WHERE id = ?", (world["slot"],))   # same second, uncommitted
    settle()
    settle()                                                                          # both seconds are over
    fetched = client.get(world["feed"])
    assert b"SUMMARY:before" in fetched.body
    writer.execute("COMMIT")
    writer.close()
    if "Last-Modified" in fetched.headers:
        after = client.get(world["feed"], headers={"If-Modified-Since": fetched.headers["Last-Modified"]})
        assert after.status_int == 200 and b"SUMMARY:late" in after.body
    settle()
    committed = client.get(world["feed"])
    assert b"SUMMARY:late" in committed.body and "Last-Modified" in committed.headers      # once it is over


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])   # the -shm's write byte, or the database's RESERVED
def test_a_date_is_left_out_while_a_write_is_in_progress_and_back_after_it(db_path, data, world, journal_mode):
    assert data.run(f"PRAGMA journal_mode = {journal_mode}").fetchone()[0] == journal_mode
    client = make_client(db_path)
    settle()
    assert "Last-Modified" in client.get(world["feed"]).headers
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")                         # any writer, of any user's data
    try:
        assert "Last-Modified" not in client.get(world["feed"]).headers
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert "Last-Modified" in client.get(world["feed"]).headers


def test_a_kept_connection_asks_the_wal_index_it_was_checked_in_with_and_a_new_one_looks_it_up(
        db_path, data, world, monkeypatch):
    """writing_now looks the -shm file up by name for a new connection, and again when that connection is
    checked in (it now reads the file, so no other can delete it); a kept one asks that file directly, and
    still sees a writer. An -shm file that is not the one asked before is never trusted."""
    database = timeslot_export.Database(str(db_path))
    looked_up = []
    real_stat = timeslot_export.os.stat
    monkeypatch.setattr(timeslot_export.os, "stat",
                        lambda path, *a, **k: (looked_up.append(path), real_stat(path, *a, **k))[1])
    wal_index = str(db_path) + "-shm"
    database.session().close()
    assert looked_up.count(wal_index) == 2 and database._idle.connection[2] is not None    # asked, checked
    looked_up.clear()
    session = database.session()
    assert session.quiet and wal_index not in looked_up
    session.close()
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        session = database.session()
        assert not session.quiet and wal_index not in looked_up              # the kept descriptor tells
        session.close()
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    session = database.session()
    session._wal_index, session._wal_index_checked = timeslot_export.WalIndex(-1, 0), False   # not the -shm
    session.close()
    assert database._idle.connection[2] is None
    looked_up.clear()
    database.session().close()
    assert looked_up.count(wal_index) == 2 and database._idle.connection[2] is not None    # looked up again
    database.release()


def test_the_date_is_never_later_than_now_and_is_left_out_within_the_second_of_a_change(db_path, data, world):
    moments = {"at": time.time()}
    client = make_client(db_path, clock=lambda: moments["at"])
    data.run("UPDATE slots SET title = 'now' WHERE id = ?", (world["slot"],))
    changed = data.run("SELECT changed FROM export_versions WHERE user_id = ?", (world["id"],)).fetchone()[0]
    moments["at"] = changed - 0.5                                               # still the change's second
    response = client.get(world["feed"])
    assert "Last-Modified" not in response.headers
    client.get(world["feed"], headers={"If-Modified-Since": email.utils.formatdate(changed - 1, usegmt=True)},
               status=200)
    moments["at"] = changed
    assert seconds(client.get(world["feed"]).headers["Last-Modified"]) == changed


def test_updated_at_in_the_future_and_its_deletion(db_path, data, world):
    client = make_client(db_path)
    slot_id, _ = data.slot(world["id"], title="From the future", start_at="2026-02-01T10:00:00Z",
                           updated_at="2099-01-01T00:00:00Z")
    settle()
    first = client.get(world["feed"])
    assert seconds(first.headers["Last-Modified"]) <= time.time()                # never the writer's updated_at
    data.run("DELETE FROM slots WHERE id = ?", (slot_id,))                      # a hard delete
    after = client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]})
    assert after.status_int == 200 and b"From the future" not in after.body
    settle()
    assert seconds(client.get(world["feed"]).headers["Last-Modified"]) > seconds(first.headers["Last-Modified"])


def test_another_users_change_leaves_the_date(db_path, data, world):
    client = make_client(db_path)
    settle()
    first = client.get(world["feed"])
    other_id, _ = data.user("other")
    data.slot(other_id, title="Not shown")
    client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]}, status=304)


def test_a_feed_change_of_what_it_shows_moves_the_date(db_path, data, world):
    client = make_client(db_path)
    settle()
    first = client.get(world["feed"])
    data.run("UPDATE feeds SET label = 'renamed'")                               # not in the calendar
    client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]}, status=304)
    data.run("UPDATE feeds SET alarms = 0")
    after = client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]}, status=200)
    assert b"VALARM" not in after.body


@pytest.mark.parametrize("form", [
    lambda when: email.utils.formatdate(when, usegmt=True),                              # IMF-fixdate
    lambda when: time.strftime("%A, %d-%b-%y %H:%M:%S GMT", time.gmtime(when)),          # RFC 850
    lambda when: time.strftime("%a %b ", time.gmtime(when)) + f"{time.gmtime(when).tm_mday:2d}"
    + time.strftime(" %H:%M:%S %Y", time.gmtime(when))])                                  # asctime
def test_the_three_date_forms(db_path, data, world, form):
    client = make_client(db_path)
    settle()
    modified = seconds(client.get(world["feed"]).headers["Last-Modified"])
    client.get(world["feed"], headers={"If-Modified-Since": form(modified)}, status=304)
    settle()
    client.get(world["feed"], headers={"If-Modified-Since": form(modified + 1)}, status=304)
    client.get(world["feed"], headers={"If-Modified-Since": form(modified - 1)}, status=200)


@pytest.mark.parametrize("value", ["garbage", "Sun, 31 Feb 2026 10:00:00 GMT", "Sun, 06 Nov 1994 08:49:37 CET",
                                   "2026-12-03T10:00:00Z", "", "Sun, 06 Nov 1994 25:49:37 GMT"])
def test_an_invalid_date_is_ignored(db_path, data, world, value):
    client = make_client(db_path)
    settle()
    assert client.get(world["feed"], headers={"If-Modified-Since": value}).status_int == 200


def test_a_date_in_the_future_is_ignored(db_path, data, world):
    client = make_client(db_path)
    settle()
    future = email.utils.formatdate(time.time() + 86400, usegmt=True)
    assert client.get(world["feed"], headers={"If-Modified-Since": future}).status_int == 200


def test_if_none_match_wins_over_if_modified_since(db_path, data, world):
    client = make_client(db_path)
    settle()
    first = client.get(world["feed"])
    modified, etag = first.headers["Last-Modified"], first.headers["ETag"]
    client.get(world["feed"], headers={"If-Modified-Since": modified, "If-None-Match": 'W/"other"'}, status=200)
    old = email.utils.formatdate(0, usegmt=True)
    client.get(world["feed"], headers={"If-Modified-Since": old, "If-None-Match": etag}, status=304)


def test_post_ignores_if_modified_since_and_head_answers_it(db_path, data, world):
    client = make_client(db_path)
    settle()
    modified = client.get(EXPORT, headers=auth(world["token"])).headers["Last-Modified"]
    assert client.post(EXPORT, headers={**auth(world["token"]), "If-Modified-Since": modified}).status_int == 200
    head = client.head(EXPORT, headers={**auth(world["token"]), "If-Modified-Since": modified}, status=304)
    assert head.headers["Last-Modified"] == modified and "ETag" in head.headers


def test_a_304_carries_the_date_and_the_etag(db_path, data, world):
    client = make_client(db_path)
    settle()
    first = client.get(world["feed"])
    again = client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]}, status=304)
    assert again.headers["Last-Modified"] == first.headers["Last-Modified"]
    assert again.headers["ETag"] == first.headers["ETag"] and again.body == b""


@pytest.mark.parametrize("restarted", [False, True])
def test_time_zone_data_swapped_under_a_running_or_restarted_server(db_path, data, world, tmp_path, monkeypatch,
                                                                    restarted):
    folder = tmp_path / "zoneinfo"
    (folder / "Test").mkdir(parents=True)
    (folder / "Test" / "Zone").write_bytes(timeslot_export._zone_file("Europe/Berlin")[0])
    monkeypatch.setattr(timeslot_export.zoneinfo, "TZPATH", (str(folder),))
    monkeypatch.setattr(timeslot_export, "_zones", {})
    data.slot(world["id"], title="Zoned", time_zone="Test/Zone", start_at="2026-03-01T10:00:00Z")
    client = make_client(db_path)
    settle()
    first = client.get(world["feed"])
    assert b"TZID:Test/Zone" in first.body
    client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]}, status=304)
    (folder / "Test" / "Zone").write_bytes(timeslot_export._zone_file("America/New_York")[0])   # an update
    if restarted:
        monkeypatch.setattr(timeslot_export, "_zones", {})
        client = make_client(db_path)
    settle()
    after = client.get(world["feed"], headers={"If-Modified-Since": first.headers["Last-Modified"]})
    assert after.status_int == 200 and after.body != first.body and after.headers["ETag"] != first.headers["ETag"]
    assert seconds(after.headers["Last-Modified"]) > seconds(first.headers["Last-Modified"])
    client.get(world["feed"], headers={"If-Modified-Since": after.headers["Last-Modified"]}, status=304)


def test_a_1_x_database_has_dates_from_the_first_request_after_initdb(tmp_path):
    path = tmp_path / "previous.sqlite3"
    from test_schema import database_of_release, initdb_twice
    old = database_of_release(path, "1.1.0")
    old.execute("INSERT INTO users (id, uuid, username, token_digest) VALUES "
                "(1, '00000000-0000-4000-8000-000000000001', 'kept', ?)", (timeslot_export.token_digest("t"),))
    old.execute("INSERT INTO slots (uuid, creator_id, title, start_at) VALUES "
                "('00000000-0000-4000-8000-000000000002', 1, 'kept', '2019-03-01T10:00:00Z')")
    old.execute("INSERT INTO feeds (user_id, token_digest) VALUES (1, ?)",
                (timeslot_export.token_digest("Kept-Feed-AbCdEfGhIjKlMnOpQrStUvWxYz0123"),))
    old.close()
    initdb_twice(path)
    client = make_client(path)
    settle()
    feed = client.get("/v1/feeds/Kept-Feed-AbCdEfGhIjKlMnOpQrStUvWxYz0123.ics")
    assert feed.body.count(b"BEGIN:VEVENT") == 1 and "Last-Modified" in feed.headers
    client.get("/v1/feeds/Kept-Feed-AbCdEfGhIjKlMnOpQrStUvWxYz0123.ics",
               headers={"If-Modified-Since": feed.headers["Last-Modified"]}, status=304)
    sqlite3.connect(path, isolation_level=None).execute("UPDATE slots SET title = 'changed'")
    client.get("/v1/feeds/Kept-Feed-AbCdEfGhIjKlMnOpQrStUvWxYz0123.ics",
               headers={"If-Modified-Since": feed.headers["Last-Modified"]}, status=200)


@pytest.mark.slow
def test_under_serve_with_a_writer_a_date_is_never_later_than_date_and_names_one_body(db_path, data, world):
    """Requests back to back while another connection changes the slot in bursts (every 10 ms for 0.2 s, then
    1.5 s of quiet, three times): every Last-Modified is at most the response's Date, no two different
    bodies share one, and revalidating with each gives 200 exactly when the body changed."""
    stop = threading.Event()

    def writer():
        connection = sqlite3.connect(db_path, isolation_level=None, timeout=10)
        for number in range(60):
            if stop.is_set():
                break
            connection.execute("UPDATE slots SET title = ? WHERE id = ?", (f"title {number}", world["slot"]))
            time.sleep(1.5 if number % 20 == 19 else 0.01)
        connection.close()

    def get(base, headers=None):
        request = urllib.request.Request(base + world["feed"], headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers, b""

    bodies = {}
    with running_server(db_path) as (base, _):
        thread = threading.Thread(target=writer)
        thread.start()
        try:
            deadline = time.monotonic() + 5.5
            while time.monotonic() < deadline:
                status, headers, body = get(base)
                assert status == 200
                if "Last-Modified" in headers:
                    assert seconds(headers["Last-Modified"]) <= seconds(headers["Date"])
                    bodies.setdefault(headers["Last-Modified"], set()).add(body)
        finally:
            stop.set()
            thread.join()
        time.sleep(1.1)
        final_status, final_headers, final_body = get(base)
        assert len(bodies) >= 3 and all(len(seen) == 1 for seen in bodies.values())
        for modified, (body,) in bodies.items():
            status, _, _ = get(base, {"If-Modified-Since": modified})
            assert status == (304 if body == final_body else 200), modified
