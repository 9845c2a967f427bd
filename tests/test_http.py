"""SPEC §3 success path at scale: streaming, snapshots, ETag and 304, HEAD, gzip, CORS."""

import gzip
import sqlite3
import zlib

import pytest

import timeslot_export
from conftest import auth, make_client, wsgi_call

EXPORT = "/v1/export/ical"


@pytest.fixture
def busy_user(data):
    """A user with 2,000 slots with long descriptions: a body of about 1.5 MB."""
    user_id, token = data.user("busy")
    data.run("BEGIN")
    for n in range(2000):
        data.slot(user_id, title=f"Slot {n}", description="Lorem ipsum, dolor; sit amet. " * 20,
                  start_at=f"2020-01-01T{n // 3600 % 24:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z", alerts=[15])
    data.run("COMMIT")
    return user_id, token


# --- streaming ----------------------------------------------------------------------------------------------

def test_large_export_streams_as_many_chunks_without_content_length(db_path, busy_user):
    app = timeslot_export.make_app(str(db_path))
    status, headers, body = wsgi_call(app, HTTP_AUTHORIZATION=f"Token token={busy_user[1]}")
    try:
        chunks = list(body)
    finally:
        body.close()
    assert status == "200 OK"
    assert "Content-Length" not in headers
    assert len(chunks) > 20 and max(map(len, chunks)) < 256 * 1024
    joined = b"".join(chunks)
    assert joined.startswith(b"BEGIN:VCALENDAR\r\n") and joined.endswith(b"END:VCALENDAR\r\n")
    assert joined.count(b"BEGIN:VEVENT") == 2000


def test_small_export_is_sent_whole_with_content_length(client, data):
    user_id, token = data.user()
    data.slot(user_id)
    response = client.get(EXPORT, headers=auth(token))
    assert int(response.headers["Content-Length"]) == len(response.body)


def test_client_going_away_mid_body_releases_cursor_and_connection(db_path, busy_user):
    app = timeslot_export.make_app(str(db_path))
    status, _, body = wsgi_call(app, HTTP_AUTHORIZATION=f"Token token={busy_user[1]}")
    iterator = iter(body)
    next(iterator)
    next(iterator)
    body.close()                                   # what a server does when the client disconnects
    connection = app.database._idle.connection[0]  # checked back in for this thread's next request
    assert not connection.in_transaction
    writer = sqlite3.connect(db_path, timeout=0)   # no reader holds a snapshot open any more
    writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0
    writer.close()


def test_export_reads_one_snapshot_while_another_process_writes(db_path, busy_user, data):
    user_id, token = busy_user
    app = timeslot_export.make_app(str(db_path))
    status, headers, body = wsgi_call(app, HTTP_AUTHORIZATION=f"Token token={token}")
    iterator = iter(body)
    first = next(iterator)
    data.slot(user_id, title="Written meanwhile", start_at="2030-01-01T00:00:00Z")
    data.run("UPDATE slots SET title = 'Renamed meanwhile' WHERE creator_id = ?", (user_id,))
    data.run("DELETE FROM slot_alerts")
    try:
        rest = b"".join(iterator)
    finally:
        body.close()
    whole = first + rest
    assert whole.count(b"BEGIN:VEVENT") == 2000 and whole.count(b"TRIGGER:-PT15M") == 2000
    assert b"meanwhile" not in whole
    after = make_client(db_path).get(EXPORT, headers=auth(token)).body
    assert after.count(b"BEGIN:VEVENT") == 2001 and b"Renamed meanwhile" in after and b"TRIGGER" not in after


# --- ETag and conditional requests ---------------------------------------------------------------------------

def test_etag_is_stable_and_changes_exactly_with_the_users_data(client, data):
    user_id, token = data.user()
    other_id, _ = data.user()
    slot_id, _ = data.slot(user_id)
    first = client.get(EXPORT, headers=auth(token)).headers["ETag"]
    assert client.get(EXPORT, headers=auth(token)).headers["ETag"] == first
    other_slot, _ = data.slot(other_id)
    data.run("UPDATE slots SET title = 'changed' WHERE id = ?", (other_slot,))
    assert client.get(EXPORT, headers=auth(token)).headers["ETag"] == first, "other users' writes do not count"
    data.run("UPDATE slots SET title = 'changed' WHERE id = ?", (slot_id,))
    second = client.get(EXPORT, headers=auth(token)).headers["ETag"]
    assert second != first
    data.run("INSERT INTO slot_alerts (slot_id, minutes_before) VALUES (?, 3)", (slot_id,))
    assert client.get(EXPORT, headers=auth(token)).headers["ETag"] not in (first, second)


def test_etag_differs_between_all_slots_and_a_group(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id)
    data.slot(user_id, groups=[group_id])
    all_slots = client.get(EXPORT, headers=auth(token))
    group = client.get(f"{EXPORT}?group={group_uuid}", headers=auth(token))
    assert all_slots.body != group.body    # the calendar's NAME differs
    assert all_slots.headers["ETag"] != group.headers["ETag"]


