"""SPEC §3 "Subscription feeds" and §5 `feed`: secret, revocable, read-only calendar URLs."""

import gzip
import logging
import re
import sqlite3
from urllib.parse import urlsplit

import pytest

import timeslot_export
from conftest import auth, events, make_client
from test_cli import cli, one_line_error

EXPORT = "/v1/export/ical"


def feed_path(secret):
    return f"/v1/feeds/{secret}.ics"


@pytest.fixture
def owner(data):
    """A user with a group (two slots, one with location, coordinates and alarms) and a slot outside it."""
    user_id, token = data.user("owner")
    group_id, group_uuid = data.group(user_id, name="Team")
    location = data.location(name="Secret place", city="Hidden city", latitude=1.5, longitude=2.5)
    data.slot(user_id, title="Secret title", description="Secret description", location_id=location,
              groups=[group_id], alerts=[10, 30], rrule="FREQ=WEEKLY", start_at="2019-01-01T10:00:00Z",
              end_at="2019-01-01T11:00:00Z", visibility="public")
    data.slot(user_id, title="Second", groups=[group_id], start_at="2019-01-02T10:00:00Z")
    data.slot(user_id, title="Outside the group", start_at="2019-01-03T10:00:00Z")
    return {"id": user_id, "token": token, "group_id": group_id, "group": group_uuid}


def test_feed_shows_the_export_plus_refresh_properties(client, data, owner):
    _, secret = data.feed(owner["id"])
    response = client.get(feed_path(secret))
    assert response.headers["Content-Type"] == "text/calendar; charset=utf-8"
    export = client.post(EXPORT, headers=auth(owner["token"])).body
    assert events(response.body) == events(export)
    assert b"X-WR-CALNAME:Timeslot\r\nREFRESH-INTERVAL;VALUE=DURATION:PT60M\r\nX-PUBLISHED-TTL:PT60M\r\n" in response.body
    assert response.body.replace(b"REFRESH-INTERVAL;VALUE=DURATION:PT60M\r\nX-PUBLISHED-TTL:PT60M\r\n", b"") == export


def test_group_feed_shows_the_group_export(client, data, owner):
    _, secret = data.feed(owner["id"], group_id=owner["group_id"])
    response = client.get(feed_path(secret))
    export = client.post_json(EXPORT, {"group": owner["group"]}, headers=auth(owner["token"])).body
    assert events(response.body) == events(export) and len(events(export)) == 2
    assert b"NAME:Team\r\nX-WR-CALNAME:Team\r\nREFRESH-INTERVAL" in response.body


def test_refresh_interval_is_configurable(db_path, data, owner):
    _, secret = data.feed(owner["id"])
    body = make_client(db_path, refresh_minutes=15).get(feed_path(secret)).body
    assert b"REFRESH-INTERVAL;VALUE=DURATION:PT15M\r\nX-PUBLISHED-TTL:PT15M\r\n" in body


@pytest.mark.parametrize("value", ["0", "10081", "abc", "", "1.5", "-5", " ", "60m"])
def test_invalid_refresh_minutes_stop_start_up(value):
    with pytest.raises(timeslot_export.ConfigError, match="TIMESLOT_REFRESH_MINUTES must be a whole number from 1 to 10080"):
        timeslot_export.Config.from_environ({"TIMESLOT_REFRESH_MINUTES": value})


@pytest.mark.parametrize("value", ["1", "10080", " 30 "])
def test_valid_refresh_minutes(value):
    assert timeslot_export.Config.from_environ({"TIMESLOT_REFRESH_MINUTES": value}).refresh_minutes == int(value)


def test_busy_feed_shows_nothing_personal(client, data, owner):
    _, secret = data.feed(owner["id"], details="busy")
    body = client.get(feed_path(secret)).body
    for secret_text in (b"Secret", b"Hidden", b"Second", b"Outside", b"GEO", b"LOCATION", b"VALARM", b"DESCRIPTION",
                        b"CLASS:PUBLIC"):
        assert secret_text not in body
    found = events(body)
    assert len(found) == 3
    assert all("SUMMARY:Busy" in event and "CLASS:PRIVATE" in event for event in found)
    assert "DTSTART:20190101T100000Z" in found[0] and "DTEND:20190101T110000Z" in found[0]
    assert "RRULE:FREQ=WEEKLY" in found[0]


