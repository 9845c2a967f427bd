"""`make bench`: the performance targets of SPEC §7, each a ratio measured in one run.

Absolute times vary from machine to machine (and this one is shared), so every figure is a ratio of two
things timed in the same run, interleaved, taking the median of the repetitions:

  large   a 100,000-slot export (body produced and consumed in process, ETag included)
          vs. SPEC §7's floor: its plain SELECT of the same rows, iterated without holding them
                                                                                       target <= 3x
          (the earlier floor, a wider SELECT fetched whole, is printed beside it)
          on each of three data mixes (SPEC §7): plain (like the seed), rich (Unicode text to escape and
          fold, locations, alarms, rules, all-day slots) and zoned (rich, with half the slots in five
          time zones, weekly, some occurrences cancelled)
  small   a 5-slot export in process (the whole WSGI request), on each mix
          vs. the same SQL statements on an already open connection                     target <= 3x
  replica the small export on a replica (`serve --replica`) vs the default, on a copy in rollback-journal
          mode (connections kept under the follower guard) and in WAL mode (a connection per request)
          (figures for docs/performance.md, no target)
  window  a 30-day window (from/to) of a user with 100,000 seed-like slots over 20 years, with open-ended and
          ended weekly series among them, in process
          vs. fetching just the slots it exports with a plain SELECT by their ids      target <= 3x
  revalidation  If-None-Match and If-Modified-Since (each a 304) of an unchanged 100,000-slot feed
          vs. the same 304 of a 5-slot feed                                            target <= 2x
  memory  a 1,000,000-slot export: peak memory above the idle process                  target <= 16 MiB
  load    64 concurrent clients against `serve` while another process writes slots     no 5xx, all answered
  servers 16 keep-alive clients, the small export, 5 rounds: server CPU per request (the server's whole process
          tree, from /proc) and p99 latency, `serve` vs gunicorn gthread, both 2 workers x 4 threads
                                                                     target <= 1.5x CPU, <= 2x p99
          and gunicorn vs the floor of any implementation over sqlite3 under that gunicorn: the export's
          own SQL statements on kept connections, then the same bytes                target <= 1.5x CPU
          and, beside it, the earlier row (gunicorn vs a hello-world app); context switches per request

Exit status 1 when a target is missed. Data is built once, deterministically, under bench-data/. `make bench`
runs it in the project's virtual environment, which has gunicorn (the test extra).
"""

import hashlib
import http.client
import io
import json
import os
import random
import resource
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from wsgiref.util import setup_testing_defaults

import timeslot_export

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "bench-data")
WORDS = ("meeting review lunch call sync planning dentist gym train flight Café Zürich Ærø naïve 東京 会議 "
         "Москва встреча 🎉 📅 über straße; comma, semi; back\\slash").split()
RULES = ("", "", "", "", "FREQ=WEEKLY;BYDAY=MO,WE", "FREQ=DAILY;COUNT=10", "FREQ=MONTHLY;BYDAY=-1FR",
         "FREQ=YEARLY;UNTIL=20300101T000000Z")


def token_for(name: str) -> str:
    return f"bench-token-{name}"


MIXES = ("plain", "rich", "zoned")
ZONES = ("Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata", "America/Sao_Paulo")


