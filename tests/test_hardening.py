"""Hardening: concurrency, faults while serving, hostile input, security of logs and parameters.

The load, fault and fuzz tests are marked slow (make quick-test leaves them out); make test runs them.
Servers listen on 127.0.0.1 only, on a free port, and are always stopped."""

import contextlib
import io
import json
import logging
import os
import random
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import timeslot_export
from conftest import auth, make_client, wsgi_call
from test_cli import ROOT, free_port

EXPORT = "/v1/export/ical"
ALLOWED_STATUSES = {200, 204, 304, 400, 401, 404, 405, 410, 413, 415, 422}


@contextlib.contextmanager
def running_server(db_path, threads=16, *options, prefix=(), **env):
    """`serve` (with ``options``, started through the command ``prefix`` if any) in a subprocess on a free
    127.0.0.1 port; yields (base URL, process); always stopped.

    Its log goes to a file, ``process.log`` (a pipe nobody reads would fill and block the server); its
    first line on stdout is ``process.ready_line``."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMESLOT_")}
    environment.update({"PYTHONPATH": str(ROOT), **env})
    log = Path(db_path).with_name(f"serve-{port}.log")
    with open(log, "wb") as log_file:
        command = [*prefix, sys.executable, "-m", "timeslot_export", "serve", "--db", str(db_path), "--port", str(port),
                   "--threads", str(threads), *options]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file, env=environment)
    process.log = log
    try:
        process.ready_line = process.stdout.readline().decode()
        assert "Serving" in process.ready_line
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fetch(url, token=None, method="POST", timeout=30):
    """(status, headers, body) of one request; HTTP errors are answers too."""
    headers = auth(token) if token else {}
    request = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


# --- concurrency --------------------------------------------------------------------------------------------

# Each transaction inserts a slot, soft-deletes the oldest visible one (20 stay visible) and renames all
# of them to the transaction's generation: a body that mixed two transactions would show it.
WRITER = """
import sqlite3, sys, time, uuid
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
generation = 0
deadline = time.time() + float(sys.argv[2])
while time.time() < deadline:
    generation += 1
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO slots (uuid, creator_id, title, start_at) VALUES (?, 1, 'x', '2030-01-01T00:00:00Z')",
               (str(uuid.uuid4()),))
    db.execute("UPDATE slots SET deleted_at = '2020-01-01T00:00:00Z' WHERE id = "
               "(SELECT min(id) FROM slots WHERE creator_id = 1 AND deleted_at IS NULL)")
    db.execute("UPDATE slots SET title = ? WHERE creator_id = 1 AND deleted_at IS NULL", (f"generation {generation}",))
    db.execute("COMMIT")
    time.sleep(0.003)