def test_feed_without_alarms_has_no_valarm_but_the_rest(client, data, owner):
    _, secret = data.feed(owner["id"], alarms=0)
    body = client.get(feed_path(secret)).body
    assert b"VALARM" not in body and b"TRIGGER" not in body
    assert b"SUMMARY:Secret title" in body and b"LOCATION:Secret place" in body and b"GEO:1.5;2.5" in body


@pytest.mark.parametrize("mangle", [str.upper, str.lower, lambda s: s + "/", lambda s: s[:-1], lambda s: s + "x",
                                    lambda s: s.swapcase()])
def test_a_different_secret_is_404(client, data, owner, mangle):
    _, secret = data.feed(owner["id"])
    path = feed_path(mangle(secret)) if not mangle(secret).endswith("/") else feed_path(secret) + "/"
    response = client.get(path, status=404)
    assert response.json["error"] in ("feed not found", "not found")


@pytest.mark.parametrize("path", ["/v1/feeds/.ics", "/v1/feeds/a.ics", "/v1/feeds/%00.ics", "/v1/feeds/x%2Fy.ics",
                                  "/v1/feeds/" + "a" * 300 + ".ics", "/v1/feeds/abc.ics.ics"])
def test_malformed_secrets_are_404(client, path):
    assert client.get(path, status=404).json == {"error": "feed not found"}


def test_deleted_user_is_404(client, data, owner):
    _, secret = data.feed(owner["id"])
    data.run("UPDATE users SET deleted_at = '2020-01-01T00:00:00Z' WHERE id = ?", (owner["id"],))
    assert client.get(feed_path(secret), status=404).json == {"error": "feed not found"}


def test_revoked_feed_is_410_at_once_whatever_else_changed(client, data, owner):
    feed_id, secret = data.feed(owner["id"], group_id=owner["group_id"])
    client.get(feed_path(secret), status=200)
    data.run("UPDATE feeds SET revoked_at = '2020-01-01T00:00:00Z' WHERE id = ?", (feed_id,))
    assert client.get(feed_path(secret), status=410).json == {"error": "feed revoked"}
    data.run("UPDATE users SET deleted_at = '2020-01-01T00:00:00Z' WHERE id = ?", (owner["id"],))
    data.run("UPDATE slot_groups SET deleted_at = '2020-01-01T00:00:00Z'")
    client.get(feed_path(secret), status=410)
    client.head(feed_path(secret), status=410)


def test_feed_of_a_deleted_group_is_404(client, data, owner):
    _, secret = data.feed(owner["id"], group_id=owner["group_id"])
    data.run("UPDATE slot_groups SET deleted_at = '2020-01-01T00:00:00Z'")
    client.get(feed_path(secret), status=404)


def test_feed_of_a_group_whose_membership_ended_is_404(client, data, owner):
    member_id, _ = data.user("member")
    data.member(owner["group_id"], member_id)
    data.slot(member_id, title="Member's", groups=[owner["group_id"]])
    _, secret = data.feed(member_id, group_id=owner["group_id"])
    assert [e for e in events(client.get(feed_path(secret)).body) if "SUMMARY:Member's" in e]
    data.run("UPDATE memberships SET deleted_at = '2020-01-01T00:00:00Z' WHERE user_id = ?", (member_id,))
    client.get(feed_path(secret), status=404)


def test_authorization_header_changes_nothing(client, data, owner):
    other_id, other_token = data.user("other")
    data.slot(other_id, title="Other's")
    _, secret = data.feed(owner["id"])
    plain = client.get(feed_path(secret)).body
    assert client.get(feed_path(secret), headers=auth(other_token)).body == plain
    assert client.get(feed_path(secret), headers={"Authorization": "Token token=garbage"}).body == plain


def test_query_string_is_ignored(client, data, owner):
    _, secret = data.feed(owner["id"])
    plain = client.get(feed_path(secret)).body
    assert client.get(feed_path(secret) + f"?group={owner['group']}&x=%ff&group=1").body == plain


def test_feed_methods(client, data, owner):
    _, secret = data.feed(owner["id"])
    head = client.head(feed_path(secret))
    assert head.body == b"" and head.headers["Content-Type"] == "text/calendar; charset=utf-8"
    response = client.post(feed_path(secret), status=405)
    assert response.headers["Allow"] == "GET, HEAD"