def build(path: str, slots: int, mix: str = "rich", seed: int = 7) -> None:
    """A database of one data mix with user 'big' owning ``slots`` slots and user 'small' owning 5,
    deterministically (the rich and zoned mixes draw the same random numbers)."""
    if os.path.exists(path):
        return
    generator = random.Random(seed)
    db = start_building(path)
    locations = []
    for n in range(200):
        with_geo = n % 2 == 0
        locations.append(db.execute(
            "INSERT INTO locations (name, street, postal_code, city, country, latitude, longitude) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (f"Place {n}", f"Street {n}", f"{10000 + n}", generator.choice(WORDS), "Germany",
             generator.uniform(-90, 90) if with_geo else None, generator.uniform(-180, 180) if with_geo else None)
        ).lastrowid)

    def rows(user_id: int, count: int):
        for n in range(count):
            day = generator.randrange(3650)
            start = time.gmtime(1577836800 + day * 86400 + generator.randrange(86400))
            all_day = generator.random() < 0.15
            zoned = mix == "zoned" and n % 2 == 0
            all_day = all_day and not zoned
            start_at = time.strftime("%Y-%m-%dT00:00:00Z" if all_day else "%Y-%m-%dT%H:%M:%SZ", start)
            end_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.mktime(start) - time.timezone
                                                                      + generator.randrange(900, 3 * 86400)))
            if all_day:
                end_at = end_at[:10] + "T00:00:00Z"
            length = generator.choice((0, 0, 3, 12, 40, 120))
            description = " ".join(generator.choice(WORDS) for _ in range(length))
            if generator.random() < 0.2:
                description += "\nSecond line, with more text."
            slot_uuid = str(uuid.UUID(int=generator.getrandbits(128), version=4))
            if mix == "plain":
                yield (slot_uuid, user_id, f"Meeting {n % 97}", "", start_at, end_at, 0, "", "private", None, "")
                continue
            yield (slot_uuid, user_id,
                   " ".join(generator.choice(WORDS) for _ in range(generator.randrange(1, 6))), description,
                   start_at, end_at if generator.random() < 0.9 else None, int(all_day),
                   "FREQ=WEEKLY;COUNT=52" if zoned else generator.choice(RULES),
                   generator.choice(("private", "friends", "foaf", "public")),
                   generator.choice(locations) if generator.random() < 0.4 else None,
                   ZONES[n // 2 % len(ZONES)] if zoned else "")

    insert = ("INSERT INTO slots (uuid, creator_id, title, description, start_at, end_at, all_day, rrule, visibility, "
              "location_id, time_zone, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
              "'2020-01-01T00:00:00Z', '2020-06-01T12:00:00Z')")
    db.executemany(insert, rows(1, slots))
    db.executemany(insert, rows(2, 5))
    if mix != "plain":
        db.execute("INSERT INTO slot_alerts (slot_id, minutes_before) SELECT id, 15 FROM slots WHERE id % 3 = 0")
        db.execute("INSERT INTO slot_alerts (slot_id, minutes_before) SELECT id, 1440 FROM slots WHERE id % 7 = 0")
    if mix == "zoned":                  # two cancelled weeks for every other zoned slot
        for weeks in (1, 3):
            db.execute("INSERT INTO slot_exdates (slot_id, occurrence_at) SELECT id, strftime('%Y-%m-%dT%H:%M:%SZ', "
                       f"start_at, '+{7 * weeks} days') FROM slots WHERE time_zone <> '' AND id % 4 = 1")
    finish_building(db, path)


def start_building(path: str) -> sqlite3.Connection:
    """A new database at ``path``.part, in a transaction, with the users 'big' and 'small' and a feed each."""
    os.makedirs(DATA, exist_ok=True)
    partial = path + ".part"
    for leftover in (partial, partial + "-wal", partial + "-shm"):
        if os.path.exists(leftover):
            os.remove(leftover)
    db = sqlite3.connect(partial, isolation_level=None)
    timeslot_export.apply_schema(db)
    db.execute("BEGIN")
    for user_id, name in ((1, "big"), (2, "small")):
        db.execute("INSERT INTO users (id, uuid, username, token_digest) VALUES (?, ?, ?, ?)",
                   (user_id, str(uuid.UUID(int=user_id)), name, hashlib.sha256(token_for(name).encode()).hexdigest()))
        db.execute("INSERT INTO feeds (user_id, token_digest) VALUES (?, ?)",
                   (user_id, hashlib.sha256(feed_secret(name).encode()).hexdigest()))
    return db


def finish_building(db: sqlite3.Connection, path: str) -> None:
    """Commit, checkpoint, and move the database into place (a half-built one never is)."""
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    os.replace(path + ".part", path)


def request_environ(token: str) -> dict:
    """The environ a server would build for the seed's POST (built once: that is the server's work)."""
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/v1/export/ical", "HTTP_AUTHORIZATION": f"Token token={token}",
               "CONTENT_TYPE": "application/json", "HTTP_ACCEPT": "text/plain"}
    setup_testing_defaults(environ)
    return environ


def wsgi_export(app, token_or_environ) -> int:
    """One in-process request; returns the body length (the body is produced and consumed)."""
    base = request_environ(token_or_environ) if isinstance(token_or_environ, str) else token_or_environ
    environ = {**base, "wsgi.input": io.BytesIO(b"")}
    status = []
    result = app(environ, lambda s, h, e=None: status.append(s))
    try:
        size = sum(len(chunk) for chunk in result)
    finally:
        result.close()
    if not status[0].startswith("200"):
        raise SystemExit(f"bench: export answered {status[0]}")
    return size


PLAIN_SELECT = """
    SELECT s.uuid, s.created_at, s.updated_at, s.start_at, s.end_at, s.all_day, s.rrule, s.visibility, s.title,
           s.description, l.name, l.street, l.postal_code, l.city, l.country, l.latitude, l.longitude,
           (SELECT group_concat(a.minutes_before) FROM slot_alerts a WHERE a.slot_id = s.id), s.time_zone,
           (SELECT group_concat(e.occurrence_at) FROM slot_exdates e WHERE e.slot_id = s.id)
    FROM slots s LEFT JOIN locations l ON l.id = s.location_id
    WHERE s.creator_id = ? AND s.deleted_at IS NULL ORDER BY s.start_at, s.uuid"""


def interleaved(first, second, repetitions: int) -> tuple[float, float]:
    """Median seconds of ``first`` and ``second``, run alternately ``repetitions`` times each."""
    a, b = [], []
    for _ in range(repetitions):
        for call, times in ((first, a), (second, b)):
            started = time.perf_counter()
            call()
            times.append(time.perf_counter() - started)
    return statistics.median(a), statistics.median(b)


# SPEC §7's floor of the 100,000-slot rows, exactly: these columns, iterated without holding the rows (the
# zoned mix adds the zone and the cancelled occurrences).
FLOOR_SELECT = """
    SELECT s.uuid, s.title, s.description, s.start_at, s.end_at, s.all_day, s.rrule, s.visibility, s.created_at,
           s.updated_at, l.name, l.street, l.postal_code, l.city, l.country, l.latitude, l.longitude,
           (SELECT group_concat(minutes_before) FROM slot_alerts a WHERE a.slot_id = s.id){zoned}
    FROM slots s LEFT JOIN locations l ON l.id = s.location_id
    WHERE s.creator_id = ? AND s.deleted_at IS NULL ORDER BY s.start_at, s.uuid"""
FLOOR_ZONED = """, s.time_zone,
           (SELECT group_concat(occurrence_at) FROM slot_exdates x WHERE x.slot_id = s.id)"""


def bench_large(path: str, zoned: bool = False) -> tuple[float, str]:
    """The 100,000-slot export against SPEC §7's floor (the SELECT iterated); the earlier floor of this bench
    (a wider SELECT, fetched whole with fetchall()) is timed beside it, so the change of floor shows."""
    app = timeslot_export.make_app(path)
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    floor_sql = FLOOR_SELECT.format(zoned=FLOOR_ZONED if zoned else "")

    def select():
        for _ in connection.execute(floor_sql, (1,)):
            pass

    fetched = lambda: connection.execute(PLAIN_SELECT, (1,)).fetchall()   # noqa: E731
    export = lambda: wsgi_export(app, token_for("big"))                  # noqa: E731
    export(), select()                                                   # warm the page cache
    exported, selected = interleaved(export, select, 7)
    _, fetched_whole = interleaved(select, fetched, 3)
    size = wsgi_export(app, token_for("big"))
    count = len(fetched())
    return exported / selected, (f"export {exported * 1000:.0f} ms = {exported / count * 1e6:.1f} µs/event "
                                 f"({size / 1e6:.1f} MB), the floor SELECT iterated {selected * 1000:.0f} ms = "
                                 f"{selected / count * 1e6:.1f} µs/row; against the earlier floor (fetchall) "
                                 f"{exported / fetched_whole:.2f}x")


WINDOW = ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")      # the last month of the history


def build_history(path: str, slots: int = 100_000, series: int = 200) -> None:
    """A database where user 'big' has ``slots`` seed-like slots (short titles, no text, alarms or rules)
    spread over the 20 years up to December 2026 and ``series`` weekly series among them, a tenth of them
    open-ended, the others ended after a few months; user 'small' has 5 slots. Each has a feed."""
    if os.path.exists(path):
        return
    generator = random.Random(11)
    db = start_building(path)
    first = 1165536000                                                   # 2006-12-08, twenty years back

    def rows(user_id: int, count: int, rules: int):
        for n in range(count):
            start = first + generator.randrange(20 * 365 * 86400)
            rule = ""
            if n < rules:
                rule = "FREQ=WEEKLY" if n % 10 == 0 else time.strftime(
                    "FREQ=WEEKLY;UNTIL=%Y%m%dT%H%M%SZ", time.gmtime(start + generator.randrange(30, 200) * 86400))
            yield (str(uuid.UUID(int=generator.getrandbits(128), version=4)), user_id, f"Meeting {n % 97}",
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start)),
                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(start + 3600)), rule)

    insert = ("INSERT INTO slots (uuid, creator_id, title, start_at, end_at, rrule, created_at, updated_at) "
              "VALUES (?, ?, ?, ?, ?, ?, '2020-01-01T00:00:00Z', '2020-06-01T12:00:00Z')")
    db.executemany(insert, rows(1, slots, series))
    db.executemany(insert, rows(2, 5, 0))
    finish_building(db, path)


