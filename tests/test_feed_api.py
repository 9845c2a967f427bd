"""SPEC §3 "Managing feeds": users create, list, read, change, revoke and reset their own feeds with their API
token; the secret is shown once; another user's feed is indistinguishable from none."""

import json
import logging
import re
import sqlite3
from urllib.parse import urlsplit

import pytest

import timeslot_export
from conftest import auth, events, make_client

FEEDS = "/v1/feeds"
EXPORT = "/v1/export/ical"
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
OBJECT_KEYS = {"id", "label", "group", "details", "alarms", "past_days", "future_days", "created_at", "revoked_at"}
SECRET_KEYS = {"url", "webcal_url", "page_url"}


@pytest.fixture
def owner(data):
    """A user with a group (two slots, one with alarms) and a slot outside it; a group shared with them."""
    user_id, token = data.user("owner")
    group_id, group_uuid = data.group(user_id, name="Team")
    data.slot(user_id, title="In the group", groups=[group_id], alerts=[10], start_at="2019-01-01T10:00:00Z",
              end_at="2019-01-01T11:00:00Z", description="Details")
    data.slot(user_id, title="Also in it", groups=[group_id], start_at="2019-01-02T10:00:00Z")
    data.slot(user_id, title="Outside the group", start_at="2019-01-03T10:00:00Z")
    friend_id, _ = data.user("friend")
    shared_id, shared_uuid = data.group(friend_id, name="Shared")
    data.member(shared_id, user_id)
    return {"id": user_id, "token": token, "group_id": group_id, "group": group_uuid, "shared": shared_uuid}


@pytest.fixture
def stranger(data):
    user_id, token = data.user("stranger")
    return {"id": user_id, "token": token}


def create(client, token, status=201, **parameters):
    return client.post_json(FEEDS, parameters, headers=auth(token), status=status)


def secret_of(created):
    return re.fullmatch(r".*/v1/feeds/([A-Za-z0-9_-]{43})\.ics", created["url"]).group(1)


def path_of(url):
    return urlsplit(url).path


def stored_feeds(db_path):
    connection = sqlite3.connect(db_path)
    try:
        return connection.execute("SELECT * FROM feeds ORDER BY id").fetchall()
    finally:
        connection.close()


# --- create ---------------------------------------------------------------------------------------------------

def test_create_answers_201_with_location_the_object_and_the_secret_urls_once(client, owner, db_path):
    response = create(client, owner["token"])
    body = response.json
    assert set(body) == OBJECT_KEYS | SECRET_KEYS
    assert response.headers["Location"] == f"/v1/feeds/{body['id']}"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"] == "application/json; charset=utf-8"
    assert {key: body[key] for key in ("label", "group", "details", "alarms", "past_days", "future_days",
                                       "revoked_at")} == {"label": "", "group": None, "details": "full",
                                                          "alarms": True, "past_days": None, "future_days": None,
                                                          "revoked_at": None}
    assert TIMESTAMP.fullmatch(body["created_at"])
    secret = secret_of(body)
    assert body["url"] == f"http://localhost/v1/feeds/{secret}.ics"        # the request's own scheme and Host
    assert body["webcal_url"] == f"webcal://localhost/v1/feeds/{secret}.ics"
    assert body["page_url"] == f"http://localhost/v1/feeds/{secret}"
    assert all(secret not in str(row) for row in stored_feeds(db_path))     # only its digest is stored
    feed = client.get(path_of(body["url"]))
    assert events(feed.body) == events(client.post(EXPORT, headers=auth(owner["token"])).body)
    assert len(events(feed.body)) == 3


