"""The parts of `make bench` a wrong figure would hide in: the SQL-floor app must really run the export's
statements, and the context-switch count must read every thread. (The figures themselves are measured by
`make bench`, not by timed tests.)"""

import os
import threading

import pytest

import bench


@pytest.fixture
def floor_app(tmp_path, monkeypatch):
    """bench's SQL-floor application over a small bench database of the zoned mix (zones, rules, alarms)."""
    path = str(tmp_path / "zoned.sqlite3")
    bench.build(path, 3, "zoned")
    body = tmp_path / "body"
    body.write_bytes(b"BEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n")
    monkeypatch.setenv("TIMESLOT_DB", path)
    monkeypatch.setenv("BENCH_HELLO_BODY", str(body))
    namespace = {}
    exec(compile(bench.SQL_FLOOR_APP, "bench_sql_floor", "exec"), namespace)
    return namespace["application"], body.read_bytes()


def call(application, token):
    statuses = []
    chunks = application(bench.request_environ(token), lambda status, headers: statuses.append((status, headers)))
    return chunks, statuses


def test_sql_floor_app_answers_the_given_bytes_after_the_exports_sql(floor_app):
    application, body = floor_app
    chunks, statuses = call(application, bench.token_for("small"))
    assert b"".join(chunks) == body
    assert statuses == [("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))])]


def test_sql_floor_app_really_looks_the_token_up(floor_app):
    application, _ = floor_app
    with pytest.raises(TypeError):          # no such user: fetchone() gave None, the bench's clients see a 500
        call(application, "bench-token-nobody")


def test_context_switches_count_every_thread_of_a_process():
    """A live thread's switches count (reading only /proc/<pid>/status would give the main thread's)."""
    waited, done = threading.Event(), threading.Event()

    def sleeper():
        for _ in range(50):
            threading.Event().wait(0.001)            # each wait gives up the CPU: a voluntary switch
        waited.set()
        done.wait()

    thread = threading.Thread(target=sleeper)
    before = bench.context_switches(os.getpid())
    thread.start()
    try:
        assert waited.wait(10)
        assert bench.context_switches(os.getpid()) - before >= 50
    finally:
        done.set()
        thread.join()


def test_context_switches_of_a_process_that_is_gone_count_zero():
    assert bench.context_switches(2 ** 22 + 1) == 0     # above Linux's largest pid