def feed_secret(name: str) -> str:
    return f"bench-feed-secret-{name}-0123456789abcdefghijklmn"


def bench_window(path: str) -> tuple[float, str]:
    """The windowed export against a plain SELECT of just the rows it exports, by id, iterated."""
    app = timeslot_export.make_app(path)
    environ = {**request_environ(token_for("big")), "REQUEST_METHOD": "GET",
               "QUERY_STRING": f"from={WINDOW[0]}&to={WINDOW[1]}"}
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    body = b"".join(timeslot_export.make_app(path)({**environ, "wsgi.input": io.BytesIO(b"")},
                                                   lambda s, h, e=None: None))
    uids = [line[4:] for line in body.decode().split("\r\n") if line.startswith("UID:")]
    ids = [row[0] for row in connection.execute(
        f"SELECT id FROM slots WHERE uuid IN ({', '.join('?' for _ in uids)})", uids)]
    by_ids = PLAIN_SELECT.replace("WHERE s.creator_id = ? AND", f"WHERE s.id IN ({', '.join('?' for _ in ids)}) AND")

    def select():
        for _ in connection.execute(by_ids, ids):
            pass

    export = lambda: wsgi_export(app, environ)                           # noqa: E731
    export(), select()
    exported, selected = interleaved(export, select, 41)
    return exported / selected, (f"{len(ids)} of 100,200 slots, export {exported * 1000:.2f} ms, SELECT by id "
                                 f"{selected * 1000:.2f} ms")


