"""SPEC §3: routing, authentication, parameters, slot selection, headers and error statuses."""

import json
import logging
import random
import re

import pytest

import timeslot_export
from conftest import auth, events, make_client, uids, wsgi_call

EXPORT = "/v1/export/ical"
SECURITY = {"X-Frame-Options": "SAMEORIGIN", "X-Content-Type-Options": "nosniff",
            "X-XSS-Protection": "1; mode=block"}


@pytest.fixture
def alice(data):
    """A user with two slots, one in a group, plus another user's slot that must never show."""
    user_id, token = data.user("alice")
    group_id, group_uuid = data.group(user_id, name="Work")
    _, in_group = data.slot(user_id, title="In group", start_at="2019-09-21T10:00:00Z", groups=[group_id])
    _, ungrouped = data.slot(user_id, title="Alone", start_at="2019-09-20T10:00:00Z")
    other_id, _ = data.user("bob")
    data.slot(other_id, title="Bob's", groups=[group_id])
    return {"id": user_id, "token": token, "group": group_uuid, "group_id": group_id,
            "in_group": in_group, "ungrouped": ungrouped}


def call(db_path, validate=True, **environ):
    """A POST to the export with a hand-made environ; returns (status, headers, body bytes)."""
    status, headers, result = wsgi_call(timeslot_export.make_app(str(db_path)), validate, REQUEST_METHOD="POST",
                                        **environ)
    try:
        return status, headers, b"".join(result)
    finally:
        result.close()


# --- routing -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/", "/v1/export", "/v1/export/ical/", "/v1/export/ics", "/V1/EXPORT/ICAL",
                                  "/v1/export/ical/../ical"])
def test_unknown_path_is_404_json(client, path):
    response = client.get(path, status=404)
    assert response.json == {"error": "not found"}
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"


@pytest.mark.filterwarnings("ignore:Unknown REQUEST_METHOD")   # 'get' is meant to be unknown: methods are case-sensitive
@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "TRACE", "get"])
def test_other_methods_are_405_with_allow(client, alice, method):
    response = client.request(EXPORT, method=method, headers=auth(alice["token"]), status=405)
    assert response.headers["Allow"] == "GET, HEAD, POST, OPTIONS"
    assert "error" in response.json


def test_path_is_checked_before_method(client):
    assert client.request("/nowhere", method="DELETE", status=404).json == {"error": "not found"}


def test_options_answers_204_with_allow_and_no_content_type(client):
    response = client.options(EXPORT, status=204)
    assert response.headers["Allow"] == "GET, HEAD, POST, OPTIONS"
    assert "Content-Type" not in response.headers
    assert response.body == b""


# --- authentication ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("template", ["Token token={}", 'Token token="{}"', "Bearer {}", "token token={}",
                                      "TOKEN token={}", "bearer {}", "BEARER {}", "  Token   token = {}  "])
def test_accepted_authorization_forms(client, alice, template):
    response = client.post(EXPORT, headers={"Authorization": template.format(alice["token"])})
    assert response.status_int == 200
    assert set(uids(response.body)) == {alice["in_group"], alice["ungrouped"]}


@pytest.mark.parametrize("header", [None, "", "Token", "Token token=", 'Token token=""', "Token wrong=x",
                                    "Basic dXNlcjpwYXNz", "Bearer", "Token token=nope", "Bearer token-alice x",
                                    "Token token=token-alic", "Token token=TOKEN-ALICE"])
def test_rejected_authorization_is_401(client, alice, header):
    headers = {} if header is None else {"Authorization": header}
    response = client.post(EXPORT, headers=headers, status=401)
    assert response.json == {"error": "auth_token invalid or missing"}
    assert response.headers["WWW-Authenticate"] == 'Token realm="Application"'
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"