def test_create_with_every_setting_in_json(client, owner):
    body = create(client, owner["token"], group=owner["group"].upper(), label="Phone \U0001F4F1", details="busy",
                  alarms=False, past_days=30, future_days=365).json
    assert {key: body[key] for key in OBJECT_KEYS - {"id", "created_at"}} == {
        "label": "Phone \U0001F4F1", "group": owner["group"], "details": "busy", "alarms": False, "past_days": 30,
        "future_days": 365, "revoked_at": None}
    calendar = client.get(path_of(body["url"])).body          # the group's slots are of 2019: none in the window
    assert events(calendar) == [] and b"NAME:Team" in calendar
    client.patch_json(f"{FEEDS}/{body['id']}", {"past_days": None}, headers=auth(owner["token"]))
    calendar = client.get(path_of(body["url"])).body
    assert len(events(calendar)) == 2 and b"SUMMARY:Busy" in calendar


def test_create_from_a_form_body_and_from_the_query_the_body_winning(client, owner):
    form = client.post(FEEDS, "label=Form&details=busy&alarms=0&past_days=7&future_days=", headers=auth(owner["token"]),
                       status=201).json
    assert (form["label"], form["details"], form["alarms"], form["past_days"], form["future_days"]) == \
           ("Form", "busy", False, 7, None)
    query = client.post(FEEDS + "?label=Query&alarms=true&future_days=0", headers=auth(owner["token"]), status=201).json
    assert (query["label"], query["alarms"], query["future_days"]) == ("Query", True, 0)
    both = client.post(FEEDS + "?label=Query&details=busy", "label=Body", headers=auth(owner["token"]), status=201).json
    assert (both["label"], both["details"]) == ("Body", "busy")


@pytest.mark.parametrize("value, stored", [("true", True), ("false", False), ("1", True), ("0", False)])
def test_alarms_in_a_form(client, owner, value, stored):
    assert client.post(FEEDS, f"alarms={value}", headers=auth(owner["token"]), status=201).json["alarms"] is stored


@pytest.mark.parametrize("days", [0, 1, 36600, None])
def test_window_bounds_accepted(client, owner, days):
    body = create(client, owner["token"], past_days=days, future_days=days).json
    assert body["past_days"] == days and body["future_days"] == days


def test_a_group_shared_with_the_user_is_allowed(client, owner):
    body = create(client, owner["token"], group=owner["shared"]).json
    assert body["group"] == owner["shared"]


def test_label_of_200_characters_is_allowed(client, owner):
    assert create(client, owner["token"], label="\u00e9" * 200).json["label"] == "\u00e9" * 200


def test_base_url_setting_makes_the_urls(db_path, owner):
    client = make_client(db_path, base_url="https://cal.example.org/timeslot/")
    body = create(client, owner["token"]).json
    secret = secret_of(body)
    assert body["url"] == f"https://cal.example.org/timeslot/v1/feeds/{secret}.ics"
    assert body["webcal_url"] == f"webcal://cal.example.org/timeslot/v1/feeds/{secret}.ics"
    assert body["page_url"] == f"https://cal.example.org/timeslot/v1/feeds/{secret}"


def test_without_base_url_the_request_host_and_a_proxy_scheme_count(client, owner):
    body = client.post_json(FEEDS, {}, headers={**auth(owner["token"]), "Host": "cal.example.org:8443",
                                                "X-Forwarded-Proto": "https"}, status=201).json
    assert body["url"].startswith("https://cal.example.org:8443/v1/feeds/")
    forged = client.post_json(FEEDS, {}, headers={**auth(owner["token"]), "Host": "evil\"><script>",
                                                  "X-Forwarded-Proto": "javascript"}, status=201).json
    assert forged["url"].startswith("http://localhost/v1/feeds/")          # not a host name: the server's own


@pytest.mark.parametrize("value", ["ftp://cal.example.org", "https://cal.example.org/?x=1", "cal.example.org",
                                   "https://", "https://cal.example.org/#top", "https://a b"])
def test_a_bad_base_url_stops_start_up(value):
    with pytest.raises(timeslot_export.ConfigError, match="TIMESLOT_BASE_URL must be an absolute"):
        timeslot_export.Config.from_environ({"TIMESLOT_BASE_URL": value})


