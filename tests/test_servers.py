"""SPEC §6: the module runs unchanged under real WSGI servers, started here as their operators start them
(`timeslot_export:application`, configured by TIMESLOT_* variables), and answers as it does in process:
gunicorn (gthread), waitress, uWSGI (the pyuwsgi wheel) and Apache's mod_wsgi (Debian's apache2 and
libapache2-mod-wsgi-py3, which .ci/run installs), each on 127.0.0.1 and always stopped."""

import contextlib
import gzip
import http.client
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
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


APACHE = Path("/usr/sbin/apache2")
MODULES = Path("/usr/lib/apache2/modules")

# What docs/production.md shows for mod_wsgi: its SetEnv does not reach os.environ, so a .wsgi file sets the
# variables and imports the module's application.
WSGI_FILE = """import os, sys
os.environ["TIMESLOT_DB"] = {db!r}
os.environ["TIMESLOT_LOG_LEVEL"] = "WARNING"
sys.path.insert(0, {site!r})
from timeslot_export import application
"""

HTTPD_CONF = """ServerRoot {site}
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile {site}/httpd.pid
DefaultRuntimeDir {site}
ErrorLog {site}/error.log
LogLevel warn
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule wsgi_module {modules}/mod_wsgi.so
{user}
WSGISocketPrefix {site}/wsgi
WSGIDaemonProcess timeslot threads=8 display-name=timeslot
WSGIProcessGroup timeslot
WSGIApplicationGroup %{{GLOBAL}}
WSGIPassAuthorization On
WSGIScriptAlias / {site}/timeslot.wsgi
<Directory {site}>
    Require all granted
</Directory>
"""


def apache_with_mod_wsgi(port, db_path):
    """Apache in the foreground with mod_wsgi, from a site folder that its www-data children can read (the
    module and a copy of the database are placed there); returns (command, the site folder)."""
    if not (APACHE.exists() and (MODULES / "mod_wsgi.so").exists()):
        message = "Debian's apache2 and libapache2-mod-wsgi-py3 are not installed (.ci/run installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    site = Path(tempfile.mkdtemp(prefix="timeslot-mod-wsgi-"))
    site.chmod(0o777)                                   # the children create the database's -shm here
    shutil.copy(Path(ROOT) / "timeslot_export.py", site)
    with sqlite3.connect(db_path) as source, sqlite3.connect(site / "timeslot.sqlite3") as copy:
        source.backup(copy)
    (site / "timeslot.wsgi").write_text(WSGI_FILE.format(db=str(site / "timeslot.sqlite3"), site=str(site)))
    user = "User www-data\nGroup www-data" if os.geteuid() == 0 else ""
    (site / "httpd.conf").write_text(HTTPD_CONF.format(site=site, port=port, modules=MODULES, user=user))
    for path in site.iterdir():
        path.chmod(0o666)
    return [str(APACHE), "-f", str(site / "httpd.conf"), "-DFOREGROUND"], site


@contextlib.contextmanager
def wsgi_server(name, db_path):
    """One real server on a free port, serving the module's ``application`` over ``db_path``; always stopped."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMESLOT_")}
    environment.update({"PYTHONPATH": ROOT, "TIMESLOT_DB": str(db_path), "TIMESLOT_LOG_LEVEL": "WARNING"})
    log = Path(db_path).with_name(f"{name}-{port}.log")
    site = None
    if name == "mod_wsgi":
        command, site = apache_with_mod_wsgi(port, db_path)
        log = site / "error.log"
    else:
        command = SERVERS[name](port)
    with open(Path(db_path).with_name(f"{name}-{port}.out"), "wb") as output:
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        if name != "mod_wsgi":
            log = Path(output.name)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            assert process.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
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
        if site is not None:
            shutil.rmtree(site, ignore_errors=True)


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
@pytest.mark.parametrize("name", sorted(SERVERS) + ["mod_wsgi"])
def test_the_same_answers_under_each_wsgi_server(name, data, db_path):
    user_id, token = data.user()
    group_id, group_uuid = data.group(user_id, name="Work")
    for number in range(900):                           # well past 64 KiB: the body streams
        data.slot(user_id, title=f"Slot {number} \u00e9\u00e8, with; text",
                  start_at=f"2026-12-01T08:{number % 60:02d}:00Z",
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