def test_the_seed_form_is_read_without_the_regex_exactly_as_the_regex_reads_it():
    """_token_in tells "Token token=<token>" by string tests; every header must get the token the pattern
    gives (or none), whatever whitespace, quotes, commas and control characters it holds."""
    def by_pattern(header):
        match = timeslot_export._AUTHORIZATION.fullmatch(header)
        return None if match is None else match.group(1) or match.group(2) or match.group(3)
    pieces = ["Token token=", "token token=", "Bearer ", "a", "Z", "0", " ", "\t", '"', ",", "=", "\x00", "\xa0",
              "\u2028", "\x85", "\x1c", "\x0b", "\xe9", "-", "_", "\x7f"]
    generator = random.Random(5)
    for _ in range(50_000):
        header = "".join(generator.choice(pieces) for _ in range(generator.randint(0, 6)))
        if generator.random() < 0.7:
            header = "Token token=" + header
        assert timeslot_export._token_in(header) == by_pattern(header), repr(header)


def test_paths_without_parameters_are_routed_by_lookup_as_the_patterns_route_them():
    assert set(timeslot_export.LITERAL_PATHS) == {"/v1/export/ical", "/v1/feeds"}
    for path, found in timeslot_export.LITERAL_PATHS.items():
        assert found == timeslot_export._methods_of(path)
        assert timeslot_export.route("GET", path)[0] is found[0]["GET"]


def test_deleted_user_is_401(client, data):
    _, token = data.user("gone", deleted_at="2020-01-01T00:00:00Z")
    client.post(EXPORT, headers=auth(token), status=401)


def test_user_without_token_digest_cannot_log_in_with_an_empty_token(client, data):
    data.user("no-api", token="")
    client.post(EXPORT, headers={"Authorization": 'Token token=""'}, status=401)


def test_token_never_reaches_the_log(client, alice, caplog):
    caplog.set_level(logging.DEBUG, logger="timeslot_export")
    client.post(EXPORT, headers=auth(alice["token"]))
    client.post(EXPORT, headers=auth("wrong-secret-token"), status=401)
    assert caplog.records, "an access line is logged per request"
    assert alice["token"] not in caplog.text and "wrong-secret-token" not in caplog.text


# --- parameters --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body", [b"", b"{}", b'{"group": null}', b'{"group": ""}', b'{"other": 1}'])
def test_no_group_exports_all_the_users_slots(client, alice, body):
    response = client.post(EXPORT, body, headers={**auth(alice["token"]), "Content-Type": "application/json"})
    assert uids(response.body) == [alice["ungrouped"], alice["in_group"]]  # by start_at


def test_group_in_json_body_exports_only_the_users_slots_of_that_group(client, alice):
    response = client.post_json(EXPORT, {"group": alice["group"]}, headers=auth(alice["token"]))
    assert uids(response.body) == [alice["in_group"]]
    assert response.headers["Content-Disposition"] == f'attachment; filename="{alice["group"]}.ical"'


def test_group_uuid_in_any_letter_case(client, alice):
    response = client.post_json(EXPORT, {"group": alice["group"].upper()}, headers=auth(alice["token"]))
    assert uids(response.body) == [alice["in_group"]]
    assert response.headers["Content-Disposition"] == f'attachment; filename="{alice["group"]}.ical"'


def test_group_in_form_body(client, alice):
    response = client.post(EXPORT, {"group": alice["group"]}, headers=auth(alice["token"]))
    assert uids(response.body) == [alice["in_group"]]


@pytest.mark.parametrize("method", ["get", "head"])
def test_group_in_query_string_for_get_and_head(client, alice, method):
    response = getattr(client, method)(f"{EXPORT}?group={alice['group']}", headers=auth(alice["token"]))
    assert response.status_int == 200
    if method == "get":
        assert uids(response.body) == [alice["in_group"]]


def test_group_in_query_string_for_post(client, alice):
    response = client.post(f"{EXPORT}?group={alice['group']}", headers=auth(alice["token"]))
    assert uids(response.body) == [alice["in_group"]]


def test_body_parameter_wins_over_query(client, alice):
    response = client.post_json(f"{EXPORT}?group=not-a-uuid", {"group": alice["group"]}, headers=auth(alice["token"]))
    assert uids(response.body) == [alice["in_group"]]
    response = client.post_json(f"{EXPORT}?group={alice['group']}", {"group": None}, headers=auth(alice["token"]))
    assert len(uids(response.body)) == 2


