"""SPEC §5 and §6: the command line, the console script, `serve`, and the standard-library-only rule."""

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import timeslot_export
from conftest import auth, make_client

ROOT = Path(__file__).resolve().parent.parent


def cli(*arguments, env=None, cwd=None, timeout=30):
    """Run `python -m timeslot_export` as a user would; returns the CompletedProcess (bytes)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMESLOT_")}
    environment.update(env or {})
    environment["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "timeslot_export", *arguments], capture_output=True,
                          env=environment, cwd=cwd or ROOT, timeout=timeout)


def one_line_error(result):
    """The process failed with exactly one line on stderr and no traceback."""
    assert result.returncode != 0
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in lines[0]
    return lines[0]


def token_from(output):
    return next(line.split(": ", 1)[1] for line in output.decode().splitlines() if line.startswith("API token: "))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_module_imports_only_the_standard_library():
    code = ("import sys, timeslot_export; "
            "extra = sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) "
            "- {'timeslot_export', '__main__'}); print(','.join(m for m in extra if not m.startswith('_')))")
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, cwd=ROOT, check=True)
    assert result.stdout.strip() == b""


APPLICATION_PROBE = """
import io, sys, timeslot_export
from wsgiref.util import setup_testing_defaults
from wsgiref.validate import validator
app = vars(timeslot_export)["application"]      # where uWSGI and mod_wsgi look for it (no module __getattr__)
for _ in range(2):
    environ = {"REQUEST_METHOD": "POST", "SCRIPT_NAME": "", "PATH_INFO": "/v1/export/ical", "QUERY_STRING": "",
               "HTTP_AUTHORIZATION": sys.argv[1],
               "wsgi.input": io.BytesIO(b"")}
    setup_testing_defaults(environ)
    statuses = []
    body = validator(app)(environ, lambda status, headers, exc_info=None: statuses.append(status) or (lambda d: None))
    print(statuses[0], b"".join(body).count(b"BEGIN:VEVENT"))
    body.close()
try:
    print(app.build().config.refresh_minutes)
except timeslot_export.ConfigError:
    print("refused")