def bench_revalidation(path: str) -> tuple[float, str]:
    """304s of the 100,000-slot feed against 304s of the 5-slot feed, by If-None-Match and by
    If-Modified-Since: the larger of the two ratios."""
    app = timeslot_export.make_app(path)
    ratios, details = [], []
    answers = {}
    for name in ("big", "small"):
        environ = {**request_environ(""), "REQUEST_METHOD": "GET", "PATH_INFO": f"/v1/feeds/{feed_secret(name)}.ics"}
        headers = {}
        app({**environ, "wsgi.input": io.BytesIO(b"")}, lambda s, h, e=None: headers.update(h)).close()
        answers[name] = (environ, headers)
    for header, field in (("HTTP_IF_NONE_MATCH", "ETag"), ("HTTP_IF_MODIFIED_SINCE", "Last-Modified")):
        calls = []
        for name in ("big", "small"):
            environ, headers = answers[name]
            if field not in headers:
                raise SystemExit(f"bench: the {name} feed has no {field}")
            conditional = {**environ, header: headers[field], "wsgi.input": io.BytesIO(b"")}

            def call(conditional=conditional):
                status = []
                app(conditional, lambda s, h, e=None: status.append(s)).close()
                if not status[0].startswith("304"):
                    raise SystemExit(f"bench: revalidation answered {status[0]}")
            calls.append(call)
        big, small = interleaved(calls[0], calls[1], 301)
        ratios.append(big / small)
        details.append(f"{field}: {big * 1e6:.0f} vs {small * 1e6:.0f} µs ({big / small:.2f}x)")
    return max(ratios), "; ".join(details)