@pytest.mark.parametrize("value", ["0", "10001", "abc", "", "-1", "1.5"])
def test_a_bad_max_feeds_stops_start_up(value):
    with pytest.raises(timeslot_export.ConfigError, match="TIMESLOT_MAX_FEEDS must be a whole number from 1 to 10000"):
        timeslot_export.Config.from_environ({"TIMESLOT_MAX_FEEDS": value})


def test_settings_read_from_the_environment():
    config = timeslot_export.Config.from_environ({"TIMESLOT_MAX_FEEDS": "7", "TIMESLOT_BASE_URL": "https://c.example"})
    assert config.max_feeds == 7 and config.base_url == "https://c.example"
    assert timeslot_export.Config.from_environ({}).max_feeds == 100


# --- what is refused, and with what -------------------------------------------------------------------------

@pytest.mark.parametrize("parameters, named", [
    ({"label": 5}, "label"), ({"label": None}, "label"), ({"label": "x" * 201}, "label"),
    ({"label": "two\nlines"}, "label"), ({"label": "tab\there"}, "label"), ({"label": "del\x7f"}, "label"),
    ({"label": "c1\x85"}, "label"), ({"label": ["a"]}, "label"),
    ({"details": "BUSY"}, "details"), ({"details": ""}, "details"), ({"details": None}, "details"),
    ({"details": 1}, "details"),
    ({"alarms": "true"}, "alarms"), ({"alarms": 1}, "alarms"), ({"alarms": None}, "alarms"),
    ({"past_days": -1}, "past_days"), ({"past_days": 36601}, "past_days"), ({"past_days": 1.5}, "past_days"),
    ({"past_days": "30"}, "past_days"), ({"past_days": True}, "past_days"), ({"future_days": 1e9}, "future_days"),
    ({"future_days": -0.5}, "future_days"), ({"future_days": [1]}, "future_days"),
    ({"group": 5}, "group"), ({"group": "not-a-uuid"}, "group"),
])
def test_invalid_settings_are_422_naming_the_parameter(client, owner, db_path, parameters, named):
    response = create(client, owner["token"], status=422, **parameters)
    assert named in response.json["error"]
    assert response.headers["Cache-Control"] == "no-store"
    assert stored_feeds(db_path) == []


@pytest.mark.parametrize("body, named", [("alarms=yes", "alarms"), ("past_days=abc", "past_days"),
                                         ("past_days=1e3", "past_days"), ("future_days=-1", "future_days"),
                                         ("label=a&label=b", "label"), ("details=Full", "details"),
                                         ("past_days=036601", "past_days")])
def test_invalid_form_settings_are_422(client, owner, body, named):
    response = client.post(FEEDS, body, headers=auth(owner["token"]), status=422)
    assert named in response.json["error"]


def test_a_lone_surrogate_in_a_label_is_422_not_a_crash(client, owner):
    response = client.post(FEEDS, '{"label": "\\ud800"}', headers={**auth(owner["token"]),
                                                                   "Content-Type": "application/json"}, status=422)
    assert "label" in response.json["error"]


@pytest.mark.parametrize("body, content_type, status", [
    (b"\xff\xfe", "application/json", 400), (b"x" * 70000, "application/json", 413),
    (b"label=x", "text/plain", 415), (b"[1]", "application/json", 422), (b"{", "application/json", 422)])
def test_bodies_are_checked_as_the_exports_are(client, owner, body, content_type, status):
    client.post(FEEDS, body, headers={**auth(owner["token"]), "Content-Type": content_type}, status=status)


@pytest.mark.parametrize("group", ["00000000-0000-4000-8000-000000000000", "deleted", "other"])
def test_a_group_that_is_not_the_users_is_404(client, data, owner, stranger, db_path, group):
    if group == "deleted":
        _, group = data.group(owner["id"], deleted_at="2020-01-01T00:00:00Z")
    elif group == "other":
        _, group = data.group(stranger["id"])
    assert create(client, owner["token"], status=404, group=group).json == {"error": "group not found"}
    assert stored_feeds(db_path) == []