def test_unknown_parameters_are_ignored(client, alice):
    response = client.get(f"{EXPORT}?format=csv&group={alice['group']}&x=1", headers=auth(alice["token"]))
    assert uids(response.body) == [alice["in_group"]]


@pytest.mark.parametrize("body, message", [
    (b'{"group": 5}', "parameter group must be a string (a UUID)"),
    (b'{"group": true}', "parameter group must be a string (a UUID)"),
    (b'{"group": ["00000000-0000-0000-0000-000000000000"]}', "parameter group must be a string (a UUID)"),
    (b'{"group": {"uuid": "x"}}', "parameter group must be a string (a UUID)"),
    (b'{"group": "nope"}', "parameter group is not a UUID"),
    (b'{"group": "00000000-0000-0000-0000-00000000000"}', "parameter group is not a UUID"),
    (b'{"group": "{00000000-0000-0000-0000-000000000000}"}', "parameter group is not a UUID"),
    (b'{"group": " 00000000-0000-0000-0000-000000000000"}', "parameter group is not a UUID"),
    (b'{"group": "a", "group": "b"}', "parameter group is repeated"),
    (b'{"group": ', "request body is not valid JSON"),
    (b'{"group": NaN}', "request body is not valid JSON"),
    (b"[1, 2]", "request body must be a JSON object"),
    (b'"00000000-0000-0000-0000-000000000000"', "request body must be a JSON object"),
    (b"[" * 30000, "request body is not valid JSON"),
    (b'\xef\xbb\xbf{"group": null}', "request body is not valid JSON"),
    (b'{"group": "00000000-0000-0000-0000-000000000000"} trailing', "request body is not valid JSON"),
])
def test_invalid_json_parameters_are_422(client, alice, body, message):
    response = client.post(EXPORT, body, headers={**auth(alice["token"]), "Content-Type": "application/json"},
                           status=422)
    assert response.json == {"error": message}


def test_deeply_nested_json_is_422_not_a_crash(client, alice):
    body = b'{"a": ' + b"[" * 30000 + b"]" * 30000 + b"}"   # valid JSON, 30,000 levels, under the limit
    assert len(body) < 65536
    response = client.post(EXPORT, body, headers={**auth(alice["token"]), "Content-Type": "application/json"},
                           status=422)
    assert response.json == {"error": "request body is not valid JSON"}


@pytest.mark.parametrize("query", ["group=a&group=b", "group=x", "group=%00"])
def test_invalid_query_parameters_are_422(client, alice, query):
    response = client.get(f"{EXPORT}?{query}", headers=auth(alice["token"]), status=422)
    assert "group" in response.json["error"]


def test_repeated_form_parameter_is_422(client, alice):
    response = client.post(EXPORT, "group=a&group=b", headers={**auth(alice["token"]),
                           "Content-Type": "application/x-www-form-urlencoded"}, status=422)
    assert response.json == {"error": "parameter group is repeated"}


def test_body_of_another_type_is_415(client, alice):
    response = client.post(EXPORT, b"group=x", headers={**auth(alice["token"]), "Content-Type": "text/plain"},
                           status=415)
    assert "application/json" in response.json["error"]


@pytest.mark.parametrize("content_type", ["application/json; charset=latin-1", "application/json;charset=\"utf-16\"",
                                          "application/json; Charset=Latin-1",
                                          "application/x-www-form-urlencoded; charset=iso-8859-1"])
def test_body_in_another_charset_is_415(client, alice, content_type):
    response = client.post(EXPORT, b"{}", headers={**auth(alice["token"]), "Content-Type": content_type}, status=415)
    assert response.json == {"error": "request bodies must be UTF-8"}


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "APPLICATION/JSON; Charset=UTF8",
                                          "application/x-www-form-urlencoded; charset=utf-8"])