def test_etag_changes_when_the_group_is_renamed(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id, name="Before")
    url = f"{EXPORT}?group={group_uuid}"
    before = client.get(url, headers=auth(token)).headers["ETag"]
    data.run("UPDATE slot_groups SET name = 'After' WHERE id = ?", (group_id,))
    after = client.get(url, headers=auth(token))
    assert after.headers["ETag"] != before and b"NAME:After" in after.body


@pytest.mark.parametrize("if_none_match", ["{etag}", "{strong}", 'W/"nope", {etag}', "*", ' {etag} , W/"x"'])
def test_matching_if_none_match_on_get_is_304(client, data, if_none_match):
    user_id, token = data.user()
    data.slot(user_id)
    etag = client.get(EXPORT, headers=auth(token)).headers["ETag"]
    header = if_none_match.format(etag=etag, strong=etag[2:])
    response = client.get(EXPORT, headers={**auth(token), "If-None-Match": header}, status=304)
    assert response.body == b""
    assert response.headers["ETag"] == etag and "Content-Type" not in response.headers
    assert response.headers["Cache-Control"] == "private" and "Vary" in response.headers


def test_matching_if_none_match_on_head_is_304(client, data):
    user_id, token = data.user()
    etag = client.get(EXPORT, headers=auth(token)).headers["ETag"]
    client.head(EXPORT, headers={**auth(token), "If-None-Match": etag}, status=304)


def test_stale_if_none_match_gets_the_body(client, data):
    user_id, token = data.user()
    slot_id, _ = data.slot(user_id)
    etag = client.get(EXPORT, headers=auth(token)).headers["ETag"]
    data.run("UPDATE slots SET title = 'new' WHERE id = ?", (slot_id,))
    response = client.get(EXPORT, headers={**auth(token), "If-None-Match": etag}, status=200)
    assert b"SUMMARY:new" in response.body


def test_post_always_answers_with_the_body(client, data):
    user_id, token = data.user()
    data.slot(user_id)
    etag = client.post(EXPORT, headers=auth(token)).headers["ETag"]
    response = client.post(EXPORT, headers={**auth(token), "If-None-Match": etag}, status=200)
    assert b"BEGIN:VEVENT" in response.body


def test_304_does_not_produce_the_body(client, data, monkeypatch):
    user_id, token = data.user()
    data.slot(user_id)
    etag = client.get(EXPORT, headers=auth(token)).headers["ETag"]

    def must_not_run(*arguments):
        raise AssertionError("the body was produced for a 304")
    monkeypatch.setattr(timeslot_export, "write_calendar", must_not_run)
    client.get(EXPORT, headers={**auth(token), "If-None-Match": etag}, status=304)


def test_authentication_comes_before_304(client, data):
    user_id, token = data.user()
    etag = client.get(EXPORT, headers=auth(token)).headers["ETag"]
    client.get(EXPORT, headers={"If-None-Match": etag}, status=401)
    client.get(EXPORT, headers={"If-None-Match": "*"}, status=401)


def test_head_answers_the_headers_of_get_without_a_body(client, data):
    user_id, token = data.user()
    data.slot(user_id, title="Head")
    get = client.get(EXPORT, headers=auth(token))
    head = client.head(EXPORT, headers=auth(token))
    assert head.body == b""
    for name in ("Content-Type", "Content-Length", "ETag", "Content-Disposition", "Cache-Control", "Vary"):
        assert head.headers[name] == get.headers[name], name
    assert int(head.headers["Content-Length"]) == len(get.body)


def test_head_of_a_large_export_releases_its_connection(db_path, busy_user):
    app = timeslot_export.make_app(str(db_path))
    status, headers, body = wsgi_call(app, REQUEST_METHOD="HEAD", HTTP_AUTHORIZATION=f"Token token={busy_user[1]}")
    assert status == "200 OK" and b"".join(body) == b""
    body.close()
    connection = app.database._idle.connection[0]
    assert not connection.in_transaction


# --- compression --------------------------------------------------------------------------------------------

def raw(db_path, token, **environ):
    """(headers, body bytes) as the server sends them: WebTest would un-gzip the body on the way."""
    status, headers, body = wsgi_call(timeslot_export.make_app(str(db_path)), HTTP_AUTHORIZATION=f"Token token={token}",
                                  **environ)
    try:
        return headers, b"".join(body)
    finally:
        body.close()