ROUTES = [("POST", FEEDS), ("GET", FEEDS), ("HEAD", FEEDS), ("GET", FEEDS + "/1"), ("PATCH", FEEDS + "/1"),
          ("DELETE", FEEDS + "/1"), ("POST", FEEDS + "/1/reset")]


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("authorization", [None, "Token token=wrong", "Basic Zm9vOmJhcg==", "Token token=deleted"])
def test_every_route_needs_the_users_token(client, data, owner, method, path, authorization):
    data.feed(owner["id"])
    data.user("deleted", token="deleted", deleted_at="2020-01-01T00:00:00Z")
    headers = {"Authorization": authorization} if authorization else {}
    response = client.request(path, method=method, headers=headers, body=b"label=[]" if method != "GET" else b"",
                              content_type="application/x-www-form-urlencoded" if method != "GET" else None,
                              expect_errors=True)
    assert response.status_int == 401                                      # before any parameter or id is read
    assert response.headers["WWW-Authenticate"] == 'Token realm="Application"'
    if method != "HEAD":
        assert response.json == {"error": "auth_token invalid or missing"}


# --- list and read --------------------------------------------------------------------------------------------

def test_list_shows_every_feed_revoked_ones_included_by_id_and_never_a_secret(client, data, owner):
    first = create(client, owner["token"], label="one").json
    second = create(client, owner["token"], label="two", group=owner["group"]).json
    client.delete(f"{FEEDS}/{first['id']}", headers=auth(owner["token"]), status=204)
    _, cli_secret = data.feed(owner["id"])                                  # made by the command line
    response = client.get(FEEDS, headers=auth(owner["token"]))
    assert response.headers["Cache-Control"] == "no-store"
    listed = response.json["feeds"]
    assert [feed["id"] for feed in listed] == sorted(feed["id"] for feed in listed) and len(listed) == 3
    assert all(set(feed) == OBJECT_KEYS for feed in listed)
    assert listed[0]["label"] == "one" and TIMESTAMP.fullmatch(listed[0]["revoked_at"])
    assert listed[1] == {key: second[key] for key in OBJECT_KEYS}
    for secret in (secret_of(first), secret_of(second), cli_secret):
        assert secret not in response.text
    assert client.get(f"{FEEDS}/{second['id']}", headers=auth(owner["token"])).json == listed[1]


def test_a_user_without_feeds_lists_none(client, owner):
    assert client.get(FEEDS, headers=auth(owner["token"])).json == {"feeds": []}


def test_head_of_the_list_has_no_body(client, owner):
    response = client.head(FEEDS, headers=auth(owner["token"]))
    assert response.body == b"" and response.headers["Content-Type"] == "application/json; charset=utf-8"


# --- isolation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ident", ["other", "999999", "0", "007", "-1", "1.0", "1e3", "99999999999999999999", "abc"])
@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE", "RESET"])
def test_an_id_that_is_not_the_callers_is_404_by_every_method(client, data, owner, stranger, ident, method):
    """Nothing tells another user's feed from none: the same 404 for theirs, unknown ids and non-numbers."""
    own_id, _ = data.feed(stranger["id"])
    other_id, other_secret = data.feed(owner["id"], label="owner's")
    ident = str(other_id) if ident == "other" else ident
    path = f"{FEEDS}/{ident}" + ("/reset" if method == "RESET" else "")
    response = client.request(path, method="POST" if method == "RESET" else method, body=b"label=changed",
                              headers=auth(stranger["token"]), content_type="application/x-www-form-urlencoded",
                              expect_errors=True)
    assert response.status_int == 404
    if method == "GET" and not ident.isdigit():
        assert response.content_type == "text/html"                         # no number: a secret's page
    else:
        assert response.json == {"error": "feed not found"} and response.headers["Cache-Control"] == "no-store"
    # and the owner's feed is as it was: not changed, not revoked, not reset
    assert client.get(f"/v1/feeds/{other_secret}.ics").status_int == 200
    assert client.get(f"{FEEDS}/{other_id}", headers=auth(owner["token"])).json["label"] == "owner's"
    assert len(client.get(FEEDS, headers=auth(owner["token"])).json["feeds"]) == 1
    assert [feed["id"] for feed in client.get(FEEDS, headers=auth(stranger["token"])).json["feeds"]] == [own_id]


