"""SPEC §3 "from", "to" and "A feed's window": a date window selects whole slots by their occurrences, as an
index search of a long history, on the export, its command line and feeds (whose window moves every day)."""

import datetime
import sqlite3

import pytest

import timeslot_export
from conftest import auth, events, make_client, uids
from test_cli import cli, one_line_error

EXPORT = "/v1/export/ical"


@pytest.fixture
def user(data):
    user_id, token = data.user("windowed")
    return {"id": user_id, "token": token}


def window_uids(client, token, **bounds):
    return uids(client.get(EXPORT, {name.rstrip("_"): value for name, value in bounds.items()},
                           headers=auth(token)).body)


# --- the parameters -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["from", "to"])
@pytest.mark.parametrize("value", ["2019-02-30", "2019-13-01", "0000-01-01", "2019-01-01T10:00:00",
                                   "2019-01-01 10:00:00Z", "2019-01-01T24:00:00Z", "2019-1-01", "yesterday",
                                   "10000-01-01", "2019-01-01T10:00Z", " 2019-01-01", 20190101, True, ["2019-01-01"]])
def test_a_bad_bound_is_422_naming_it(client, user, name, value):
    response = client.post_json(EXPORT, {name: value}, headers=auth(user["token"]), status=422)
    assert f"parameter {name} " in response.json["error"]


@pytest.mark.parametrize("start, end", [("2020-01-02", "2020-01-01"), ("2020-01-01", "2020-01-01"),
                                        ("2020-01-01T10:00:00Z", "2020-01-01T10:00:00Z"),
                                        ("2020-01-01T00:00:01Z", "2020-01-01")])
def test_to_must_be_later_than_from(client, user, start, end):
    response = client.post_json(EXPORT, {"from": start, "to": end}, headers=auth(user["token"]), status=422)
    assert "to" in response.json["error"] and "from" in response.json["error"]


def test_bounds_are_read_like_group_from_json_forms_and_the_query(client, data, user):
    _, early = data.slot(user["id"], start_at="2020-01-01T10:00:00Z")
    _, late = data.slot(user["id"], start_at="2020-06-01T10:00:00Z")
    headers = auth(user["token"])
    assert uids(client.post_json(EXPORT, {"from": "2020-03-01"}, headers=headers).body) == [late]
    assert uids(client.post(EXPORT, "to=2020-03-01", headers=headers).body) == [early]
    assert uids(client.get(EXPORT + "?from=2020-03-01T00:00:00Z", headers=headers).body) == [late]
    assert uids(client.post(EXPORT + "?from=2020-03-01", "from=", headers=headers).body) == [early, late]  # body wins
    assert uids(client.post_json(EXPORT, {"from": None, "to": ""}, headers=headers).body) == [early, late]


# --- which slots: each rule at its boundaries -----------------------------------------------------------------

HOUR = {"start_at": "2020-05-10T10:00:00Z", "end_at": "2020-05-10T11:00:00Z"}
INSTANT = {"start_at": "2020-05-10T10:00:00Z"}
INSTANT_WITH_END = {"start_at": "2020-05-10T10:00:00Z", "end_at": "2020-05-10T10:00:00Z"}
TWO_DAYS = {"start_at": "2020-05-10T00:00:00Z", "end_at": "2020-05-11T00:00:00Z", "all_day": 1}
ONE_DAY = {"start_at": "2020-05-10T00:00:00Z", "all_day": 1}