def export_sql(connection: sqlite3.Connection, token: str) -> None:
    """The SQL statements of a user's export, as the service runs them (one read transaction), nothing else:
    the "same SQL" of the small export row, and the SQL floor under gunicorn. TypeError for an unknown token."""
    connection.execute("BEGIN")
    user_id, _, _ = connection.execute(timeslot_export.SQL_USER_BY_TOKEN,
                                    (timeslot_export.token_digest(token),)).fetchone()
    connection.execute(timeslot_export.SQL_USER_ZONES, {"user": user_id}).fetchall()
    connection.execute(timeslot_export.SQL_USER_SLOTS, (user_id,)).fetchall()
    connection.execute("ROLLBACK")


def bench_small(path: str) -> tuple[float, str]:
    app = timeslot_export.make_app(path)
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    environ = request_environ(token_for("small"))

    def export():
        for _ in range(100):
            wsgi_export(app, environ)

    def sql():
        for _ in range(100):
            export_sql(connection, token_for("small"))

    export(), sql()
    exported, queried = interleaved(export, sql, 15)
    cached, app.events = app.events, None                 # every event written afresh, for comparison
    uncached, _ = interleaved(export, sql, 5)
    app.events = cached
    return exported / queried, (f"request {exported * 1e4:.0f} µs ({wsgi_export(app, environ):,} bytes), "
                                f"same SQL {queried * 1e4:.0f} µs; without the event cache {uncached * 1e4:.0f} µs "
                                f"({uncached / queried:.2f}x)")


def bench_replica(path: str) -> tuple[float, str]:
    """The cost of the scale-out recipe (docs/several-machines.md): the small export
    on a replica (`serve --replica`) vs the default. A Litestream copy is in rollback-journal mode once the
    follower has changed its page 1 (then connections are kept while the follower guard holds), in WAL mode
    before (a connection per request): both are measured, on copies of the database in each mode."""
    copies = {}
    for mode in ("delete", "wal"):
        copies[mode] = os.path.join(DATA, f"replica-{mode}.sqlite3")
        if not os.path.exists(copies[mode]):
            with sqlite3.connect(path) as source, sqlite3.connect(copies[mode] + ".part") as copy:
                source.backup(copy)
                copy.execute(f"PRAGMA journal_mode = {mode}")
            os.replace(copies[mode] + ".part", copies[mode])
    environ = request_environ(token_for("small"))

    def repeated(app):
        return lambda: [wsgi_export(app, environ) for _ in range(100)]

    default = timeslot_export.make_app(path)
    steady = timeslot_export.make_app(copies["delete"], replica=True)
    restored = timeslot_export.make_app(copies["wal"], replica=True)
    for app in (default, steady, restored):
        repeated(app)()
    (on_steady, kept), (on_restored, _) = (interleaved(repeated(steady), repeated(default), 15),
                                            interleaved(repeated(restored), repeated(default), 15))
    return on_steady / kept, (f"replica {on_steady * 1e4:.0f} µs, default {kept * 1e4:.0f} µs per request; "
                              f"before the follower's first change of page 1 (WAL mode, a connection per "
                              f"request) {on_restored * 1e4:.0f} µs = {on_restored / kept:.2f}x")


MEMORY_PROBE = """
import sys, timeslot_export, bench
app = timeslot_export.make_app(sys.argv[1])
bench.wsgi_export(app, bench.token_for("small"))           # idle: imported, configured, one request served
idle = bench.peak_rss_kib()
size = bench.wsgi_export(app, bench.token_for("big"))
print(idle, bench.peak_rss_kib(), size)
"""