def test_a_second_user_sees_none_of_the_firsts_feeds(client, owner, stranger):
    created = [create(client, owner["token"], label=f"f{n}").json for n in range(3)]
    assert client.get(FEEDS, headers=auth(stranger["token"])).json == {"feeds": []}
    for feed in created:
        for method, suffix in (("GET", ""), ("PATCH", ""), ("DELETE", ""), ("POST", "/reset")):
            client.request(f"{FEEDS}/{feed['id']}{suffix}", method=method, headers=auth(stranger["token"]), status=404)
        assert client.get(path_of(feed["url"])).status_int == 200


# --- change ---------------------------------------------------------------------------------------------------

def test_patch_changes_what_it_names_and_keeps_the_rest(client, owner):
    created = create(client, owner["token"], label="Phone", group=owner["group"], past_days=10).json
    path = f"{FEEDS}/{created['id']}"
    changed = client.patch_json(path, {"label": "Tablet", "future_days": 5}, headers=auth(owner["token"])).json
    assert changed == {**{key: created[key] for key in OBJECT_KEYS}, "label": "Tablet", "future_days": 5}
    cleared = client.patch(path, "past_days=&alarms=false", headers=auth(owner["token"])).json
    assert cleared["past_days"] is None and cleared["alarms"] is False and cleared["future_days"] == 5
    assert client.get(path, headers=auth(owner["token"])).json == cleared
    unchanged = client.patch_json(path, {"unknown": 1}, headers=auth(owner["token"]))
    assert unchanged.json == cleared and unchanged.headers["Cache-Control"] == "no-store"
    assert client.get(path_of(created["url"])).status_int == 200            # the same URL, still working


@pytest.mark.parametrize("change, shows", [
    ({"details": "busy"}, lambda body: b"SUMMARY:Busy" in body and b"Details" not in body),
    ({"alarms": False}, lambda body: b"VALARM" not in body and b"SUMMARY:In the group" in body),
    ({"past_days": 30}, None), ({"future_days": 0}, None)])
def test_a_patch_of_what_the_body_shows_is_a_new_etag_at_once(client, owner, change, shows):
    created = create(client, owner["token"]).json
    feed = path_of(created["url"])
    first = client.get(feed)
    assert b"VALARM" in first.body
    client.get(feed, headers={"If-None-Match": first.headers["ETag"]}, status=304)
    client.patch_json(f"{FEEDS}/{created['id']}", change, headers=auth(owner["token"]))
    after = client.get(feed, headers={"If-None-Match": first.headers["ETag"]}, status=200)
    assert after.headers["ETag"] != first.headers["ETag"]
    if shows is not None:
        assert shows(after.body)
    client.get(feed, headers={"If-None-Match": after.headers["ETag"]}, status=304)


def test_a_patch_of_the_label_alone_keeps_the_etag(client, owner):
    """The label is not in the calendar: the body, and so the validator, stay the same."""
    created = create(client, owner["token"]).json
    etag = client.get(path_of(created["url"])).headers["ETag"]
    client.patch_json(f"{FEEDS}/{created['id']}", {"label": "renamed"}, headers=auth(owner["token"]))
    client.get(path_of(created["url"]), headers={"If-None-Match": etag}, status=304)


@pytest.mark.parametrize("group", [None, "", "00000000-0000-4000-8000-000000000000"])
def test_the_group_cannot_change(client, owner, group):
    created = create(client, owner["token"], group=owner["group"]).json
    response = client.patch_json(f"{FEEDS}/{created['id']}", {"group": group, "label": "x"},
                                 headers=auth(owner["token"]), status=422)
    assert "group" in response.json["error"]
    assert client.get(f"{FEEDS}/{created['id']}", headers=auth(owner["token"])).json["label"] == ""