def test_feed_etag_304_and_gzip(client, data, owner, db_path):
    feed_id, secret = data.feed(owner["id"])
    etag = client.get(feed_path(secret)).headers["ETag"]
    client.get(feed_path(secret), headers={"If-None-Match": etag}, status=304)
    data.run("UPDATE slots SET title = 'changed' WHERE creator_id = ? AND title = 'Second'", (owner["id"],))
    assert client.get(feed_path(secret), headers={"If-None-Match": etag}, status=200).headers["ETag"] != etag
    busy_id, busy_secret = data.feed(owner["id"], details="busy")
    assert client.get(feed_path(busy_secret)).headers["ETag"] != client.get(feed_path(secret)).headers["ETag"]
    from test_http import raw   # WebTest would un-gzip the body
    headers, body = raw(db_path, "unused", PATH_INFO=feed_path(secret), HTTP_ACCEPT_ENCODING="gzip")
    assert headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(body) == client.get(feed_path(secret)).body


def test_secret_never_reaches_the_log(client, data, owner, caplog):
    caplog.set_level(logging.DEBUG, logger="timeslot_export")
    feed_id, secret = data.feed(owner["id"])
    client.get(feed_path(secret))
    client.get(feed_path(secret) + "/", status=404)
    client.get(feed_path(secret.upper()), status=404)
    client.get("/v1/feeds/" + secret, status=200)                   # the subscribe page
    data.run("UPDATE feeds SET revoked_at = '2020-01-01T00:00:00Z' WHERE id = ?", (feed_id,))
    client.get(feed_path(secret), status=410)
    client.get("/v1/feeds/" + secret, status=410)
    assert len(caplog.records) >= 6
    assert secret not in caplog.text and secret.upper() not in caplog.text and secret[:20] not in caplog.text
    assert caplog.text.count("/v1/feeds/[secret].ics") >= 3
    assert caplog.text.count("GET /v1/feeds/[secret] ") == 2


# --- the command line -----------------------------------------------------------------------------------------

def created_secret(output):
    lines = output.decode().splitlines()
    assert len(lines) == 4 and lines[3].startswith("Subscribe page: ")
    https, webcal, page = lines[1], lines[2], lines[3].split(": ", 1)[1]
    assert urlsplit(https).path == urlsplit(webcal).path and webcal.startswith("webcal://")
    assert page + ".ics" == https
    return https, webcal, re.search(r"/v1/feeds/([A-Za-z0-9_-]+)\.ics$", urlsplit(https).path).group(1)


def test_cli_feed_round_trip(db_path, data, owner):
    data.db.close()
    result = cli("feed", "create", "owner", "--label", "Phone", "--db", str(db_path))
    assert result.returncode == 0
    https, webcal, secret = created_secret(result.stdout)
    assert https.startswith("http://127.0.0.1:8000/v1/feeds/") and webcal.startswith("webcal://127.0.0.1:8000/v1/")
    assert len(secret) == 43
    client = make_client(db_path)
    feed = client.get(urlsplit(https).path).body
    assert events(feed) == events(client.post(EXPORT, headers=auth(owner["token"])).body)
    stored = sqlite3.connect(db_path).execute("SELECT token_digest, label FROM feeds").fetchall()
    assert stored and all(secret not in str(row) for row in stored)
    listing = cli("feed", "list", "owner", "--db", str(db_path))
    assert listing.returncode == 0 and secret not in listing.stdout.decode()
    assert "Phone" in listing.stdout.decode() and "full" in listing.stdout.decode()
    feed_id = listing.stdout.decode().splitlines()[1].split("\t")[0]
    assert cli("feed", "revoke", feed_id, "--db", str(db_path)).returncode == 0
    client.get(urlsplit(https).path, status=410)
    revoked = cli("feed", "list", "owner", "--db", str(db_path)).stdout.decode().splitlines()[1].split("\t")[6]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", revoked)


def test_cli_busy_group_feed_with_base_url(db_path, data, owner):
    data.db.close()
    result = cli("feed", "create", "owner", "--group", owner["group"].upper(), "--busy", "--no-alarms",
                 "--base-url", "https://cal.example.org/timeslot/", "--db", str(db_path))
    assert result.returncode == 0
    https, webcal, secret = created_secret(result.stdout)
    assert https == f"https://cal.example.org/timeslot/v1/feeds/{secret}.ics"
    assert webcal == f"webcal://cal.example.org/timeslot/v1/feeds/{secret}.ics"
    body = make_client(db_path).get(feed_path(secret)).body
    assert len(events(body)) == 2 and b"Secret" not in body and b"NAME:Team" in body
    row = cli("feed", "list", "owner", "--db", str(db_path)).stdout.decode().splitlines()[1].split("\t")
    assert row[2] == owner["group"] and row[3] == "busy, no alarms"