@pytest.mark.parametrize("slot, bounds, selected", [
    # a timed slot occupies [start, end)
    (HOUR, {"to": "2020-05-10T10:00:00Z"}, False), (HOUR, {"to": "2020-05-10T10:00:01Z"}, True),
    (HOUR, {"from_": "2020-05-10T11:00:00Z"}, False), (HOUR, {"from_": "2020-05-10T10:59:59Z"}, True),
    (HOUR, {"from_": "2020-05-10T10:15:00Z", "to": "2020-05-10T10:45:00Z"}, True),
    (HOUR, {"from_": "2020-05-10", "to": "2020-05-11"}, True), (HOUR, {"from_": "2020-05-11"}, False),
    # an instant (no end, or end = start) is its start: from <= start < to
    (INSTANT, {"from_": "2020-05-10T10:00:00Z"}, True), (INSTANT, {"from_": "2020-05-10T10:00:01Z"}, False),
    (INSTANT, {"to": "2020-05-10T10:00:00Z"}, False), (INSTANT, {"to": "2020-05-10T10:00:01Z"}, True),
    (INSTANT_WITH_END, {"from_": "2020-05-10T10:00:00Z", "to": "2020-05-10T10:00:01Z"}, True),
    (INSTANT_WITH_END, {"from_": "2020-05-10T10:00:01Z"}, False),
    # an all-day slot occupies its dates from 00:00Z to 00:00Z of the day after its end
    (TWO_DAYS, {"to": "2020-05-10"}, False), (TWO_DAYS, {"to": "2020-05-10T00:00:01Z"}, True),
    (TWO_DAYS, {"from_": "2020-05-12"}, False), (TWO_DAYS, {"from_": "2020-05-11T23:59:59Z"}, True),
    (ONE_DAY, {"from_": "2020-05-10T23:59:59Z"}, True), (ONE_DAY, {"from_": "2020-05-11"}, False),
    (ONE_DAY, {"from_": "2020-05-09", "to": "2020-05-10"}, False),
])
def test_a_slot_is_selected_when_it_overlaps_the_window(client, data, user, slot, bounds, selected):
    _, slot_uuid = data.slot(user["id"], **slot)
    assert window_uids(client, user["token"], **bounds) == ([slot_uuid] if selected else [])


WEEKLY = {"start_at": "2020-01-06T09:00:00Z", "end_at": "2020-01-06T10:00:00Z"}


@pytest.mark.parametrize("zone, rule, bounds, selected", [
    # UNTIL in UTC: the last occurrence starts 2020-03-02T09:00Z and ends at 10:00Z
    ("", "FREQ=WEEKLY;UNTIL=20200302T090000Z", {"from_": "2020-03-02T10:00:00Z"}, False),
    ("", "FREQ=WEEKLY;UNTIL=20200302T090000Z", {"from_": "2020-03-02T09:59:59Z"}, True),
    # a floating UNTIL is read in the slot's zone: in Kiritimati (UTC+14) 2020-03-02T23:59:59 is 09:59:59Z,
    # in Pago Pago (UTC-11) it is 2020-03-03T10:59:59Z; the window starts a day before or after
    ("Pacific/Kiritimati", "FREQ=DAILY;UNTIL=20200302T235959", {"from_": "2020-03-02T11:00:00Z"}, False),
    ("Pacific/Kiritimati", "FREQ=DAILY;UNTIL=20200303T235959", {"from_": "2020-03-02T11:00:00Z"}, True),
    ("Pacific/Pago_Pago", "FREQ=DAILY;UNTIL=20200302T235959", {"from_": "2020-03-03T11:00:00Z"}, True),
    ("Pacific/Pago_Pago", "FREQ=DAILY;UNTIL=20200301T235959", {"from_": "2020-03-03T11:00:00Z"}, False),
    # a date UNTIL is 23:59:59 on that day in the zone
    ("Pacific/Pago_Pago", "FREQ=DAILY;UNTIL=20200302", {"from_": "2020-03-03T11:00:00Z"}, True),
    ("Pacific/Kiritimati", "FREQ=DAILY;UNTIL=20200302", {"from_": "2020-03-02T11:00:00Z"}, False),
    # the first occurrence at or after the window's end: out, whatever the rule
    ("", "FREQ=WEEKLY", {"to": "2020-01-06T09:00:00Z"}, False),
    ("", "FREQ=WEEKLY", {"to": "2020-01-06T09:00:01Z"}, True),
    # an open-ended series reaches every later window
    ("", "FREQ=WEEKLY", {"from_": "2030-06-01", "to": "2030-07-01"}, True),
    ("Europe/Berlin", "FREQ=WEEKLY;BYDAY=MO", {"from_": "2045-01-01", "to": "2045-01-02"}, True),
    # a rule that is not written makes the slot a single event
    ("", "FREQ=WEEKLY;BYMONTHDAY=1", {"from_": "2020-02-01"}, False),
])
def test_a_recurring_slot_is_selected_by_its_first_occurrence_and_its_until(client, data, user, zone, rule,
                                                                             bounds, selected):
    _, slot_uuid = data.slot(user["id"], rrule=rule, time_zone=zone, **WEEKLY)
    assert window_uids(client, user["token"], **bounds) == ([slot_uuid] if selected else [])