"""


def test_module_application_is_configured_from_the_environment(data, db_path):
    user_id, token = data.user()
    data.slot(user_id)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMESLOT_")}
    environment.update({"PYTHONPATH": str(ROOT), "TIMESLOT_DB": str(db_path), "TIMESLOT_REFRESH_MINUTES": "30"})
    result = subprocess.run([sys.executable, "-c", APPLICATION_PROBE, f"Token token={token}"], capture_output=True,
                            env=environment, cwd=ROOT)
    assert result.stdout.split() == [b"200", b"OK", b"1"] * 2 + [b"30"], result.stderr
    assert b"POST /v1/export/ical 200" in result.stderr       # its own access log, on stderr by default
    environment["TIMESLOT_REFRESH_MINUTES"] = "0"
    result = subprocess.run([sys.executable, "-c", APPLICATION_PROBE, "x"], capture_output=True, env=environment,
                            cwd=ROOT)
    # A server that imported the module keeps running: each request says so, and the log says what is wrong.
    assert result.stdout.split() == [b"500", b"Internal", b"Server", b"Error", b"0"] * 2 + [b"refused"], result.stderr
    assert result.stderr.count(b"configuration error: TIMESLOT_REFRESH_MINUTES must be a whole number") == 2
    assert b"Traceback" not in result.stderr


def test_importing_the_module_reads_no_environment():
    code = "import os; os.environ['TIMESLOT_REFRESH_MINUTES'] = 'bad'; import timeslot_export; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT)
    assert result.stdout.strip() == b"ok"


def test_initdb_creates_the_schema_and_is_idempotent(tmp_path):
    path = tmp_path / "new.sqlite3"
    assert cli("initdb", "--db", str(path)).returncode == 0
    db = sqlite3.connect(path)
    db.execute("INSERT INTO users (uuid, username) VALUES ('00000000-0000-4000-8000-000000000001', 'kept')")
    db.commit()
    db.close()
    assert cli("initdb", "--db", str(path)).returncode == 0
    assert sqlite3.connect(path).execute("SELECT username FROM users").fetchall() == [("kept",)]
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)  # readers never wait


def test_initdb_adds_missing_tables_to_an_existing_database(tmp_path, db_path):
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO users (uuid, username) VALUES ('00000000-0000-4000-8000-000000000001', 'kept')")
    db.execute("DROP TABLE feeds")
    db.commit()
    assert cli("initdb", "--db", str(db_path)).returncode == 0
    tables = {row[0] for row in sqlite3.connect(db_path).execute("SELECT name FROM sqlite_master")}
    assert "feeds" in tables
    assert sqlite3.connect(db_path).execute("SELECT username FROM users").fetchall() == [("kept",)]


def test_db_defaults_to_the_environment_then_the_working_directory(tmp_path):
    path = tmp_path / "from-env.sqlite3"
    assert cli("initdb", env={"TIMESLOT_DB": str(path)}).returncode == 0
    assert path.exists()
    assert cli("initdb", cwd=tmp_path).returncode == 0
    assert (tmp_path / "timeslot.sqlite3").exists()


def test_add_user_prints_a_token_that_works(db_path):
    result = cli("add-user", "zoe", "--db", str(db_path))
    assert result.returncode == 0
    token = result.stdout.decode().strip().splitlines()[-1]
    assert len(token) >= 26
    make_client(db_path).post("/v1/export/ical", headers=auth(token), status=200)
    stored = sqlite3.connect(db_path).execute("SELECT token_digest FROM users WHERE username = 'zoe'").fetchone()[0]
    assert token not in stored


def test_add_user_twice_is_one_line_error(db_path):
    cli("add-user", "zoe", "--db", str(db_path))
    assert "exists already" in one_line_error(cli("add-user", "zoe", "--db", str(db_path)))


def test_commands_on_a_missing_database_fail_with_one_line(tmp_path):
    missing = str(tmp_path / "missing.sqlite3")
    for arguments in (["add-user", "x"], ["export", "x"], ["feed", "list", "x"], ["serve", "--port", "0"]):
        message = one_line_error(cli(*arguments, "--db", missing))
        assert "missing.sqlite3" in message
    assert not Path(missing).exists()


@pytest.mark.parametrize("content", [b"this is not a database, just text" * 100, b""])
def test_export_and_serve_refuse_a_file_that_is_not_a_timeslot_database(tmp_path, content):
    path = tmp_path / "junk.sqlite3"
    path.write_bytes(content)
    for arguments in (["export", "x"], ["serve", "--port", "0"]):
        message = one_line_error(cli(*arguments, "--db", str(path)))
        assert "database unavailable" in message


def test_demo_is_ready_and_safe_to_run_again(tmp_path):
    path = str(tmp_path / "demo.sqlite3")
    first = cli("demo", "--db", path)
    assert first.returncode == 0
    output = first.stdout.decode()
    assert "curl " in output and "/v1/export/ical" in output and "Authorization: Token token=" in output
    client = make_client(path)
    before = client.post("/v1/export/ical", headers=auth(token_from(first.stdout))).body
    count = sqlite3.connect(path).execute("SELECT count(*) FROM slots").fetchone()[0]
    second = cli("demo", "--db", path)
    assert second.returncode == 0
    client.post("/v1/export/ical", headers=auth(token_from(first.stdout)), status=401)
    after = client.post("/v1/export/ical", headers=auth(token_from(second.stdout))).body
    assert after == before
    assert sqlite3.connect(path).execute("SELECT count(*) FROM slots").fetchone()[0] == count


def test_demo_exercises_every_feature(tmp_path):
    path = str(tmp_path / "demo.sqlite3")
    token = token_from(cli("demo", "--db", path).stdout)
    body = make_client(path).post("/v1/export/ical", headers=auth(token)).body.decode()
    for needle in ("DTSTART;VALUE=DATE:", "RRULE:", "GEO:", "LOCATION:", "BEGIN:VALARM", "CLASS:PUBLIC",
                   "CLASS:PRIVATE", "CLASS:CONFIDENTIAL", "\\,", "\\;", "\\n", "\r\n "):
        assert needle in body, needle
    # a weekly slot in a zone with daylight saving time, across a change, with cancelled occurrences
    assert "BEGIN:VTIMEZONE\r\nTZID:Europe/Berlin\r\n" in body and "RRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=-1SU" in body
    assert "DTSTART;TZID=Europe/Berlin:20261201T090000\r\n" in body
    assert "RRULE:FREQ=WEEKLY;BYDAY=MO,TU,WE,TH,FR;UNTIL=20270331T215959Z\r\n" in body
    assert "EXDATE;TZID=Europe/Berlin:20261224T090000,20261231T090000\r\n" in body
    assert "DESCRIPTION:\r\n" not in body and "SUMMARY:\r\n" not in body            # libical's empty-value error
    assert "deleted slot" not in body


def test_export_writes_the_same_calendar_as_the_api(tmp_path, data, db_path):
    user_id, token = data.user("ann")
    group_id, group_uuid = data.group(user_id, name="G")
    data.slot(user_id, title="One", groups=[group_id], alerts=[5])
    data.slot(user_id, title="Two")
    api = make_client(db_path)
    out = tmp_path / "out.ics"
    assert cli("export", "ann", "--db", str(db_path), "-o", str(out)).returncode == 0
    assert out.read_bytes() == api.post("/v1/export/ical", headers=auth(token)).body
    stdout = cli("export", "ann", "--group", group_uuid.upper(), "--db", str(db_path))
    assert stdout.returncode == 0
    assert stdout.stdout == api.post_json("/v1/export/ical", {"group": group_uuid}, headers=auth(token)).body


def test_export_errors_are_one_line_and_keep_an_existing_output_file(tmp_path, data, db_path):
    data.user("ann")
    other_id, _ = data.user("other")
    _, foreign = data.group(other_id)
    out = tmp_path / "keep.ics"
    out.write_bytes(b"previous export")
    assert "no such user: nobody" in one_line_error(cli("export", "nobody", "--db", str(db_path), "-o", str(out)))
    assert "group not found" in one_line_error(cli("export", "ann", "--group", foreign, "--db", str(db_path),
                                                   "-o", str(out)))
    assert "not a group uuid" in one_line_error(cli("export", "ann", "--group", "x", "--db", str(db_path)))
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("keep")) == ["keep.ics"]


def test_usage_errors_are_one_line_with_exit_2():
    result = cli("export")
    assert result.returncode == 2
    assert len(result.stderr.decode().splitlines()) == 1


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "timeslot-export"
    if not script.exists():
        pytest.skip("the package is not installed in this interpreter (make test installs it)")
    result = subprocess.run([str(script), "--version"], capture_output=True, check=True)
    assert result.stdout.strip() == timeslot_export.__version__.encode()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_serve_answers_and_stops_cleanly_on_signals(data, db_path, stop):
    _, token = data.user("sam")
    data.slot(1, title="Served")
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TIMESLOT_")}
    environment["PYTHONPATH"] = str(ROOT)
    server = subprocess.Popen([sys.executable, "-m", "timeslot_export", "serve", "--db", str(db_path),
                               "--port", str(port), "--threads", "4"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    try:
        assert b"Serving" in server.stdout.readline()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/export/ical", data=b"", method="POST",
                                         headers=auth(token))
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            assert b"SUMMARY:Served" in response.read()
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
        assert missing.value.code == 404
        server.send_signal(stop)
        assert server.wait(timeout=10) == 0
        errors = server.stderr.read().decode()
        assert "Traceback" not in errors and "server stopped" in errors
        assert token not in errors
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_serve_refuses_a_bad_configuration_at_start_up(db_path):
    message = one_line_error(cli("serve", "--db", str(db_path), "--port", "0",
                                 env={"TIMESLOT_REFRESH_MINUTES": "0"}))
    assert "TIMESLOT_REFRESH_MINUTES must be a whole number from 1 to 10080" in message
    assert "must be" in one_line_error(cli("serve", "--db", str(db_path), "--port", "70000"))


def test_serve_reports_a_port_in_use_in_one_line(db_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        message = one_line_error(cli("serve", "--db", str(db_path), "--port", str(taken.getsockname()[1])))
        assert "in use" in message


def test_serve_uses_a_bounded_pool_whose_threads_keep_their_connections(data, db_path, monkeypatch):
    """SPEC §5: a fixed number of worker threads, each reopening nothing (a fresh connection costs ~330 µs),
    and a listen backlog of at least 128."""
    import threading
    import timeslot_export
    user_id, token = data.user()
    data.slot(user_id)
    opened = []
    original_open = timeslot_export.Database._open
    monkeypatch.setattr(timeslot_export.Database, "_open", lambda self: opened.append(1) or original_open(self))
    server = timeslot_export.HTTPServer11(("127.0.0.1", 0), threads=3)
    server.set_app(timeslot_export.make_app(str(db_path)))
    runner = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    runner.start()
    try:
        assert server.request_queue_size >= 128
        assert len([t for t in threading.enumerate() if t.name.startswith("worker-")]) == 3
        for _ in range(30):
            request = urllib.request.Request(f"http://127.0.0.1:{server.server_port}/v1/export/ical", data=b"",
                                             method="POST", headers=auth(token))
            with urllib.request.urlopen(request, timeout=10) as response:
                assert response.status == 200
        assert 1 <= len(opened) <= 3
    finally:
        server.shutdown()
        runner.join()
        server.server_close()
    assert not [t for t in threading.enumerate() if t.name.startswith("worker-")]