print(generation, flush=True)
"""


@pytest.mark.slow
def test_64_clients_while_another_process_writes(data, db_path):
    """Every request answered, no 5xx, and each body one snapshot: a writer renames all slots in each of its
    transactions, so a body that mixed two transactions would show two generations."""
    user_id, token = data.user("load")
    for n in range(20):
        data.slot(user_id, title="generation 0", start_at=f"2020-01-01T00:00:{n:02d}Z")
    statuses, mixed, lock = {}, [], threading.Lock()
    with running_server(db_path) as (base, server):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path), "120"], stdout=subprocess.PIPE)

        def client():
            for _ in range(50):
                try:
                    status, _, body = fetch(base + EXPORT, token)
                except OSError as error:           # a refused or dropped connection is a failure, not a crash
                    status, body = repr(error), b""
                titles = set(re.findall(rb"SUMMARY:(generation \d+)", body))
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status != 200 or len(titles) != 1 or body.count(b"BEGIN:VEVENT") != 20 \
                            or not body.endswith(b"END:VCALENDAR\r\n"):
                        mixed.append((status, titles, body[-40:]))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        writer.terminate()
        writer.wait()
        with contextlib.closing(sqlite3.connect(db_path)) as db:
            generations = db.execute("SELECT count(*) FROM slots").fetchone()[0] - 20
    print(f"load: {sum(statuses.values())} requests in {elapsed:.1f} s, statuses {statuses}, "
          f"{generations} write transactions meanwhile")
    assert generations > 100
    assert statuses == {200: 64 * 50}
    assert mixed == []


def test_lock_outlasting_the_busy_timeout_is_503_with_retry_after(db_path, data):
    user_id, token = data.user()
    data.run("PRAGMA journal_mode = DELETE")        # in WAL mode readers never wait; a rollback journal blocks
    locker = sqlite3.connect(db_path, isolation_level=None)
    client = make_client(db_path, busy_timeout_ms=100)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        response = client.post(EXPORT, headers=auth(token), status=503)
        assert response.json["error"] == "database unavailable" and response.headers["Retry-After"] == "2"
        assert response.json["request_id"] == response.headers["X-Request-Id"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    client.post(EXPORT, headers=auth(token), status=200)


def test_busy_timeout_is_configurable_from_the_environment():
    assert timeslot_export.Config.from_environ({"TIMESLOT_BUSY_TIMEOUT_MS": "250"}).busy_timeout_ms == 250
    with pytest.raises(timeslot_export.ConfigError, match="TIMESLOT_BUSY_TIMEOUT_MS"):
        timeslot_export.Config.from_environ({"TIMESLOT_BUSY_TIMEOUT_MS": "soon"})


# --- faults while serving -----------------------------------------------------------------------------------

def remove_database(path):
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")


def snapshot(db_path, target):
    """A consistent copy of the database (SQLite's backup API), for putting back later."""
    with contextlib.closing(sqlite3.connect(db_path)) as source, contextlib.closing(sqlite3.connect(target)) as copy:
        source.backup(copy)             # (a bare `with connect()` only commits: it would leave both open)


@pytest.fixture
def backed_up(tmp_path, db_path, data):
    """A user with one slot titled 'Survivor', the writer closed, and a backup copy: (token, backup path)."""
    user_id, token = data.user()
    data.slot(user_id, title="Survivor")
    data.db.close()
    backup = tmp_path / "backup.sqlite3"
    snapshot(db_path, backup)
    return token, backup


def test_database_removed_then_restored_recovers_without_restart(db_path, backed_up):
    token, backup = backed_up
    client = make_client(db_path)
    assert b"Survivor" in client.post(EXPORT, headers=auth(token)).body
    remove_database(db_path)
    response = client.post(EXPORT, headers=auth(token), status=503)
    assert response.json["request_id"] == response.headers["X-Request-Id"] and "Retry-After" in response.headers
    shutil.copy(backup, db_path)
    assert b"Survivor" in client.post(EXPORT, headers=auth(token)).body


def replacement_of(tmp_path, db_path, title):
    replacement = tmp_path / "new.sqlite3"
    snapshot(db_path, replacement)
    with contextlib.closing(sqlite3.connect(replacement, isolation_level=None)) as db:
        db.execute("UPDATE slots SET title = ?", (title,))
    return replacement


def test_database_replaced_serves_the_new_file_without_restart(tmp_path, db_path, data):
    user_id, token = data.user()
    data.slot(user_id, title="Old file")
    data.db.close()
    client = make_client(db_path)
    assert b"Old file" in client.post(EXPORT, headers=auth(token)).body
    replacement = replacement_of(tmp_path, db_path, "New file")
    remove_database(db_path)                         # the old file's -wal and -shm go with it
    os.replace(replacement, db_path)                 # a restore or replica swap: a new inode
    body = client.post(EXPORT, headers=auth(token)).body
    assert b"New file" in body and b"Old file" not in body


@pytest.mark.parametrize("damage", [b"garbage" * 1000, b"", b"SQLite format 3\x00" + b"\xff" * 4000])
def test_database_corrupted_then_repaired_recovers(db_path, backed_up, damage):
    token, backup = backed_up
    client = make_client(db_path)
    client.post(EXPORT, headers=auth(token), status=200)
    remove_database(db_path)
    Path(db_path).write_bytes(damage)
    response = client.post(EXPORT, headers=auth(token), expect_errors=True)
    assert response.status_int in (500, 503)
    assert response.json["request_id"] == response.headers["X-Request-Id"]
    assert b"Traceback" not in response.body
    remove_database(db_path)
    shutil.copy(backup, db_path)
    assert b"Survivor" in client.post(EXPORT, headers=auth(token)).body


@pytest.mark.slow
def test_serve_recovers_from_a_removed_database_and_reports_the_time(db_path, backed_up):
    token, backup = backed_up
    with running_server(db_path, threads=4) as (base, server):
        assert fetch(base + EXPORT, token)[0] == 200
        remove_database(db_path)
        status, headers, body = fetch(base + EXPORT, token)
        assert status == 503 and json.loads(body)["error"] == "database unavailable"
        shutil.copy(backup, db_path)
        restored = time.perf_counter()
        while fetch(base + EXPORT, token)[0] != 200:
            assert time.perf_counter() - restored < 10
            time.sleep(0.01)
        print(f"recovered {1000 * (time.perf_counter() - restored):.1f} ms after the file was restored")
        assert server.poll() is None


@pytest.mark.slow
def test_client_disconnecting_mid_download_frees_its_snapshot(db_path, data):
    user_id, token = data.user()
    data.run("BEGIN")
    for n in range(3000):
        data.slot(user_id, title=f"Slot {n}", description="long text " * 50)
    data.run("COMMIT")
    with running_server(db_path, threads=2) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"GET {EXPORT} HTTP/1.1\r\nHost: x\r\nAuthorization: Token token={token}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        deadline = time.time() + 10
        checkpoint = sqlite3.connect(db_path, isolation_level=None)
        while checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] != 0:
            assert time.time() < deadline, "the server still holds the aborted export's read snapshot"
            time.sleep(0.05)
        checkpoint.close()
        assert fetch(base + EXPORT, token)[0] == 200 and server.poll() is None