def test_utf8_charset_parameters_are_accepted(client, alice, content_type):
    body = b'{"group": null}' if "json" in content_type.lower() else b"group="
    response = client.post(EXPORT, body, headers={**auth(alice["token"]), "Content-Type": content_type})
    assert len(uids(response.body)) == 2


def test_empty_body_of_any_type_is_no_parameters(client, alice):
    response = client.post(EXPORT, b"", headers={**auth(alice["token"]), "Content-Type": "text/plain"})
    assert len(uids(response.body)) == 2


def test_body_larger_than_the_limit_is_413(client, alice):
    body = json.dumps({"group": None, "pad": "x" * 70000}).encode()
    response = client.post(EXPORT, body, headers={**auth(alice["token"]), "Content-Type": "application/json"},
                           status=413)
    assert "larger than 65536" in response.json["error"]


def test_body_limit_is_configurable(db_path, alice):
    small = make_client(db_path, max_body_bytes=10)
    small.post(EXPORT, b'{"group": null}', headers={**auth(alice["token"]), "Content-Type": "application/json"},
               status=413)


def test_body_not_utf8_is_400(client, alice):
    response = client.post(EXPORT, b'{"group": "\xff"}', headers={**auth(alice["token"]),
                           "Content-Type": "application/json"}, status=400)
    assert response.json == {"error": "request body is not valid UTF-8"}


@pytest.mark.parametrize("length", ["abc", "-1", "1.5", "１２", "99999999999999999999999"])
def test_bad_content_length_is_400(db_path, alice, length):
    status, headers, body = call(db_path, validate=False, CONTENT_LENGTH=length, HTTP_AUTHORIZATION=f"Token token={alice['token']}",
                                 CONTENT_TYPE="application/json", body=b"{}")
    assert status.startswith("400"), status
    assert json.loads(body) == {"error": "invalid Content-Length"}


def test_body_shorter_than_content_length_is_400(db_path, alice):
    status, _, body = call(db_path, CONTENT_LENGTH="10", HTTP_AUTHORIZATION=f"Token token={alice['token']}",
                           CONTENT_TYPE="application/json", body=b"{}")
    assert status.startswith("400")
    assert json.loads(body) == {"error": "request body shorter than its Content-Length"}


@pytest.mark.parametrize("body, expected", [(b'{"group": "%s"}', 1), (b"", 2), (b"x" * 70000, 413)])
def test_chunked_body_without_content_length_is_read_when_the_server_terminates_it(db_path, alice, body, expected):
    """gunicorn passes chunked uploads with no CONTENT_LENGTH and wsgi.input_terminated (PEP 3333 note)."""
    body = body.replace(b"%s", alice["group"].encode())
    status, _, content = call(db_path, validate=False, HTTP_AUTHORIZATION=f"Token token={alice['token']}",
                              CONTENT_TYPE="application/json", body=body, **{"wsgi.input_terminated": True})
    if expected == 413:
        assert status.startswith("413")
    else:
        assert status.startswith("200") and len(uids(content)) == expected


def test_check_order_authentication_before_body_and_parameters(client):
    client.post(EXPORT, b"x" * 70000, headers={"Content-Type": "text/plain"}, status=401)
    client.get(f"{EXPORT}?group=bad", status=401)


def test_check_order_body_before_parameters(client, alice):
    body = b"x" * 70000
    client.post(f"{EXPORT}?group=bad", body, headers={**auth(alice["token"]), "Content-Type": "application/json"},
                status=413)
    client.post(f"{EXPORT}?group=bad", b"{}", headers={**auth(alice["token"]), "Content-Type": "text/csv"},
                status=415)


def test_check_order_parameters_before_group(client, alice):
    client.post_json(EXPORT, {"group": 1}, headers=auth(alice["token"]), status=422)


# --- which slots -------------------------------------------------------------------------------------------