def test_a_bad_value_in_a_patch_changes_nothing(client, owner):
    created = create(client, owner["token"], label="kept").json
    client.patch_json(f"{FEEDS}/{created['id']}", {"label": "new", "past_days": -1}, headers=auth(owner["token"]),
                      status=422)
    assert client.get(f"{FEEDS}/{created['id']}", headers=auth(owner["token"])).json["label"] == "kept"


def test_patch_of_a_revoked_feed_is_410(client, owner):
    created = create(client, owner["token"]).json
    client.delete(f"{FEEDS}/{created['id']}", headers=auth(owner["token"]), status=204)
    response = client.patch_json(f"{FEEDS}/{created['id']}", {"label": "x"}, headers=auth(owner["token"]), status=410)
    assert response.json == {"error": "feed revoked"}


# --- revoke and reset -----------------------------------------------------------------------------------------

def test_delete_revokes_at_once_and_again_is_204(client, owner):
    created = create(client, owner["token"]).json
    path = f"{FEEDS}/{created['id']}"
    response = client.delete(path, headers=auth(owner["token"]), status=204)
    assert response.body == b"" and response.headers["Cache-Control"] == "no-store"
    assert "Content-Type" not in response.headers
    assert client.get(path_of(created["url"]), status=410).json == {"error": "feed revoked"}
    assert client.get(path_of(created["page_url"]), status=410).content_type == "text/html"
    revoked_at = client.get(path, headers=auth(owner["token"])).json["revoked_at"]
    assert TIMESTAMP.fullmatch(revoked_at)
    client.delete(path, headers=auth(owner["token"]), status=204)
    assert client.get(path, headers=auth(owner["token"])).json["revoked_at"] == revoked_at


def test_reset_revokes_and_creates_one_with_the_same_settings(client, owner):
    created = create(client, owner["token"], label="Phone", group=owner["group"], details="busy", alarms=False,
                     past_days=3, future_days=4).json
    response = client.post(f"{FEEDS}/{created['id']}/reset", headers=auth(owner["token"]), status=201)
    reset = response.json
    assert set(reset) == OBJECT_KEYS | SECRET_KEYS and response.headers["Location"] == f"/v1/feeds/{reset['id']}"
    assert reset["id"] != created["id"] and secret_of(reset) != secret_of(created)
    settings = ("label", "group", "details", "alarms", "past_days", "future_days")
    assert {key: reset[key] for key in settings} == {key: created[key] for key in settings}
    assert reset["revoked_at"] is None
    client.get(path_of(created["url"]), status=410)                         # the old URL at once
    assert client.get(path_of(reset["url"])).body == client.get(path_of(reset["url"])).body
    assert b"NAME:Team" in client.get(path_of(reset["url"])).body
    old = client.get(f"{FEEDS}/{created['id']}", headers=auth(owner["token"])).json
    assert old["revoked_at"] is not None
    client.post(f"{FEEDS}/{created['id']}/reset", headers=auth(owner["token"]), status=410)


# --- the bound ------------------------------------------------------------------------------------------------

def test_at_most_max_feeds_active_feeds(db_path, owner, stranger):
    client = make_client(db_path, max_feeds=2)
    first = create(client, owner["token"]).json
    create(client, owner["token"])
    assert create(client, owner["token"], status=409).json == {"error": "too many feeds"}
    create(client, stranger["token"])                                       # per user
    reset = client.post(f"{FEEDS}/{first['id']}/reset", headers=auth(owner["token"]), status=201).json   # 1 out, 1 in
    create(client, owner["token"], status=409)
    client.delete(f"{FEEDS}/{reset['id']}", headers=auth(owner["token"]), status=204)
    create(client, owner["token"])                                          # revoked feeds do not count
    create(client, owner["token"], status=409)