def peak_rss_kib() -> int:
    """This process's peak resident memory. VmHWM belongs to the process image; ru_maxrss would carry the
    parent's peak across fork and exec on Linux and hide the child's own."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def bench_memory(path: str) -> tuple[float, str]:
    output = subprocess.run([sys.executable, "-c", MEMORY_PROBE, path], capture_output=True, check=True, cwd=HERE,
                            text=True).stdout.split()
    idle, peak, size = (int(value) for value in output)
    growth = (peak - idle) / 1024
    return growth, f"idle {idle / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, body {size / 1e6:.0f} MB streamed"


def bench_load(path: str) -> tuple[float, str]:
    """64 clients x 20 requests against `serve` while another process inserts and updates slots."""
    writer_db = path + ".load.sqlite3"
    with sqlite3.connect(path) as source, sqlite3.connect(writer_db) as copy:
        source.backup(copy)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(writer_db + suffix):
            os.remove(writer_db + suffix)
    with sqlite3.connect(writer_db) as db:
        db.execute("PRAGMA journal_mode = WAL")
    server = subprocess.Popen([sys.executable, "-m", "timeslot_export", "serve", "--db", writer_db, "--port", "0",
                               "--threads", "16"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=HERE, text=True)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, writer_db, "6"], cwd=HERE)
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    try:
        port = int(server.stdout.readline().split("http://127.0.0.1:")[1].split()[0])

        def client():
            for _ in range(20):
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/export/ical", data=b"", method="POST",
                                                 headers={"Authorization": f"Token token={token_for('small')}"})
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        body = response.read()
                        status = response.status if body.endswith(b"END:VCALENDAR\r\n") else -1
                except urllib.error.HTTPError as error:
                    status = error.code
                except OSError:
                    status = 0
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1

        started = time.perf_counter()
        clients = [threading.Thread(target=client) for _ in range(64)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        writer.terminate()
        server.terminate()
        server.wait(timeout=30)
        writer.wait(timeout=30)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(writer_db + suffix):
                os.remove(writer_db + suffix)
    failed = sum(count for status, count in statuses.items() if status != 200)
    return failed, f"{sum(statuses.values())} requests in {elapsed:.1f} s, statuses {json.dumps(statuses)}"


# Inserts and updates slots of user 'small' every few milliseconds until terminated.
WRITER = """
import sqlite3, sys, time, uuid
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=5)
pause = int(sys.argv[2]) / 1000
while True:
    db.execute("INSERT INTO slots (uuid, creator_id, title, start_at) VALUES (?, 2, 'written', '2030-01-01T00:00:00Z')",
               (str(uuid.uuid4()),))
    db.execute("UPDATE slots SET title = title || '.' WHERE creator_id = 2 AND id = (SELECT max(id) FROM slots)")
    time.sleep(pause)
"""


def main() -> int:
    large = {mix: os.path.join(DATA, f"{mix}-100k.sqlite3") for mix in MIXES}
    huge = os.path.join(DATA, "huge-1m.sqlite3")
    print("building data (once) ...", flush=True)
    for mix, path in large.items():
        build(path, 100_000, mix)
    build(huge, 1_000_000)
    history = os.path.join(DATA, "history-100k.sqlite3")
    build_history(history)
    results = []
    for name, run, path, target, unit in (
            *((f"100,000-slot export vs plain SELECT, {mix} mix",
               (lambda path, zoned=mix == "zoned": bench_large(path, zoned)), large[mix], 3.0, "x") for mix in MIXES),
            *((f"5-slot export vs the same SQL on an open connection, {mix} mix", bench_small, large[mix], 3.0, "x")
              for mix in MIXES),
            ("30-day window of a 20-year, 100,000-slot history vs plain SELECT of its slots by id", bench_window,
             history, 3.0, "x"),
            ("revalidating an unchanged 100,000-slot feed vs a 5-slot feed (304 each)", bench_revalidation, history,
             2.0, "x"),
            ("1,000,000-slot export, peak memory above idle", bench_memory, huge, 16.0, " MiB"),
            ("64 clients x 20 requests vs serve + a writer: failed", bench_load, large["rich"], 0, " requests")):
        value, detail = run(path)
        results.append(report(name, value, target, unit, detail))
    value, detail = bench_replica(large["rich"])
    print(f"info   5-slot export on a replica (serve --replica) vs the default: {value:.2f}x; {detail}",
          flush=True)
    servers, ratios = bench_servers(large["rich"])
    (serve_cpu, serve_p99, serve_switches), (gunicorn_cpu, gunicorn_p99, gunicorn_switches) = (
        servers["serve"], servers["gunicorn"])
    (floor_cpu, floor_p99, floor_switches), (hello_cpu, hello_p99, hello_switches) = (
        servers["sql-floor"], servers["hello"])
    figures = (f"serve {serve_cpu:.0f} µs, p99 {serve_p99:.1f} ms; gunicorn gthread 2x4 {gunicorn_cpu:.0f} µs, "
               f"p99 {gunicorn_p99:.1f} ms (medians; the ratio is the median of {SERVER_ROUNDS} rounds' ratios)")
    results.append(report("small export under serve, server CPU per request vs gunicorn", ratios["serve cpu"],
                          1.5, "x", figures))
    results.append(report("small export under serve, p99 latency vs gunicorn", ratios["serve p99"], 2.0, "x",
                          "16 keep-alive clients"))
    results.append(report("small export under gunicorn, server CPU per request vs its SQL floor (the export's SQL "
                          "on kept connections, then the same bytes)", ratios["gunicorn vs floor"], 1.5, "x",
                          f"gunicorn {gunicorn_cpu:.0f} µs, the SQL floor under that gunicorn {floor_cpu:.0f} µs, "
                          f"p99 {floor_p99:.1f} ms; the same clients and server"))
    print(f"info   the earlier row, the export vs a hello world under that gunicorn: "
          f"{ratios['gunicorn vs hello']:.2f}x (hello world {hello_cpu:.0f} µs, p99 {hello_p99:.1f} ms); "
          f"the SQL floor vs the hello world {floor_cpu / hello_cpu:.2f}x; context switches per request: "
          f"hello world {hello_switches:.1f}, SQL alone {floor_switches:.1f}, the export {gunicorn_switches:.1f}, "
          f"serve {serve_switches:.1f}", flush=True)
    return 0 if all(results) else 1


def report(name: str, value: float, target: float, unit: str, detail: str) -> bool:
    met = value <= target
    print(f"{'met   ' if met else 'MISSED'} {name}: {value:.2f}{unit} (target <= {target:g}{unit}); {detail}",
          flush=True)
    return met



# --- servers: CPU per request and p99 under 16 keep-alive clients (SPEC §7) ------------------------------------

HELLO_APP = '''
import os
BODY = open(os.environ["BENCH_HELLO_BODY"], "rb").read()
HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BODY)))]

def application(environ, start_response):
    """A hello-world WSGI app returning the small export's bytes: the floor of any app under a server."""
    start_response("200 OK", HEADERS)
    return [BODY]