@pytest.mark.parametrize("rule, bounds, selected", [
    ("FREQ=YEARLY;UNTIL=20220510", {"from_": "2022-05-11"}, False),            # all-day: the UNTIL date itself
    ("FREQ=YEARLY;UNTIL=20220510", {"from_": "2022-05-10T23:59:59Z"}, True),
    ("FREQ=YEARLY;UNTIL=20220510T120000Z", {"from_": "2022-05-11"}, False),    # a date-time becomes its date
    ("FREQ=YEARLY", {"from_": "2090-01-01"}, True),
])
def test_an_all_day_series_ends_on_its_until_date(client, data, user, rule, bounds, selected):
    _, slot_uuid = data.slot(user["id"], rrule=rule, **ONE_DAY)
    assert window_uids(client, user["token"], **bounds) == ([slot_uuid] if selected else [])


def test_an_open_ended_weekly_series_from_ten_years_ago_is_in_a_window_of_now(client, data, user):
    _, series = data.slot(user["id"], title="Weekly", rrule="FREQ=WEEKLY;BYDAY=TU", time_zone="America/New_York",
                          start_at="2016-11-29T14:00:00Z", end_at="2016-11-29T15:00:00Z")
    data.slot(user["id"], title="Ended", rrule="FREQ=WEEKLY;UNTIL=20170101T000000Z", start_at="2016-11-29T14:00:00Z")
    _, now = data.slot(user["id"], title="Now", start_at="2026-12-03T10:00:00Z")
    body = client.get(EXPORT, {"from": "2026-12-01", "to": "2026-12-31"}, headers=auth(user["token"])).body
    assert uids(body) == [series, now]
    assert b"TZID:America/New_York" in body and b"DTSTART;TZID=America/New_York:20161129T090000" in body


def test_a_selected_slot_is_written_whole(client, data, user):
    slot_id, _ = data.slot(user["id"], title="Series", rrule="FREQ=DAILY;COUNT=400", alerts=[5, 10],
                           time_zone="Europe/Berlin", start_at="2020-01-01T08:00:00Z", end_at="2020-01-01T09:00:00Z")
    for day in (2, 3, 30):
        data.run("INSERT INTO slot_exdates (slot_id, occurrence_at) VALUES (?, ?)", (slot_id, f"2020-01-{day:02d}T08:00:00Z"))
    data.slot(user["id"], title="Outside", start_at="2020-01-01T10:00:00Z")
    whole = events(client.get(EXPORT, headers=auth(user["token"])).body)
    windowed = events(client.get(EXPORT, {"from": "2020-06-01", "to": "2020-06-02"}, headers=auth(user["token"])).body)
    assert windowed == [whole[0]]
    assert any(line.startswith("EXDATE;TZID=Europe/Berlin:20200102T090000,20200103T090000") for line in windowed[0])


def test_group_and_window_both_apply(client, data, user):
    group_id, group_uuid = data.group(user["id"])
    _, inside = data.slot(user["id"], start_at="2020-05-10T10:00:00Z", groups=[group_id])
    data.slot(user["id"], start_at="2020-05-10T10:00:00Z")                           # not in the group
    data.slot(user["id"], start_at="2021-05-10T10:00:00Z", groups=[group_id])         # not in the window
    body = client.post_json(EXPORT, {"group": group_uuid, "from": "2020-05-01", "to": "2020-06-01"},
                            headers=auth(user["token"])).body
    assert uids(body) == [inside]


