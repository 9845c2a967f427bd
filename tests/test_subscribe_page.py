"""SPEC §3 "The subscribe page": GET /v1/feeds/<secret> is a page for a person with one link per calendar
client, the address to copy and a download, safe to open (escaped, no other origin, no Referer)."""

import base64
import hashlib
import html.parser
import logging
import re
from urllib.parse import quote, urlsplit

import pytest

import timeslot_export
from conftest import auth, make_client

FEEDS = "/v1/feeds"


class PageParser(html.parser.HTMLParser):
    """The parts of the page a test reads: links by id, the address field, inline styles and scripts, text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links, self.inputs, self.elements = {}, {}, []
        self.styles, self.scripts, self.text = [], [], []
        self._inside = None

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        if tag == "a":
            self.links[attributes.get("id")] = attributes
        elif tag == "input":
            self.inputs[attributes.get("id")] = attributes
        elif tag in ("style", "script"):
            self._inside = tag

    def handle_endtag(self, tag):
        self._inside = None

    def handle_data(self, data):
        if self._inside == "style":
            self.styles.append(data)
        elif self._inside == "script":
            self.scripts.append(data)
        else:
            self.text.append(data)


def parse(body):
    parser = PageParser()
    parser.feed(body.decode("utf-8"))
    parser.close()
    return parser


@pytest.fixture
def owner(data):
    user_id, token = data.user("owner")
    group_id, group_uuid = data.group(user_id, name="Team calendar")
    data.slot(user_id, title="A slot", groups=[group_id])
    return {"id": user_id, "token": token, "group_id": group_id, "group": group_uuid}


def created(client, token, **parameters):
    return client.post_json(FEEDS, parameters, headers=auth(token), status=201).json


def csp_hash(source):
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


def test_the_page_links_each_client_to_the_urls_the_create_response_gave(db_path, owner):
    client = make_client(db_path, base_url="https://cal.example.org/timeslot")
    feed = created(client, owner["token"], group=owner["group"], label="Phone")
    assert feed["page_url"].startswith("https://cal.example.org/timeslot/v1/feeds/")
    response = client.get(urlsplit(feed["page_url"]).path[len("/timeslot"):])
    page = parse(response.body)
    webcal, url = feed["webcal_url"], feed["url"]
    name = "Team calendar"
    assert page.links["google"]["href"] == "https://calendar.google.com/calendar/render?cid=" + quote(webcal, safe="")
    add = f"/calendar/0/addfromweb?url={quote(url, safe='')}&name={quote(name, safe='')}"
    assert page.links["outlook"]["href"] == "https://outlook.live.com" + add
    assert page.links["office"]["href"] == "https://outlook.office.com" + add
    assert page.links["apple"]["href"] == webcal and page.links["thunderbird"]["href"] == webcal
    assert page.links["download"]["href"] == url and "download" in page.links["download"]
    assert page.inputs["url"]["value"] == url and "readonly" in page.inputs["url"]
    text = " ".join(" ".join(page.text).split())
    assert "Team calendar" in text and "Phone" in text and "All details, with reminders; every date." in text
    assert all(link.get("rel") == "noreferrer" for link in page.links.values())


def test_the_page_headers(client, owner):
    feed = created(client, owner["token"])
    response = client.get(urlsplit(feed["page_url"]).path)
    headers = response.headers
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Robots-Tag"] == "noindex"
    assert headers["Cache-Control"] == "private, no-store"
    assert int(headers["Content-Length"]) == len(response.body)
    page = parse(response.body)
    assert len(page.styles) == 1 and len(page.scripts) == 1
    policy = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["style-src"] == csp_hash(page.styles[0]) and policy["script-src"] == csp_hash(page.scripts[0])
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    # nothing is loaded from anywhere: no src, no stylesheet link, no inline handler the policy would block
    for tag, attributes in page.elements:
        assert "src" not in attributes and not (tag == "link")
        assert not any(name.startswith("on") for name in attributes)
    assert b"<!DOCTYPE html>" in response.body and b'name="viewport"' in response.body
    head = client.head(urlsplit(feed["page_url"]).path)
    assert head.body == b"" and head.headers["Content-Security-Policy"] == headers["Content-Security-Policy"]


def test_the_page_uses_the_request_address_without_a_base_url(client, owner):
    feed = created(client, owner["token"])
    page = parse(client.get(urlsplit(feed["page_url"]).path, headers={"Host": "phone.example:8000"}).body)
    secret = feed["url"].rsplit("/", 1)[1][:-4]
    assert page.inputs["url"]["value"] == f"http://phone.example:8000/v1/feeds/{secret}.ics"


HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>&amp;\'</title>'


def test_hostile_label_and_group_name_are_escaped(client, data, owner):
    group_id, group_uuid = data.group(owner["id"], name=HOSTILE + " group")
    feed_id, secret = data.feed(owner["id"], group_id=group_id, label=HOSTILE + " label")
    body = client.get(f"{FEEDS}/{secret}").body
    page = parse(body)
    assert b"<script>alert" not in body and b"<img" not in body and b"</title>" not in body.split(b"</title>", 1)[1]
    assert len(page.scripts) == 1 and not any(tag == "img" for tag, _ in page.elements)
    text = "".join(page.text)
    assert HOSTILE + " group" in text and HOSTILE + " label" in text          # shown as text, whole
    outlook = page.links["outlook"]["href"]
    assert outlook.endswith("&name=" + quote(HOSTILE + " group", safe=""))
    assert page.links["download"]["download"].endswith(".ics") and "/" not in page.links["download"]["download"]


@pytest.mark.parametrize("settings, shows", [
    ({"details": "busy"}, "Busy times only: no titles, places, notes or reminders; every date."),
    ({"alarms": False}, "All details, without reminders; every date."),
    ({"past_days": 30}, "All details, with reminders; from 30 days ago on."),
    ({"future_days": 1}, "All details, with reminders; everything up to 1 day ahead."),
    ({"past_days": 0, "future_days": 365}, "All details, with reminders; from today to 365 days ahead."),
    ({"past_days": 7, "future_days": 0}, "All details, with reminders; from 7 days ago to today.")])
def test_the_page_says_what_the_feed_shows(client, owner, settings, shows):
    feed = created(client, owner["token"], **settings)
    page = parse(client.get(urlsplit(feed["page_url"]).path).body)
    assert shows in " ".join(" ".join(page.text).split())


def test_a_group_without_a_name_is_called_timeslot(client, data, owner):
    group_id, _ = data.group(owner["id"], name="  ")
    _, secret = data.feed(owner["id"], group_id=group_id)
    page = parse(client.get(f"{FEEDS}/{secret}").body)
    assert page.links["outlook"]["href"].endswith("&name=Timeslot") and "Timeslot" in page.text


@pytest.mark.parametrize("case, status", [("unknown", 404), ("malformed", 404), ("revoked", 410), ("user deleted", 404),
                                          ("group deleted", 404)])
def test_unknown_and_revoked_pages_are_short_html_pages(client, data, owner, case, status):
    _, secret = data.feed(owner["id"], group_id=owner["group_id"])
    if case == "unknown":
        secret = "Unknown-AbCdEfGhIjKlMnOpQrStUvWxYz012345678"
    elif case == "malformed":
        secret = "bad%20secret"
    elif case == "revoked":
        data.run("UPDATE feeds SET revoked_at = '2020-01-01T00:00:00Z'")
    elif case == "user deleted":
        data.run("UPDATE users SET deleted_at = '2020-01-01T00:00:00Z'")
    else:
        data.run("UPDATE slot_groups SET deleted_at = '2020-01-01T00:00:00Z'")
    response = client.get(f"{FEEDS}/{secret}", status=status)
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Referrer-Policy"] == "no-referrer" and response.headers["X-Robots-Tag"] == "noindex"
    assert response.headers["Cache-Control"] == "private, no-store"
    policy = response.headers["Content-Security-Policy"]
    assert "script-src" not in policy and "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    page = parse(response.body)
    assert not page.scripts and not page.links
    heading = {404: "Calendar link not found", 410: "Calendar link turned off"}[status]
    assert heading in page.text
    client.head(f"{FEEDS}/{secret}", status=status)


def test_the_page_is_logged_without_its_secret(client, owner, caplog):
    caplog.set_level(logging.INFO, logger="timeslot_export")
    feed = created(client, owner["token"])
    path = urlsplit(feed["page_url"]).path
    client.get(path)
    client.head(path)
    secret = path.rsplit("/", 1)[1]
    assert secret not in caplog.text
    assert "GET /v1/feeds/[secret] 200" in caplog.text and "HEAD /v1/feeds/[secret] 200" in caplog.text


def test_the_page_needs_no_authorization_and_ignores_one(client, owner):
    feed = created(client, owner["token"])
    path = urlsplit(feed["page_url"]).path
    assert client.get(path, headers={"Authorization": "Token token=wrong"}).body == client.get(path).body


def test_the_page_style_and_script_are_what_the_policy_allows():
    """The hashes are computed from the very strings the page embeds (a changed style needs no new hash)."""
    assert timeslot_export.PAGE_POLICY.count("'sha256-") == 2
    assert csp_hash(timeslot_export.PAGE_STYLE) in timeslot_export.PAGE_POLICY
    assert csp_hash(timeslot_export.PAGE_SCRIPT) in timeslot_export.PAGE_POLICY
    assert not re.search(r"https?://", timeslot_export.PAGE_STYLE + timeslot_export.PAGE_SCRIPT)