def test_another_users_group_is_404_like_a_missing_one(client, alice, data):
    mallory_id, mallory_token = data.user("mallory")
    data.slot(mallory_id, title="Mallory's own")
    theirs = client.post_json(EXPORT, {"group": alice["group"]}, headers=auth(mallory_token), status=404)
    missing = client.post_json(EXPORT, {"group": "00000000-0000-4000-8000-000000000000"},
                               headers=auth(mallory_token), status=404)
    assert theirs.json == missing.json == {"error": "group not found"}
    assert theirs.headers["Content-Length"] == missing.headers["Content-Length"]


def test_other_users_slots_never_appear(client, alice, data):
    bob_token = "token-bob"
    response = client.post(EXPORT, headers=auth(bob_token))
    assert b"Bob's" in response.body
    assert b"In group" not in response.body and b"Alone" not in response.body
    mine = client.post(EXPORT, headers=auth(alice["token"]))
    assert b"Bob's" not in mine.body


def test_member_exports_only_own_slots_of_a_shared_group(client, alice, data):
    carol_id, carol_token = data.user("carol")
    data.member(alice["group_id"], carol_id)
    _, carols = data.slot(carol_id, title="Carol's", groups=[alice["group_id"]])
    response = client.post_json(EXPORT, {"group": alice["group"]}, headers=auth(carol_token))
    assert uids(response.body) == [carols]


def test_ended_membership_is_404(client, alice, data):
    carol_id, carol_token = data.user("carol")
    data.member(alice["group_id"], carol_id, deleted_at="2020-01-01T00:00:00Z")
    client.post_json(EXPORT, {"group": alice["group"]}, headers=auth(carol_token), status=404)


def test_deleted_group_is_404(client, data):
    user_id, token = data.user()
    _, group_uuid = data.group(user_id, deleted_at="2020-01-01T00:00:00Z")
    client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token), status=404)


def test_deleted_slots_and_links_are_invisible(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id)
    _, kept = data.slot(user_id, groups=[group_id])
    data.slot(user_id, groups=[group_id], deleted_at="2020-01-01T00:00:00Z")
    _, unlinked = data.slot(user_id, groups=[group_id])
    data.run("UPDATE group_slots SET deleted_at = '2020-01-01T00:00:00Z' WHERE slot_id = "
             "(SELECT id FROM slots WHERE uuid = ?)", (unlinked,))
    assert uids(client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token)).body) == [kept]
    assert sorted(uids(client.post(EXPORT, headers=auth(token)).body)) == sorted([kept, unlinked])


def test_user_without_slots_gets_an_empty_calendar(client, data):
    _, token = data.user()
    response = client.post(EXPORT, headers=auth(token))
    assert response.body == (b"BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//Timeslot//Timeslot Export//EN\r\n"
                             b"CALSCALE:GREGORIAN\r\nMETHOD:PUBLISH\r\nNAME:Timeslot\r\nX-WR-CALNAME:Timeslot\r\n"
                             b"END:VCALENDAR\r\n")


def test_empty_group_gets_an_empty_calendar_with_its_name(client, data):
    user_id, token = data.user()
    _, group_uuid = data.group(user_id, name="Empty")
    response = client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token))
    assert b"NAME:Empty\r\nX-WR-CALNAME:Empty\r\nEND:VCALENDAR\r\n" in response.body
    assert uids(response.body) == []


# --- success headers ---------------------------------------------------------------------------------------