def test_the_time_zones_are_those_of_the_selected_slots_from_their_earliest_start(client, data, user):
    data.slot(user["id"], time_zone="Asia/Tokyo", start_at="2015-01-01T10:00:00Z")        # outside: no VTIMEZONE
    data.slot(user["id"], time_zone="Europe/Berlin", start_at="2015-01-01T10:00:00Z")     # outside
    data.slot(user["id"], time_zone="Europe/Berlin", start_at="2020-05-10T10:00:00Z")
    data.slot(user["id"], time_zone="America/Sao_Paulo", rrule="FREQ=YEARLY", start_at="2010-05-10T10:00:00Z")
    body = client.get(EXPORT, {"from": "2020-05-01", "to": "2020-06-01"}, headers=auth(user["token"])).body.decode()
    assert [line[5:] for line in body.split("\r\n") if line.startswith("TZID:")] == ["America/Sao_Paulo",
                                                                                      "Europe/Berlin"]
    berlin = body.split("TZID:Europe/Berlin\r\n", 1)[1].split("END:VTIMEZONE", 1)[0]
    assert "DTSTART:2014" not in berlin and "DTSTART:2015" not in berlin          # from the slot of 2020 on
    sao_paulo = body.split("TZID:America/Sao_Paulo\r\n", 1)[1].split("END:VTIMEZONE", 1)[0]
    assert "DTSTART:20100221T000000" in sao_paulo                                  # the series runs from 2010


# --- the body against the query: a reference selection over mixed data --------------------------------------

def reference(slots, start, end):
    """Which of ``slots`` (dicts as inserted) a window selects, by the SPEC's rules, the slow way."""
    since = datetime.datetime.fromisoformat(start[:-1]) if start else datetime.datetime.min
    until = datetime.datetime.fromisoformat(end[:-1]) if end else datetime.datetime.max
    selected = []
    for slot in slots:
        first = datetime.datetime.fromisoformat(slot["start_at"][:-1])
        last = datetime.datetime.fromisoformat((slot.get("end_at") or slot["start_at"])[:-1])
        if slot.get("all_day"):
            last += datetime.timedelta(days=1)
        if slot.get("rrule"):
            if first >= until:
                continue
            if "UNTIL=" in slot["rrule"]:
                last_start = datetime.datetime.strptime(slot["rrule"].split("UNTIL=")[1][:16], "%Y%m%dT%H%M%SZ")
                if last_start + (last - first) < since or (last == first and last_start < since):
                    continue
            selected.append(slot["uuid"])
        elif (first < until and last > since) or (first == last and since <= first < until):
            selected.append(slot["uuid"])
    return selected


def test_windows_select_exactly_what_the_rules_say_over_a_mixed_history(client, data, user):
    import random
    chance = random.Random(7)
    slots = []
    data.run("BEGIN")
    for number in range(600):
        start = datetime.datetime(2020, 1, 1) + datetime.timedelta(minutes=chance.randrange(0, 525600 * 2))
        kind = chance.random()
        slot = {"uuid": f"00000000-0000-4000-8000-{number:012d}"}
        if kind < 0.15:
            slot.update(all_day=1, start_at=f"{start:%Y-%m-%d}T00:00:00Z",
                        end_at=f"{start + datetime.timedelta(days=chance.randrange(0, 20)):%Y-%m-%d}T00:00:00Z")
        else:
            slot["start_at"] = f"{start:%Y-%m-%dT%H:%M:00Z}"
            if kind > 0.3:
                length = chance.choice([0, 30, 60, 600, 1440 * 3, 1440 * 40, 1440 * 300, 1440 * 900])
                slot["end_at"] = f"{start + datetime.timedelta(minutes=length):%Y-%m-%dT%H:%M:00Z}"
            if kind > 0.9:
                until = start + datetime.timedelta(days=chance.randrange(1, 400))
                slot["rrule"] = chance.choice(["FREQ=WEEKLY", f"FREQ=DAILY;UNTIL={until:%Y%m%dT%H%M00Z}"])
        slots.append(slot)
        data.slot(user["id"], title=f"n{number}", **slot)
    data.run("COMMIT")
    order = {slot["uuid"]: (timeslot_export.utc_seconds(slot["start_at"].replace("-", "").replace(":", "")),
                            slot["uuid"]) for slot in slots}
    for _ in range(40):
        start = datetime.datetime(2019, 12, 1) + datetime.timedelta(hours=chance.randrange(0, 24 * 800))
        end = start + datetime.timedelta(hours=chance.choice([1, 24, 24 * 30, 24 * 365]))
        bounds = {"from": f"{start:%Y-%m-%dT%H:00:00Z}", "to": f"{end:%Y-%m-%dT%H:00:00Z}"}
        if chance.random() < 0.2:
            bounds.pop(chance.choice(["from", "to"]))
        got = uids(client.get(EXPORT, bounds, headers=auth(user["token"])).body)
        assert got == sorted(reference(slots, bounds.get("from"), bounds.get("to")), key=order.get), bounds