def test_serve_refuses_a_directory_as_database(tmp_path):
    from test_cli import cli, one_line_error
    assert "database unavailable" in one_line_error(cli("serve", "--db", str(tmp_path), "--port", "0"))


# --- hostile input ------------------------------------------------------------------------------------------

METHODS = ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE", "PATCH", "TRACE", "CONNECT", "get", "", "G\x00T",
           "X" * 300, "PROPFIND", "POST "]
PATHS = ["/v1/export/ical", "/v1/export/ical/", "/v1/export/../export/ical", "/v1/export/./ical", "//v1/export/ical",
         "/v1/feeds/abc.ics", "/v1/feeds/../export/ical", "/../../etc/passwd", "/v1/export/ical\x00", "/%2e%2e/",
         "/v1/export/ical%20", "/v1/feeds/" + "A" * 43 + ".ics", "/v1/feeds/" + "A" * 43 + ".ics/", "/" + "a" * 9000,
         "/v1/export/ical\r\nX-Evil: 1", "/\u00fc\u00ff", "/v1/feeds/\x00\x01.ics", "", "*", "/v1/export/ICAL"]
BODIES = [b"", b"{}", b'{"group": null}', b'{"group": "%s"}', b'{"group": "%s", "group": "%s"}', b"[" * 70000,
          b"[" * 20000 + b"]" * 20000, b'{"group": ' + b"9" * 5000 + b"}", b'{"group": 1e999999}', b"\xff\xfe\x00",
          b"group=%s", b"group=%ff%fe", b"group=" + b"a&group=" * 200, b"\x00" * 100, b"x" * 65536, b"x" * 65537,
          b'{"group": "\\ud800"}', b'{"a": {"group": 1}}', b"null", b"1", b'"x"', b'{"group": "\x00"}',
          b"' OR 1=1; DROP TABLE slots; --"]
CONTENT_TYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", "", "application/json; charset=latin-1",
                 "application/json; charset=utf-8", "multipart/form-data; boundary=x", "\x00", "a" * 5000]
HEADER_VALUES = ["", "x", "\x00", "\xff" * 10, "a" * 10000, "W/\"x\", *", "gzip;q=nan", "text/calendar;q=inf", "\u00e9",
                 "Token token=", 'Token token="', "Bearer " + "a" * 5000, "' OR 1=1 --"]