def test_cli_refuses_a_group_the_user_cannot_see(db_path, data, owner):
    stranger_id, _ = data.user("stranger")
    data.db.close()
    message = one_line_error(cli("feed", "create", "stranger", "--group", owner["group"], "--db", str(db_path)))
    assert "group not found" in message
    assert sqlite3.connect(db_path).execute("SELECT count(*) FROM feeds").fetchone()[0] == 0


@pytest.mark.parametrize("arguments, message", [
    (["feed", "create", "nobody"], "no such user: nobody"),
    (["feed", "list", "nobody"], "no such user: nobody"),
    (["feed", "revoke", "999"], "no feed with id 999"),
    (["feed", "create", "owner", "--base-url", "ftp://x"], "--base-url must be"),
    (["feed", "create", "owner", "--group", "not-a-uuid"], "group not found"),
])
def test_cli_feed_errors_are_one_line(db_path, data, owner, arguments, message):
    data.db.close()
    assert message in one_line_error(cli(*arguments, "--db", str(db_path)))


def test_cli_revoking_twice_says_so(db_path, data, owner):
    feed_id, _ = data.feed(owner["id"])
    data.db.close()
    assert cli("feed", "revoke", str(feed_id), "--db", str(db_path)).returncode == 0
    again = cli("feed", "revoke", str(feed_id), "--db", str(db_path))
    assert again.returncode == 0 and b"already revoked" in again.stdout


def test_cli_feed_window_is_stored_and_listed(db_path, data, owner):
    data.db.close()
    result = cli("feed", "create", "owner", "--past-days", "30", "--future-days", "365", "--db", str(db_path))
    assert result.returncode == 0
    _, _, secret = created_secret(result.stdout)
    listing = cli("feed", "list", "owner", "--db", str(db_path)).stdout.decode().splitlines()
    assert listing[0].split("\t") == ["id", "label", "group", "kind", "window", "created", "revoked"]
    assert listing[1].split("\t")[4] == "from 30 days ago to 365 days ahead"
    assert sqlite3.connect(db_path).execute("SELECT past_days, future_days FROM feeds").fetchone() == (30, 365)
    assert make_client(db_path).get(feed_path(secret)).status_int == 200
    cli("feed", "create", "owner", "--db", str(db_path))
    assert cli("feed", "list", "owner", "--db", str(db_path)).stdout.decode().splitlines()[2].split("\t")[4] == \
        "every date"


@pytest.mark.parametrize("arguments, message", [
    (["--past-days", "-1"], "--past-days must be a whole number from 0 to 36600"),
    (["--future-days", "36601"], "--future-days must be a whole number from 0 to 36600"),
    (["--label", "two\nlines"], "--label must be a string of at most 200 characters"),
    (["--label", "x" * 201], "--label must be a string of at most 200 characters"),
])
def test_cli_feed_create_refuses_what_the_api_refuses(db_path, data, owner, arguments, message):
    data.db.close()
    assert message in one_line_error(cli("feed", "create", "owner", *arguments, "--db", str(db_path)))
    assert sqlite3.connect(db_path).execute("SELECT count(*) FROM feeds").fetchone()[0] == 0


def test_demo_prints_a_working_feed_and_its_page_and_a_rerun_replaces_them(tmp_path):
    path = str(tmp_path / "demo.sqlite3")
    pages = []
    for _ in range(2):
        output = cli("demo", "--db", path)
        assert output.returncode == 0
        lines = output.stdout.decode().splitlines()
        feed = next(line.split(": ", 1)[1] for line in lines if line.startswith("Feed URL: "))
        page = next(line.split(": ", 1)[1] for line in lines if line.startswith("Subscribe page: "))
        assert feed == page + ".ics" and feed.startswith("http://127.0.0.1:8000/v1/feeds/")
        pages.append(urlsplit(page).path)
    client = make_client(path)
    client.get(pages[0], status=410)
    client.get(pages[0] + ".ics", status=410)
    assert b"Subscribe in your calendar app" in client.get(pages[1]).body
    assert client.get(pages[1] + ".ics").body.count(b"BEGIN:VEVENT") == 6
    active = sqlite3.connect(path).execute("SELECT count(*) FROM feeds WHERE revoked_at IS NULL").fetchone()[0]
    assert active == 1