# --- an index search, kept by triggers ------------------------------------------------------------------------

def test_the_window_query_is_an_index_search(db_path):
    connection = sqlite3.connect(db_path)
    bounds = {**timeslot_export.Window("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z").search(), "user": 1,
              "group": 1}
    for sql in (timeslot_export.SQL_USER_WINDOW_SLOTS, timeslot_export.SQL_GROUP_WINDOW_SLOTS,
                timeslot_export.SQL_USER_WINDOW_ZONED):
        plan = " | ".join(row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + sql, bounds))
        assert "SCAN s" not in plan and "SCAN slots" not in plan and "SCAN slot_spans" not in plan, plan
        assert "slot_spans_start" in plan and "slot_spans_end" in plan, plan


def test_a_30_day_window_of_a_20_year_history_reads_about_the_slots_in_it(db_path, data, user):
    data.run("BEGIN")
    start = datetime.datetime(2006, 1, 1)
    for number in range(20 * 365 * 2):                       # two a day for twenty years
        at = start + datetime.timedelta(hours=12 * number)
        data.slot(user["id"], start_at=f"{at:%Y-%m-%dT%H:00:00Z}", end_at=f"{at:%Y-%m-%dT%H:45:00Z}")
    for number in range(40):                                 # weekly series, most of them long ended
        at = start + datetime.timedelta(days=180 * number)
        rule = "FREQ=WEEKLY" if number % 10 == 0 else f"FREQ=WEEKLY;UNTIL={at + datetime.timedelta(days=90):%Y%m%d}"
        data.slot(user["id"], start_at=f"{at:%Y-%m-%dT09:00:00Z}", end_at=f"{at:%Y-%m-%dT10:00:00Z}", rrule=rule)
    data.run("COMMIT")
    window = timeslot_export.Window("2025-11-01T00:00:00Z", "2025-12-01T00:00:00Z")
    database = timeslot_export.Database(str(db_path))
    session = database.session()
    try:
        found = sum(len(batch) for batch in session.slot_batches(user["id"], None, window))
    finally:
        session.close()
    selected = len(uids(make_client(db_path).get(EXPORT, {"from": window.start, "to": window.end},
                                                 headers=auth(user["token"])).body))
    assert selected == 60 + 4                                # 30 days of two a day, and the open-ended series
    assert found <= selected + 4                             # a day's slots before the window, at most


def test_spans_follow_every_write_by_triggers_alone(client, data, user):
    slot_id, slot_uuid = data.slot(user["id"], start_at="2020-05-10T10:00:00Z")
    in_may = {"from": "2020-05-01", "to": "2020-06-01"}
    assert uids(client.get(EXPORT, in_may, headers=auth(user["token"])).body) == [slot_uuid]
    data.run("UPDATE slots SET start_at = '2020-07-10T10:00:00Z' WHERE id = ?", (slot_id,))
    assert uids(client.get(EXPORT, in_may, headers=auth(user["token"])).body) == []
    data.run("UPDATE slots SET start_at = '2020-01-10T10:00:00Z', rrule = 'FREQ=WEEKLY' WHERE id = ?", (slot_id,))
    assert uids(client.get(EXPORT, in_may, headers=auth(user["token"])).body) == [slot_uuid]
    data.run("UPDATE slots SET rrule = 'FREQ=WEEKLY;UNTIL=20200301' WHERE id = ?", (slot_id,))
    assert uids(client.get(EXPORT, in_may, headers=auth(user["token"])).body) == []
    other_id, other_token = data.user("other")
    data.run("UPDATE slots SET rrule = '', start_at = '2020-05-10T10:00:00Z', creator_id = ? WHERE id = ?",
             (other_id, slot_id))
    assert uids(client.get(EXPORT, in_may, headers=auth(user["token"])).body) == []
    assert uids(client.get(EXPORT, in_may, headers=auth(other_token)).body) == [slot_uuid]
    data.run("DELETE FROM slots WHERE id = ?", (slot_id,))
    assert uids(client.get(EXPORT, in_may, headers=auth(other_token)).body) == []
    assert data.run("SELECT count(*) FROM slot_spans").fetchone()[0] == 0


# --- feeds: a window that moves with the UTC date -------------------------------------------------------------

def day(text):
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.timezone.utc).timestamp()