@pytest.mark.parametrize("accept_encoding", ["gzip", "gzip, deflate, br", "br;q=1, gzip;q=0.5", "GZIP"])
def test_gzip_round_trip_equals_the_plain_body(db_path, data, accept_encoding):
    user_id, token = data.user()
    data.slot(user_id, title="Zipped \u00e9", description="x" * 3000)
    plain_headers, plain = raw(db_path, token)
    headers, zipped = raw(db_path, token, HTTP_ACCEPT_ENCODING=accept_encoding)
    assert headers["Content-Encoding"] == "gzip"
    assert int(headers["Content-Length"]) == len(zipped) < len(plain)
    assert gzip.decompress(zipped) == plain
    assert "Accept-Encoding" in headers["Vary"] and headers["ETag"] == plain_headers["ETag"]


@pytest.mark.parametrize("accept_encoding", ["", "identity", "gzip;q=0", "deflate", "br", "x-gzipped"])
def test_no_gzip_unless_asked_for(db_path, data, accept_encoding):
    user_id, token = data.user()
    data.slot(user_id)
    headers, body = raw(db_path, token, HTTP_ACCEPT_ENCODING=accept_encoding)
    assert "Content-Encoding" not in headers
    assert body.startswith(b"BEGIN:VCALENDAR")


def test_large_gzip_export_streams_and_round_trips(db_path, busy_user):
    app = timeslot_export.make_app(str(db_path))
    _, plain_headers, plain_body = wsgi_call(app, HTTP_AUTHORIZATION=f"Token token={busy_user[1]}")
    plain = b"".join(plain_body)
    plain_body.close()
    status, headers, body = wsgi_call(app, HTTP_AUTHORIZATION=f"Token token={busy_user[1]}", HTTP_ACCEPT_ENCODING="gzip")
    chunks = list(body)
    body.close()
    assert headers["Content-Encoding"] == "gzip" and "Content-Length" not in headers
    assert len(chunks) > 1
    assert zlib.decompress(b"".join(chunks), 31) == plain


def test_gzip_body_is_deterministic(db_path, data):
    user_id, token = data.user()
    data.slot(user_id)
    first = raw(db_path, token, HTTP_ACCEPT_ENCODING="gzip")[1]
    assert raw(db_path, token, HTTP_ACCEPT_ENCODING="gzip")[1] == first and first[:2] == b"\x1f\x8b"


# --- CORS ---------------------------------------------------------------------------------------------------

ORIGIN = "https://app.example.org"


@pytest.fixture
def cors_client(db_path):
    return make_client(db_path, cors_origins=(ORIGIN, "http://localhost:3000"))


def test_allowed_origin_gets_cors_headers(cors_client, data):
    user_id, token = data.user()
    response = cors_client.get(EXPORT, headers={**auth(token), "Origin": ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Expose-Headers"] == "Content-Disposition, ETag, X-Request-Id"
    assert "Origin" in response.headers["Vary"]


def test_allowed_origin_can_read_errors_too(cors_client):
    response = cors_client.get(EXPORT, headers={"Origin": ORIGIN}, status=401)
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN


@pytest.mark.parametrize("origin", ["https://evil.example.org", "https://app.example.org.evil.com", "null",
                                    "https://APP.example.org", ""])
def test_other_origins_get_no_cors_headers(cors_client, data, origin):
    user_id, token = data.user()
    response = cors_client.get(EXPORT, headers={**auth(token), "Origin": origin})
    assert not [name for name in response.headers if name.startswith("Access-Control-")]


def test_no_origins_configured_means_no_cors_headers(client, data):
    user_id, token = data.user()
    response = client.get(EXPORT, headers={**auth(token), "Origin": ORIGIN})
    assert not [name for name in response.headers if name.startswith("Access-Control-")]


def test_preflight_from_an_allowed_origin(cors_client):
    response = cors_client.options(EXPORT, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                    "Access-Control-Request-Headers": "authorization, content-type"},
                                   status=204)
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Allow-Methods"] == "GET, HEAD, POST, OPTIONS"
    # a page may revalidate (If-None-Match) and send its own request id, which the service echoes and logs
    assert response.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type, If-None-Match, X-Request-Id"
    assert "Content-Type" not in response.headers and response.body == b""


def test_preflight_from_another_origin_gets_no_cors_headers(cors_client):
    response = cors_client.options(EXPORT, headers={"Origin": "https://evil.example.org",
                                                    "Access-Control-Request-Method": "POST"}, status=204)
    assert not [name for name in response.headers if name.startswith("Access-Control-")]


@pytest.mark.parametrize("value", ["https://ok.example", "https://a.example, http://b.example:8080", ""])
def test_cors_origins_come_from_the_environment(value):
    config = timeslot_export.Config.from_environ({"TIMESLOT_CORS_ORIGINS": value})
    assert config.cors_origins == tuple(o.strip() for o in value.split(",") if o.strip())


@pytest.mark.parametrize("value", ["*", "example.org", "https://a.example/path", "ftp://a.example"])
def test_invalid_cors_origins_stop_start_up(value):
    with pytest.raises(timeslot_export.ConfigError, match="CORS origin"):
        timeslot_export.Config.from_environ({"TIMESLOT_CORS_ORIGINS": value})