# --- methods, CORS --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, path, allow", [
    ("PUT", FEEDS, "GET, HEAD, POST, OPTIONS"), ("DELETE", FEEDS, "GET, HEAD, POST, OPTIONS"),
    ("POST", FEEDS + "/1", "GET, HEAD, PATCH, DELETE, OPTIONS"),
    ("PUT", FEEDS + "/1", "GET, HEAD, PATCH, DELETE, OPTIONS"),
    ("GET", FEEDS + "/1/reset", "POST, OPTIONS"), ("DELETE", FEEDS + "/1/reset", "POST, OPTIONS")])
def test_other_methods_are_405_with_allow(client, owner, method, path, allow):
    response = client.request(path, method=method, headers=auth(owner["token"]), expect_errors=True)
    assert response.status_int == 405 and response.headers["Allow"] == allow


ORIGIN = "https://app.example.org"


@pytest.mark.parametrize("path, methods", [(FEEDS, "GET, HEAD, POST, OPTIONS"),
                                           (FEEDS + "/3", "GET, HEAD, PATCH, DELETE, OPTIONS"),
                                           (FEEDS + "/3/reset", "POST, OPTIONS"),
                                           (EXPORT, "GET, HEAD, POST, OPTIONS")])
def test_a_preflight_gets_the_methods_of_its_path(db_path, path, methods):
    client = make_client(db_path, cors_origins=(ORIGIN,))
    response = client.options(path, headers={"Origin": ORIGIN, "Access-Control-Request-Method": "PATCH"}, status=204)
    assert response.headers["Access-Control-Allow-Methods"] == methods and response.headers["Allow"] == methods
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    other = client.options(path, headers={"Origin": "https://evil.example"}, status=204)
    assert "Access-Control-Allow-Methods" not in other.headers and "Access-Control-Allow-Origin" not in other.headers


