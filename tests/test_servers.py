"""SPEC §6: the module runs unchanged under real WSGI servers, started here as their operators start them
(`timeslot_export:application`, configured by TIMESLOT_* variables), and answers as it does in process:
gunicorn (gthread), waitress and uWSGI (the pyuwsgi wheel), each on 127.0.0.1 and always stopped."""

import contextlib
import gzip
import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import auth, make_client
from test_cli import ROOT, free_port

EXPORT = "/v1/export/ical"
BIN = Path(sys.executable).parent

SERVERS = {
    "gunicorn": lambda port: [str(BIN / "gunicorn"), "--workers", "1", "--threads", "4", "--worker-class", "gthread",
                              "--bind", f"127.0.0.1:{port}", "timeslot_export:application"],
    "waitress": lambda port: [str(BIN / "waitress-serve"), "--threads=4", f"--listen=127.0.0.1:{port}",
                              "timeslot_export:application"],
    "uwsgi": lambda port: [str(BIN / "uwsgi"), "--http", f"127.0.0.1:{port}", "--module", "timeslot_export:application",
                           "--master", "--processes", "1", "--threads", "4", "--die-on-term", "--need-app",
                           "--disable-logging"],
}


@contextlib.contextmanager
def wsgi_server(name, db_path):
    """One real server on a free port, serving the module's ``application`` over ``db_path``; always stopped."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMESLOT_")}
    environment.update({"PYTHONPATH": ROOT, "TIMESLOT_DB": str(db_path), "TIMESLOT_LOG_LEVEL": "WARNING"})
    log = Path(db_path).with_name(f"{name}-{port}.log")
    with open(log, "wb") as log_file:
        process = subprocess.Popen(SERVERS[name](port), cwd=ROOT, env=environment, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield port, log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def ask(port, method, path, headers=None, body=None):
    """(status, headers (case-insensitive: waitress sends "Etag"), body) of one request on a fresh connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SERVERS))
def test_the_same_answers_under_each_wsgi_server(name, data, db_path):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id, name="Work")
    for number in range(900):                           # well past 64 KiB: the body streams
        data.slot(user_id, title=f"Slot {number} \u00e9\u00e8, with; text", start_at=f"2026-12-01T08:{number % 60:02d}:00Z",
                  time_zone=("Europe/Berlin", "", "America/New_York")[number % 3],
                  rrule="FREQ=WEEKLY;COUNT=4" if number % 4 == 0 else "", alerts=[10] if number % 5 == 0 else [],
                  groups=[group_id] if number % 20 == 0 else [])        # the group's export is small: sent whole
    _, secret = data.feed(user_id)
    local = make_client(db_path)
    expected = local.post(EXPORT, headers=auth(token))
    expected_group = local.post_json(EXPORT, {"group": group_uuid}, headers=auth(token))
    expected_feed = local.get(f"/v1/feeds/{secret}.ics")
    assert len(expected.body) > 64 * 1024
    with wsgi_server(name, db_path) as (port, log):
        status, headers, body = ask(port, "POST", EXPORT, auth(token))
        assert (status, body, headers["ETag"]) == (200, expected.body, expected.headers["ETag"]), log.read_text()
        assert headers["Content-Type"] == "application/octet-stream"
        status, headers, body = ask(port, "POST", EXPORT, {**auth(token), "Content-Type": "application/json"},
                                    f'{{"group": "{group_uuid}"}}'.encode())
        assert (status, body) == (200, expected_group.body)
        assert headers["Content-Length"] == str(len(body)) and len(body) < 64 * 1024
        status, headers, body = ask(port, "GET", EXPORT, {**auth(token), "Accept-Encoding": "gzip"})
        assert status == 200 and headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == expected.body
        status, headers, body = ask(port, "GET", EXPORT, {**auth(token), "If-None-Match": expected.headers["ETag"]})
        assert (status, body) == (304, b"") and "Content-Type" not in headers
        status, headers, body = ask(port, "HEAD", EXPORT, auth(token))
        assert (status, body) == (200, b"") and headers["ETag"] == expected.headers["ETag"]
        status, headers, body = ask(port, "GET", f"/v1/feeds/{secret}.ics")
        assert (status, body) == (200, expected_feed.body)
        assert headers["Content-Type"] == "text/calendar; charset=utf-8"
        status, headers, body = ask(port, "DELETE", EXPORT, auth(token))
        assert status == 405 and headers["Allow"] == "GET, HEAD, POST, OPTIONS"
        status, headers, body = ask(port, "POST", EXPORT)
        assert status == 401 and headers["WWW-Authenticate"] == 'Token realm="Application"'
        status, headers, body = ask(port, "GET", "/nowhere")
        assert (status, body) == (404, b'{"error": "not found"}')
        assert "Traceback" not in log.read_text()