def hostile_environ(generator, token, group):
    method = generator.choice(["GET", "POST", "HEAD"] * 3 + METHODS)
    body = generator.choice(BODIES)
    if b"%s" in body:
        body = body.replace(b"%s", generator.choice([group, group.upper(), "x", "00000000-0000-0000-0000-000000000000",
                                                     "' OR '1'='1"]).encode())
    length = generator.choice(["exact", "exact", "short", "long", "garbage", "missing", "negative", "huge"])
    content_length = {"exact": str(len(body)), "short": str(max(0, len(body) - 3)), "long": str(len(body) + 7),
                      "garbage": generator.choice(["abc", "1.5", " ", "0x10", "\u0661"]), "missing": None,
                      "negative": "-5", "huge": "9" * 30}[length]
    path = generator.choice([EXPORT, EXPORT, EXPORT, "/v1/feeds/" + "A" * 43 + ".ics", generator.choice(PATHS)])
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "PATH_INFO": path,
               "QUERY_STRING": generator.choice(["", f"group={group}", "group=a&group=b", "group=%ff", "x=" + "y&x=" * 500,
                                                 "group=%00", "group=" + "%" * 100]),
               "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
               "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO(), "wsgi.multithread": False, "wsgi.multiprocess": False,
               "wsgi.run_once": False, "CONTENT_TYPE": generator.choice(CONTENT_TYPES)}
    if content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    if generator.random() < 0.6:
        environ["HTTP_AUTHORIZATION"] = generator.choice([f"Token token={token}", f"Bearer {token}",
                                                          generator.choice(HEADER_VALUES)])
    for name in generator.sample(["HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING", "HTTP_IF_NONE_MATCH", "HTTP_ORIGIN",
                                  "HTTP_X_REQUEST_ID", "HTTP_X_" + "Z" * 500, "HTTP_\x00", "HTTP_COOKIE"],
                                 generator.randrange(0, 5)):
        environ[name] = generator.choice(HEADER_VALUES + [token, "https://app.example.org"])
    return environ


def check_answer(environ, status, headers, body):
    code = int(status.split()[0])
    assert code in ALLOWED_STATUSES, (code, environ["REQUEST_METHOD"], environ["PATH_INFO"][:50], body[:200])
    assert b"Traceback" not in body and b"File \"" not in body
    for name, value in headers:
        assert "\r" not in value and "\n" not in value
    if code >= 400:
        assert dict(headers)["Content-Type"] == "application/json; charset=utf-8"
        if environ["REQUEST_METHOD"] != "HEAD":          # HEAD answers carry no body
            assert set(json.loads(body)) <= {"error", "request_id"}
    return code


@pytest.mark.slow
def test_ten_thousand_hostile_requests_never_crash_the_app(data, db_path, caplog):
    user_id, token = data.user("target")
    group_id, group = data.group(user_id)
    data.slot(user_id, title="Target", groups=[group_id])
    data.feed(user_id, secret="A" * 43)
    app = timeslot_export.make_app(str(db_path), cors_origins=("https://app.example.org",))
    generator = random.Random(3333)
    seen = {}
    for _ in range(10_000):
        environ = hostile_environ(generator, token, group)
        answer = {}
        result = app(environ, lambda status, headers, exc_info=None: answer.update(status=status, headers=headers))
        try:
            body = b"".join(result)
        finally:
            result.close()
        code = check_answer(environ, answer["status"], answer["headers"], body)
        seen[code] = seen.get(code, 0) + 1
    print(f"hostile: statuses {dict(sorted(seen.items()))}")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(seen) >= 8, seen                      # the generator reached most of the code paths
    assert make_client(db_path).post(EXPORT, headers=auth(token)).status_int == 200


def raw_exchange(port, request_bytes, timeout=10):
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request_bytes)
            sock.shutdown(socket.SHUT_WR)        # a body shorter than its Content-Length ends here
        except OSError:
            pass                                 # the server may answer (414, 400) and close before reading it all
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