def test_a_browser_may_read_location_of_a_created_feed(db_path, owner):
    client = make_client(db_path, cors_origins=(ORIGIN,))
    response = client.post_json(FEEDS, {}, headers={**auth(owner["token"]), "Origin": ORIGIN}, status=201)
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Location" in [name.strip() for name in response.headers["Access-Control-Expose-Headers"].split(",")]
    listing = client.get(FEEDS, headers={**auth(owner["token"]), "Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in listing.headers


# --- secrets are shown once and never logged ------------------------------------------------------------------

def test_the_secret_is_in_exactly_one_response_and_in_no_log_line(client, owner, caplog):
    caplog.set_level(logging.DEBUG, logger="timeslot_export")
    bodies = []

    def answer(response):
        bodies.append(response.body.decode())
        return response

    created = answer(create(client, owner["token"], label="Phone")).json
    feed_id = created["id"]
    answer(client.get(FEEDS, headers=auth(owner["token"])))
    answer(client.get(f"{FEEDS}/{feed_id}", headers=auth(owner["token"])))
    answer(client.patch_json(f"{FEEDS}/{feed_id}", {"label": "Tablet"}, headers=auth(owner["token"])))
    answer(client.get(path_of(created["url"])))
    answer(client.get(path_of(created["page_url"])))
    reset = answer(client.post(f"{FEEDS}/{feed_id}/reset", headers=auth(owner["token"]), status=201)).json
    answer(client.get(FEEDS, headers=auth(owner["token"])))
    answer(client.delete(f"{FEEDS}/{reset['id']}", headers=auth(owner["token"]), status=204))
    answer(client.get(path_of(reset["url"]), status=410))
    for secret in (secret_of(created), secret_of(reset)):
        in_responses = [body for body in bodies if secret in body and not body.startswith("<!DOCTYPE")]
        assert len(in_responses) == 1, secret                  # the create or reset that made it (and its page)
        assert secret not in caplog.text
    assert owner["token"] not in caplog.text
    assert len(caplog.records) >= 10
    assert "/v1/feeds/[secret].ics" in caplog.text and "GET /v1/feeds/[secret] 200" in caplog.text


# --- writes: one transaction, refused where the database cannot be written ------------------------------------

def test_a_database_locked_past_the_busy_timeout_is_503_with_retry_after(db_path, owner):
    client = make_client(db_path, busy_timeout_ms=50)
    created = create(client, owner["token"]).json
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        for request in (lambda: client.post_json(FEEDS, {}, headers=auth(owner["token"]), status=503),
                        lambda: client.patch_json(f"{FEEDS}/{created['id']}", {"label": "x"},
                                                  headers=auth(owner["token"]), status=503),
                        lambda: client.post(f"{FEEDS}/{created['id']}/reset", headers=auth(owner["token"]), status=503),
                        lambda: client.delete(f"{FEEDS}/{created['id']}", headers=auth(owner["token"]), status=503)):
            response = request()
            assert response.headers["Retry-After"] == "2" and "error" in response.json
        # reads go on: the export, the list and the feed answer while the lock is held
        client.post(EXPORT, headers=auth(owner["token"]), status=200)
        assert len(client.get(FEEDS, headers=auth(owner["token"])).json["feeds"]) == 1
        client.get(path_of(created["url"]), status=200)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert len(stored_feeds(db_path)) == 1 and stored_feeds(db_path)[0][-3] is None   # nothing changed


def test_a_failure_inside_the_transaction_leaves_nothing_behind(db_path, owner, monkeypatch):
    """A reset is a revoke and an insert: when the insert fails, the revoke is undone too."""
    client = make_client(db_path)
    created = create(client, owner["token"]).json
    before = stored_feeds(db_path)

    def broken(self, feed_id):
        raise timeslot_export.DatabaseUnavailable("disk I/O error (simulated)")
    monkeypatch.setattr(timeslot_export.WriteSession, "copy_feed", broken)
    client.post(f"{FEEDS}/{created['id']}/reset", headers=auth(owner["token"]), status=503)
    assert stored_feeds(db_path) == before
    client.get(path_of(created["url"]), status=200)


@pytest.mark.parametrize("method, path, body", [
    ("POST", FEEDS, b"{}"), ("PATCH", FEEDS + "/{id}", b'{"label": "x"}'), ("DELETE", FEEDS + "/{id}", b""),
    ("POST", FEEDS + "/{id}/reset", b"")])
def test_a_replica_refuses_changes_and_keeps_exporting(db_path, data, owner, method, path, body):
    feed_id, secret = data.feed(owner["id"])
    before = stored_feeds(db_path)
    client = make_client(db_path, replica=True)
    response = client.request(path.format(id=feed_id), method=method, body=body, headers=auth(owner["token"]),
                              content_type="application/json", expect_errors=True)
    assert response.status_int == 503 and "primary" in response.json["error"]
    assert "Retry-After" not in response.headers          # asking this instance again will not help
    assert stored_feeds(db_path) == before
    client.post(EXPORT, headers=auth(owner["token"]), status=200)
    client.get(f"/v1/feeds/{secret}.ics", status=200)
    assert len(client.get(FEEDS, headers=auth(owner["token"])).json["feeds"]) == 1


def test_a_replica_checks_the_token_first(db_path, owner):
    client = make_client(db_path, replica=True)
    client.post_json(FEEDS, {}, headers=auth("wrong"), status=401)


def test_created_feed_rows_hold_what_the_api_said(client, owner, db_path):
    body = create(client, owner["token"], label="Row", details="busy", alarms=False, past_days=1, future_days=2).json
    connection = sqlite3.connect(db_path)
    row = connection.execute("SELECT user_id, group_id, label, details, alarms, past_days, future_days, created_at, "
                             "revoked_at, token_digest FROM feeds WHERE id = ?", (body["id"],)).fetchone()
    connection.close()
    digest = timeslot_export.token_digest(secret_of(body))
    assert row == (owner["id"], None, "Row", "busy", 0, 1, 2, body["created_at"], None, digest)
    assert json.loads(json.dumps(body)) == body