def test_a_feed_window_moves_at_midnight_utc_with_its_etag_and_last_modified(db_path, data, user):
    _, yesterday = data.slot(user["id"], title="Yesterday", start_at="2031-03-09T12:00:00Z")
    _, today = data.slot(user["id"], title="Today", start_at="2031-03-10T12:00:00Z")
    _, tomorrow = data.slot(user["id"], title="Tomorrow", start_at="2031-03-11T12:00:00Z")
    _, after = data.slot(user["id"], title="After", start_at="2031-03-12T12:00:00Z")
    _, secret = data.feed(user["id"], past_days=0, future_days=1)
    now = {"at": day("2031-03-10T23:59:59")}
    client = make_client(db_path, clock=lambda: now["at"])
    before = client.get(f"/v1/feeds/{secret}.ics")
    assert uids(before.body) == [today, tomorrow]                   # today and the day after, 00:00Z to 00:00Z
    assert before.headers["Last-Modified"] == "Mon, 10 Mar 2031 00:00:00 GMT"      # the window moved at 00:00Z
    now["at"] = day("2031-03-11T00:00:01")
    moved = client.get(f"/v1/feeds/{secret}.ics", headers={"If-Modified-Since": before.headers["Last-Modified"]})
    assert moved.status_int == 200 and uids(moved.body) == [tomorrow, after]
    assert moved.headers["ETag"] != before.headers["ETag"]
    assert moved.headers["Last-Modified"] == "Tue, 11 Mar 2031 00:00:00 GMT"
    client.get(f"/v1/feeds/{secret}.ics", headers={"If-None-Match": before.headers["ETag"]}, status=200)
    client.get(f"/v1/feeds/{secret}.ics", headers={"If-Modified-Since": moved.headers["Last-Modified"]}, status=304)
    assert yesterday not in uids(moved.body)


@pytest.mark.parametrize("past_days, future_days, shows", [
    (None, None, ["Yesterday", "Today", "Tomorrow", "After"]), (1, None, ["Yesterday", "Today", "Tomorrow", "After"]),
    (0, None, ["Today", "Tomorrow", "After"]), (None, 0, ["Yesterday", "Today"]), (0, 0, ["Today"]),
    (2, 2, ["Yesterday", "Today", "Tomorrow", "After"])])
def test_feed_windows_by_past_and_future_days(db_path, data, user, past_days, future_days, shows):
    for title, start in (("Yesterday", "2031-03-09T23:00:00Z"), ("Today", "2031-03-10T00:00:00Z"),
                         ("Tomorrow", "2031-03-11T00:00:00Z"), ("After", "2031-03-12T00:00:00Z")):
        data.slot(user["id"], title=title, start_at=start)
    _, secret = data.feed(user["id"], past_days=past_days, future_days=future_days)
    client = make_client(db_path, clock=lambda: day("2031-03-10T15:00:00"))
    body = client.get(f"/v1/feeds/{secret}.ics").body.decode()
    assert [line[8:] for line in body.split("\r\n") if line.startswith("SUMMARY:")] == shows


# --- the command line -----------------------------------------------------------------------------------------

def test_cli_export_window_is_the_apis(db_path, data, user):
    data.slot(user["id"], start_at="2020-01-01T10:00:00Z")
    data.slot(user["id"], start_at="2020-05-10T10:00:00Z", time_zone="Europe/Berlin")
    data.db.close()
    result = cli("export", "windowed", "--from", "2020-05-01", "--to", "2020-05-11T00:00:00Z", "--db", str(db_path))
    assert result.returncode == 0
    api = make_client(db_path).get(EXPORT, {"from": "2020-05-01", "to": "2020-05-11T00:00:00Z"},
                                   headers=auth(user["token"])).body
    assert result.stdout == api and len(events(api)) == 1


@pytest.mark.parametrize("arguments, message", [
    (["--from", "2020-02-30"], "--from must be a date"), (["--to", "soon"], "--to must be a date"),
    (["--from", "2020-05-02", "--to", "2020-05-01"], "--to must be later than --from")])
def test_cli_export_refuses_a_bad_window_in_one_line(db_path, data, user, arguments, message):
    data.db.close()
    assert message in one_line_error(cli("export", "windowed", *arguments, "--db", str(db_path)))