@pytest.mark.slow
def test_hostile_bytes_on_the_wire_leave_serve_up(data, db_path):
    user_id, token = data.user("wire")
    data.slot(user_id, title="Still here")
    generator = random.Random(4444)
    lines = [b"GET /v1/export/ical HTTP/1.1", b"POST /v1/export/ical HTTP/1.0", b"GARBAGE", b"GET / HTTP/9.9",
             b"GET /" + b"a" * 70000 + b" HTTP/1.1", b"\x00\x01\x02", b"GET /v1/export/ical?group=%ff HTTP/1.1",
             b"POST /v1/export/ical HTTP/1.1", b"GET /v1/feeds/../export/ical HTTP/1.1", b""]
    seen = {}
    with running_server(db_path, threads=4) as (base, server):
        port = int(base.rsplit(":", 1)[1])
        for _ in range(300):
            body = generator.choice([b"", b'{"group": null}', b"\xff" * 100, b"x" * 70000, b"[" * 60000])
            length = generator.choice([len(body), len(body) + 50, max(0, len(body) - 1), 10 ** 12])
            headers = [b"Host: 127.0.0.1", b"Content-Type: application/json", b"Content-Length: %d" % length]
            if generator.random() < 0.5:
                headers.append(f"Authorization: Token token={token}".encode())
            if generator.random() < 0.2:
                headers.append(b"X-Long: " + b"v" * 70000)
            if generator.random() < 0.2:
                headers.append(b"Bad header without colon \xff")
            request = generator.choice(lines) + b"\r\n" + b"\r\n".join(headers) + b"\r\n\r\n" + body
            answer = raw_exchange(port, request)
            match = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
            code = int(match.group(1)) if match else 0
            seen[code] = seen.get(code, 0) + 1
            assert code != 500 and b"Traceback" not in answer
        print(f"wire: statuses {dict(sorted(seen.items()))}")
        assert server.poll() is None
        status, _, body = fetch(base + EXPORT, token)
        assert status == 200 and b"Still here" in body
    errors = server.log.read_text()
    assert "Traceback" not in errors and token not in errors


# --- security -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["' OR '1'='1", "1; DROP TABLE slots", "\" OR \"\"=\"", "%' --", "*", "\\x00"])
def test_sql_metacharacters_are_harmless_everywhere(client, data, db_path, value):
    user_id, token = data.user()
    data.slot(user_id, title="Mine")
    client.post_json(EXPORT, {"group": value}, headers=auth(token), status=422)
    client.get(EXPORT, params={"group": value}, headers=auth(token), status=422)
    client.post(EXPORT, headers={"Authorization": f"Token token={value}"}, status=401)
    client.get("/v1/feeds/" + value.replace("/", "") + ".ics", status=404)
    assert b"Mine" in client.post(EXPORT, headers=auth(token)).body
    assert sqlite3.connect(db_path).execute("SELECT count(*) FROM slots").fetchone() == (1,)


def test_stored_values_cannot_reach_response_headers(client, data):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id, name="Evil\r\nSet-Cookie: x=1")
    data.slot(user_id, title="\r\nSet-Cookie: y=2", groups=[group_id])
    response = client.post_json(EXPORT, {"group": group_uuid}, headers=auth(token))
    assert "Set-Cookie" not in response.headers
    assert response.headers["Content-Disposition"] == f'attachment; filename="{group_uuid}.ical"'


def test_header_values_with_line_breaks_are_refused_at_the_one_place_that_sends():
    app = timeslot_export.make_app("unused.sqlite3")
    request = timeslot_export.Request({"REQUEST_METHOD": "GET", "PATH_INFO": "/"})
    response = timeslot_export.Response(timeslot_export.HTTPStatus.OK, [("X-Test", "a\r\nb: c")])
    with pytest.raises(ValueError, match="line break"):
        app._send(request, response, lambda status, headers: None, time.perf_counter())


# --- logging ------------------------------------------------------------------------------------------------

ACCESS_LINE = re.compile(r"(\S+) (\S+) (\d{3}) (\d+)B (\d+\.\d{6})s id=(\S+)( aborted)?")


def test_one_access_line_per_request_with_the_fields(client, data, caplog):
    caplog.set_level(logging.INFO, logger="timeslot_export")
    user_id, token = data.user()
    data.slot(user_id)
    ok = client.post(EXPORT, headers={**auth(token), "X-Request-Id": "abc-1"})
    client.get("/nowhere", headers={"X-Request-Id": "abc-2"}, status=404)
    lines = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert len(lines) == 2
    first = ACCESS_LINE.fullmatch(lines[0])
    assert first.group(1, 2, 3, 6) == ("POST", EXPORT, "200", "abc-1") and int(first.group(4)) == len(ok.body)
    assert ACCESS_LINE.fullmatch(lines[1]).group(1, 2, 3, 6) == ("GET", "/nowhere", "404", "abc-2")
    assert token not in caplog.text