'''

# The floor of any implementation of the contract over sqlite3: the small export's own SQL statements, as the
# service runs them (one connection kept per thread, one read transaction), then the hello-world answer.
SQL_FLOOR_APP = HELLO_APP + '''
import sqlite3, threading
import bench

DATABASE = "file:" + os.environ["TIMESLOT_DB"] + "?mode=ro"
connections = threading.local()

def application(environ, start_response):
    """The export's SQL, nothing else: token lookup, zones and slots in one read transaction."""
    connection = getattr(connections, "connection", None)
    if connection is None:
        connection = connections.connection = sqlite3.connect(DATABASE, uri=True, isolation_level=None)
    bench.export_sql(connection, environ["HTTP_AUTHORIZATION"].partition("token=")[2])
    start_response("200 OK", HEADERS)
    return [BODY]
'''


def tree_usage(pid: int) -> tuple[float, int]:
    """User + system CPU seconds and context switches (voluntary or not, of every thread) of a process and
    all its descendants (gunicorn's workers), from /proc."""
    parents, times = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            times[int(entry)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    family, grew = {pid}, True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in family and child not in family:
                family.add(child)
                grew = True
    return sum(times.get(member, 0.0) for member in family), sum(map(context_switches, family))


def context_switches(pid: int) -> int:
    """Context switches of all threads of a process so far (those of a thread or process gone count 0)."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/status") as status:
                total += sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
        except OSError:
            continue
    return total


def keep_alive_load(port: int, headers: dict, clients: int = 16, requests: int = 150) -> list[float]:
    """``clients`` threads, each on one kept-alive connection, ``requests`` POSTs each; the latencies."""
    latencies: list[float] = []
    lock = threading.Lock()
    failures = []

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        try:
            for _ in range(requests):
                started = time.perf_counter()
                connection.request("POST", "/v1/export/ical", body=b"", headers=headers)
                response = connection.getresponse()
                body = response.read()
                mine.append(time.perf_counter() - started)
                if response.status != 200 or not body.endswith(b"END:VCALENDAR\r\n"):
                    failures.append(response.status)
        finally:
            connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"bench: {len(failures)} failed requests, e.g. {failures[:3]}")
    return latencies


SERVER_KINDS = ("serve", "gunicorn", "sql-floor", "hello")
GUNICORN_APPS = {"gunicorn": "timeslot_export:application", "sql-floor": "bench_sql_floor:application",
                 "hello": "bench_hello:application"}


def server_command(kind: str, port: int, env: dict) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    if kind == "serve":
        return [sys.executable, "-m", "timeslot_export", "serve", "--db", env["TIMESLOT_DB"], "--port", str(port),
                "--workers", "2", "--threads", "4"]                   # the shape of the gunicorn below
    return [os.path.join(bin_dir, "gunicorn"), "--worker-class", "gthread", "--workers", "2", "--threads", "4",
            "--bind", f"127.0.0.1:{port}", "--log-level", "warning", GUNICORN_APPS[kind]]


def measure_server(kind: str, path: str, headers: dict, hello_dir: str) -> tuple[float, float, float]:
    """(server CPU µs, p99 latency ms, context switches) per request of one server under the keep-alive load."""
    port = free_port()
    env = {**os.environ, "TIMESLOT_DB": path, "TIMESLOT_LOG_LEVEL": "WARNING",
           "PYTHONPATH": os.pathsep.join([HERE, hello_dir]), "BENCH_HELLO_BODY": os.path.join(hello_dir, "body")}
    process = subprocess.Popen(server_command(kind, port, env), cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"bench: {kind} did not start")
                time.sleep(0.1)
        keep_alive_load(port, headers, requests=20)                    # warm: connections, imports
        cpu_before, switches_before = tree_usage(process.pid)
        latencies = keep_alive_load(port, headers)
        cpu_after, switches_after = tree_usage(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    latencies.sort()
    count = len(latencies)
    return ((cpu_after - cpu_before) / count * 1e6, latencies[int(count * 0.99)] * 1000,
            (switches_after - switches_before) / count)


SERVER_ROUNDS = 5


def bench_servers(path: str) -> tuple[dict[str, tuple[float, float, float]], dict[str, float]]:
    """serve, gunicorn (gthread), the SQL floor and a hello-world app under the same gunicorn, measured in
    SERVER_ROUNDS rounds, one after the other in each round; the median of each figure, and the median of
    each round's ratios. A round's ratio compares servers measured seconds apart: how gunicorn spreads 16
    connections over its 2 workers differs from start to start and moves every figure of that start by up
    to a third (tests of one worker show it), so a ratio of medians taken from different rounds is noisier."""
    headers = {"Authorization": f"Token token={token_for('small')}", "Content-Length": "0"}
    app = timeslot_export.make_app(path)
    environ = request_environ(token_for("small"))
    result = app({**environ, "wsgi.input": io.BytesIO(b"")}, lambda s, h, e=None: None)
    body = b"".join(result)
    result.close()
    with tempfile.TemporaryDirectory() as hello_dir:
        for module, text in (("bench_hello", HELLO_APP), ("bench_sql_floor", SQL_FLOOR_APP)):
            with open(os.path.join(hello_dir, f"{module}.py"), "w") as file:
                file.write(text)
        with open(os.path.join(hello_dir, "body"), "wb") as file:
            file.write(body)
        runs: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in SERVER_KINDS}
        for _ in range(SERVER_ROUNDS):
            for kind in runs:
                runs[kind].append(measure_server(kind, path, headers, hello_dir))
    medians = {kind: tuple(statistics.median(figures) for figures in zip(*values)) for kind, values in runs.items()}
    ratios = {
        "serve cpu": statistics.median(s[0] / g[0] for s, g in zip(runs["serve"], runs["gunicorn"])),
        "serve p99": statistics.median(s[1] / g[1] for s, g in zip(runs["serve"], runs["gunicorn"])),
        "gunicorn vs floor": statistics.median(g[0] / f[0] for g, f in zip(runs["gunicorn"], runs["sql-floor"])),
        "gunicorn vs hello": statistics.median(g[0] / h[0] for g, h in zip(runs["gunicorn"], runs["hello"]))}
    print("info   server CPU per request by round (µs): " + "; ".join(
        f"{kind} {', '.join(f'{figures[0]:.0f}' for figures in values)}" for kind, values in runs.items()),
        flush=True)
    return medians, ratios


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