def test_the_seeds_exact_request_gets_the_seeds_status_and_headers(client, data):
    """The seed's curl: POST, -d '', Content-Type: application/json, Accept: text/plain, the Token header."""
    user_id, token = data.user(token="YJbw67LGo32gOsotvxSkMo5HHUc")
    for n in range(19, 24):
        data.slot(user_id, title=f"Slot title {n}", start_at=f"2019-09-{n + 1}T{n - 19 + 19}:44:02Z",
                  end_at=f"2019-10-{n + 1}T{n - 19 + 19}:44:02Z", visibility="public")
    response = client.post(EXPORT, b"", headers={"Content-Type": "application/json", "Accept": "text/plain",
                                                  "Authorization": "Token token=YJbw67LGo32gOsotvxSkMo5HHUc",
                                                  "Host": "example.org", "Cookie": ""})
    assert response.status == "200 OK"
    headers = response.headers
    for name, value in SECURITY.items():
        assert headers[name] == value
    assert headers["Content-Disposition"] == 'attachment; filename="Timeslot-Export.ical"'
    assert headers["Content-Transfer-Encoding"] == "binary"
    assert headers["Content-Type"] == "application/octet-stream"
    assert headers["Cache-Control"] == "private"
    assert [v.strip() for v in headers["Vary"].split(",")] == ["Accept", "Accept-Encoding", "Origin"]
    assert re.fullmatch(r'W/"[0-9a-f]{32}"', headers["ETag"])
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", headers["X-Request-Id"])
    assert re.fullmatch(r"[0-9]+\.[0-9]{6}", headers["X-Runtime"])
    assert int(headers["Content-Length"]) == len(response.body)
    assert [line for event in events(response.body) for line in event
            if line.startswith("SUMMARY:")] == [f"SUMMARY:Slot title {n}" for n in range(19, 24)]


@pytest.mark.parametrize("accept, expected", [
    ("text/calendar", "text/calendar; charset=utf-8"),
    ("text/plain, text/calendar;q=0.5", "text/calendar; charset=utf-8"),
    ("text/calendar;q=0", "application/octet-stream"),
    ("*/*", "application/octet-stream"),
    ("", "application/octet-stream"),
])
def test_content_type_follows_accept(client, alice, accept, expected):
    response = client.post(EXPORT, headers={**auth(alice["token"]), "Accept": accept})
    assert response.headers["Content-Type"] == expected


@pytest.mark.parametrize("supplied, echoed", [
    ("abc-123_X.y", True), ("a" * 255, True), ("a" * 256, False), ("", False), ("bad id", False),
    ("evil\u00e9", False), ("x;y", False)])
def test_request_id_is_echoed_only_when_safe(client, supplied, echoed):
    response = client.get("/nowhere", headers={"X-Request-Id": supplied}, status=404)
    if echoed:
        assert response.headers["X-Request-Id"] == supplied
    else:
        assert re.fullmatch(r"[0-9a-f-]{36}", response.headers["X-Request-Id"])


@pytest.mark.parametrize("path, status", [("/nowhere", 404), (EXPORT, 401)])
def test_every_response_has_the_common_headers(client, path, status):
    response = client.get(path, status=status)
    for name, value in SECURITY.items():
        assert response.headers[name] == value
    assert "X-Request-Id" in response.headers and "X-Runtime" in response.headers


# --- failures ----------------------------------------------------------------------------------------------

def test_export_failure_is_500_with_request_id_and_traceback_only_in_the_log(client, alice, monkeypatch, caplog):
    def broken(row, style):
        raise RuntimeError("boom in the writer")
    monkeypatch.setattr(timeslot_export, "write_event", broken)
    response = client.post(EXPORT, headers={**auth(alice["token"]), "X-Request-Id": "req-42"}, status=500)
    assert response.json == {"error": "export failed", "request_id": "req-42"}
    assert b"boom" not in response.body and b"Traceback" not in response.body
    failure = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert failure and "req-42" in failure[0].getMessage() and failure[0].exc_info is not None


def test_missing_database_is_503_with_retry_after(tmp_path, caplog):
    client = make_client(tmp_path / "missing.sqlite3")
    response = client.post(EXPORT, headers=auth("x"), status=503)
    assert response.json["error"] == "database unavailable"
    assert response.json["request_id"] == response.headers["X-Request-Id"]
    assert int(response.headers["Retry-After"]) >= 1


def test_application_opens_the_database_read_only(client, alice, db_path):
    database = timeslot_export.Database(str(db_path))
    session = database.session()
    try:
        with pytest.raises(timeslot_export.DatabaseUnavailable, match="readonly"):
            session._run("INSERT INTO locations (name) VALUES ('x')")
    finally:
        session.close()


def test_fresh_request_ids_are_distinct_version_4_uuids():
    ids = [timeslot_export.fresh_request_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    pattern = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    assert all(pattern.fullmatch(value) for value in ids)
