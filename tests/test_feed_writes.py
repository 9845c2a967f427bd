"""SPEC §3 "Managing feeds" and §6 against real servers: feed changes are the service's only writes, one short
transaction each, exactly once however many clients race (`serve --workers 2`, gunicorn with two workers),
refused with nothing changed where the database cannot be written (a read-only file or directory) while
exports go on answering, and never logged with a secret or a token."""

import contextlib
import http.client
import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import auth
from test_hardening import running_server
from test_servers import BIN, SERVERS, wsgi_server

CLIENTS = 16


def request(base, method, path, token=None, body=None):
    """(status, headers, body) of one request on a fresh connection; ``body`` a dict sent as JSON."""
    host, port = base.split("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {**(auth(token) if token else {}), **({"Content-Type": "application/json"} if body is not None else {})}
    try:
        connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def create_at_once(base, token, clients=CLIENTS):
    """``clients`` threads that each POST /v1/feeds at the same moment (a barrier); their answers, by client."""
    start = threading.Barrier(clients)
    answers = [None] * clients

    def client(number):
        start.wait()
        answers[number] = request(base, "POST", "/v1/feeds", token, {"label": f"client {number}"})

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(answer is not None for answer in answers)
    return answers


def stored(db_path, sql="SELECT label, revoked_at FROM feeds ORDER BY id"):
    connection = sqlite3.connect(db_path)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def check_each_lands_once(base, db_path, answers):
    """Every client got its own feed, stored once, whose URL works."""
    assert [status for status, _, _ in answers] == [201] * len(answers), answers
    created = [json.loads(body) for _, _, body in answers]
    assert len({feed["id"] for feed in created}) == len({feed["url"] for feed in created}) == len(answers)
    assert sorted(label for label, _ in stored(db_path)) == sorted(f"client {n}" for n in range(len(answers)))
    for feed in created:
        status, headers, body = request(base, "GET", "/v1/feeds/" + feed["url"].rsplit("/", 1)[1])
        assert status == 200 and body.startswith(b"BEGIN:VCALENDAR") and b"SUMMARY:Raced" in body


def check_the_bound_holds(db_path, answers, bound, before=0):
    """Of racing creates, exactly as many landed as the bound left room for; the others are 409."""
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [201] * (bound - before) + [409] * (len(answers) - bound + before), statuses
    assert all(json.loads(body) == {"error": "too many feeds"} for status, _, body in answers if status == 409)
    assert stored(db_path, "SELECT count(*) FROM feeds WHERE revoked_at IS NULL") == [(bound,)]


@pytest.fixture
def user(data):
    user_id, token = data.user("racer")
    data.slot(user_id, title="Raced")
    return token


@pytest.mark.slow
def test_concurrent_creates_under_serve_workers_each_land_once(db_path, user):
    with running_server(db_path, 4, "--workers", "2") as (base, process):
        check_each_lands_once(base, db_path, create_at_once(base, user))
    assert "Traceback" not in process.log.read_text()


@pytest.mark.slow
def test_max_feeds_holds_exactly_under_a_race_under_serve_workers(db_path, user):
    with running_server(db_path, 4, "--workers", "2", TIMESLOT_MAX_FEEDS="10") as (base, process):
        check_the_bound_holds(db_path, create_at_once(base, user), 10)
    assert "Traceback" not in process.log.read_text()


@pytest.mark.slow
def test_concurrent_creates_under_gunicorn_land_once_and_the_bound_holds(db_path, user, monkeypatch):
    """gunicorn with two worker processes of four threads, as operators run it."""
    monkeypatch.setitem(SERVERS, "gunicorn", lambda port: [
        str(BIN / "gunicorn"), "--workers", "2", "--threads", "4", "--worker-class", "gthread",
        "--bind", f"127.0.0.1:{port}", "timeslot_export:application"])
    with wsgi_server("gunicorn", db_path) as (port, log):
        base = f"http://127.0.0.1:{port}"
        check_each_lands_once(base, db_path, create_at_once(base, user))
        more = create_at_once(base, user, clients=100 - CLIENTS + 8)         # the default bound: 100 active feeds
        check_the_bound_holds(db_path, more, 100, before=CLIENTS)
        assert "Traceback" not in log.read_text()


# --- no secret, no token in the log ---------------------------------------------------------------------------

@pytest.mark.slow
def test_the_server_log_shows_no_secret_and_no_token(db_path, user):
    secrets_seen = []
    with running_server(db_path, 4, TIMESLOT_LOG_LEVEL="DEBUG") as (base, process):
        status, headers, body = request(base, "POST", "/v1/feeds", user, {"label": "Phone"})
        created = json.loads(body)
        secrets_seen.append(created["url"].rsplit("/", 1)[1][:-4])
        assert status == 201 and request(base, "GET", "/v1/feeds", user)[0] == 200
        for path in (f"/v1/feeds/{secrets_seen[0]}.ics", f"/v1/feeds/{secrets_seen[0]}"):
            assert request(base, "GET", path)[0] == 200
        status, _, body = request(base, "POST", f"/v1/feeds/{created['id']}/reset", user)
        reset = json.loads(body)
        secrets_seen.append(reset["url"].rsplit("/", 1)[1][:-4])
        assert status == 201
        assert request(base, "PATCH", f"/v1/feeds/{reset['id']}", user, {"label": "Tablet"})[0] == 200
        assert request(base, "DELETE", f"/v1/feeds/{reset['id']}", user)[0] == 204
        for secret in secrets_seen:
            assert request(base, "GET", f"/v1/feeds/{secret}.ics")[0] == 410
            assert request(base, "GET", f"/v1/feeds/{secret}")[0] == 410
    log = process.log.read_text()
    assert len(re.findall(r"INFO timeslot_export: (GET|POST|PATCH|DELETE) /v1/feeds", log)) >= 11, log
    for secret in secrets_seen:
        assert secret not in log and secret[:16] not in log
    assert user not in log
    assert "POST /v1/feeds 201" in log and "GET /v1/feeds/[secret].ics 200" in log
    assert "GET /v1/feeds/[secret] 200" in log and f"POST /v1/feeds/{created['id']}/reset 201" in log


# --- a database the service cannot write ----------------------------------------------------------------------

def unprivileged():
    """A command prefix under which file permissions hold: as root, setpriv drops the capabilities that let root
    write what it has no permission for (it stays root, so it can still read its Python); otherwise none."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to test a read-only database as root")
    capabilities = "-dac_override,-dac_read_search,-fowner"
    return (setpriv, f"--inh-caps={capabilities}", f"--bounding-set={capabilities}")


@contextlib.contextmanager
def read_only(db_path, what):
    """The database made unwritable for the server: the file itself, or (in rollback-journal mode, as a
    Litestream copy is) its directory, where SQLite cannot create its journal."""
    folder = Path(tempfile.mkdtemp(prefix="timeslot-read-only-"))
    copy = folder / "timeslot.sqlite3"
    with sqlite3.connect(db_path) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    if what == "directory":
        with sqlite3.connect(copy) as connection:
            connection.execute("PRAGMA journal_mode = DELETE")
    try:
        if what == "file":
            copy.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        else:
            folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        yield copy
    finally:
        folder.chmod(stat.S_IRWXU)
        copy.chmod(stat.S_IRUSR | stat.S_IWUSR)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_read_only_database_refuses_changes_and_keeps_exporting(data, db_path, user, what):
    feed_id, secret = data.feed(data.run("SELECT id FROM users").fetchone()[0])
    with read_only(db_path, what) as copy:
        before = stored(copy, "SELECT * FROM feeds")
        with running_server(copy, 4, prefix=unprivileged()) as (base, process):
            changes = [("POST", "/v1/feeds", {"label": "new"}), ("PATCH", f"/v1/feeds/{feed_id}", {"label": "x"}),
                       ("POST", f"/v1/feeds/{feed_id}/reset", None), ("DELETE", f"/v1/feeds/{feed_id}", None)]
            for method, path, body in changes:
                status, headers, answer = request(base, method, path, user, body)
                assert status == 503, (method, path, answer)
                assert json.loads(answer)["error"].startswith("feeds cannot be changed here: ")
                assert "read-only" in json.loads(answer)["error"]
                assert headers["Content-Type"] == "application/json; charset=utf-8"
            status, _, calendar = request(base, "POST", "/v1/export/ical", user)
            assert status == 200 and b"SUMMARY:Raced" in calendar
            assert request(base, "GET", f"/v1/feeds/{secret}.ics")[0] == 200
            assert request(base, "GET", f"/v1/feeds/{secret}")[0] == 200
            status, _, listing = request(base, "GET", "/v1/feeds", user)
            assert status == 200 and len(json.loads(listing)["feeds"]) == 1
        assert stored(copy, "SELECT * FROM feeds") == before
        log = process.log.read_text()
        assert "Traceback" not in log and log.count("feed change refused") == 4


def test_the_unprivileged_prefix_really_cannot_write_a_read_only_file(tmp_path):
    """The read-only tests above mean something only if the server under the prefix is refused."""
    path = tmp_path / "locked.txt"
    path.write_text("kept")
    path.chmod(stat.S_IRUSR)
    code = f"open({str(path)!r}, 'w')"
    result = subprocess.run([*unprivileged(), sys.executable, "-c", code], capture_output=True)
    assert result.returncode != 0 and b"PermissionError" in result.stderr
    assert path.read_text() == "kept"