def test_client_text_cannot_forge_log_lines(db_path, caplog):
    caplog.set_level(logging.INFO, logger="timeslot_export")
    status, _, body = wsgi_call(timeslot_export.make_app(str(db_path)), PATH_INFO="/x\nFAKE 200 line")
    body.close()
    assert status.startswith("404")
    assert [record.getMessage() for record in caplog.records if "\n" in record.getMessage()] == []
    assert "\\nFAKE" in caplog.text


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR", "warning"])
def test_log_level_comes_from_the_environment(level):
    assert timeslot_export.Config.from_environ({"TIMESLOT_LOG_LEVEL": level}).log_level == level


def test_invalid_log_level_stops_start_up():
    with pytest.raises(timeslot_export.ConfigError, match="TIMESLOT_LOG_LEVEL"):
        timeslot_export.Config.from_environ({"TIMESLOT_LOG_LEVEL": "LOUD"})


@pytest.mark.slow
def test_serve_logs_access_lines_at_info_and_not_at_warning(data, db_path):
    user_id, token = data.user()
    for level, expected in (("INFO", True), ("WARNING", False)):
        with running_server(db_path, threads=2, TIMESLOT_LOG_LEVEL=level) as (base, server):
            fetch(base + EXPORT, token)
            fetch(base + "/v1/feeds/" + "S" * 43 + ".ics", method="GET")
        errors = server.log.read_text()
        assert (f"POST {EXPORT} 200" in errors) is expected, errors
        assert token not in errors and "S" * 43 not in errors


# --- client faults are not server errors (SPEC §3) -----------------------------------------------------------

class FailingInput:
    """A wsgi.input whose client stalls (the server's read timeout) or resets the connection mid-body."""

    def __init__(self, error):
        self.error = error

    def read(self, *size):
        raise self.error

    readline = read

    def readlines(self, *hint):
        raise self.error

    def __iter__(self):
        raise self.error


@pytest.mark.parametrize("error, status", [(socket.timeout("timed out"), "408 Request Timeout"),
                                           (ConnectionResetError(104, "Connection reset by peer"), "400 Bad Request"),
                                           (BrokenPipeError(32, "Broken pipe"), "400 Bad Request")])
@pytest.mark.parametrize("length", ["100", ""])
def test_a_body_that_stalls_or_breaks_is_a_client_fault_not_a_500(data, db_path, caplog, error, status, length):
    _, token = data.user()
    app = timeslot_export.make_app(str(db_path))
    with caplog.at_level(logging.INFO, logger="timeslot_export"):
        answer, headers, body = wsgi_call(app, validate=False, REQUEST_METHOD="POST", CONTENT_LENGTH=length,
                                          CONTENT_TYPE="application/json", HTTP_AUTHORIZATION=f"Token token={token}",
                                          **{"wsgi.input": FailingInput(error), "wsgi.input_terminated": True})
        payload = b"".join(body)
        body.close()
    assert answer == status and headers["Content-Type"] == "application/json; charset=utf-8"
    assert "error" in json.loads(payload) and "request_id" not in json.loads(payload)
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR or record.exc_info]
    access = [record.getMessage() for record in caplog.records if record.getMessage().startswith("POST ")]
    assert len(access) == 1 and f" {status[:3]} " in access[0]


def test_a_client_resetting_the_connection_mid_body_is_logged_as_400_by_serve(data, db_path):
    _, token = data.user()
    with running_server(db_path) as (base, process):
        port = int(base.rsplit(":", 1)[1])
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(f"POST /v1/export/ical HTTP/1.1\r\nHost: x\r\nAuthorization: Token token={token}\r\n"
                                   "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"gr".encode())
                time.sleep(0.2)
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        assert fetch(f"{base}{EXPORT}", token)[0] == 200            # and the server goes on
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process.log.read_text().count(" 400 ") < 3:
            time.sleep(0.1)
        log = process.log.read_text()
    assert log.count("POST /v1/export/ical 400 ") == 3, log
    assert "Traceback" not in log and " 500 " not in log and "export failed" not in log
