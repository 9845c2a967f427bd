"""SPEC §5 `serve`: HTTP/1.1 over raw sockets. Persistent and pipelined requests, chunked streaming, HEAD and
304 on a kept-alive connection, HTTP/1.0 clients, Connection: close, idle and read timeouts, bounded
connections that idle clients never exhaust, and request framing that cannot smuggle a second request."""

import contextlib
import os
import signal
import socket
import threading
import time

import pytest

import timeslot_export
from conftest import auth, make_client
from test_cli import cli, one_line_error
from test_hardening import running_server

EXPORT = "/v1/export/ical"


@contextlib.contextmanager
def http11_server(db_path, threads=4, **options):
    """The server class `serve` uses, in a thread on 127.0.0.1; always stopped."""
    server = timeslot_export.HTTPServer11(("127.0.0.1", 0), threads, **options)
    server.set_app(timeslot_export.make_app(str(db_path)))
    runner = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    runner.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        runner.join()
        server.server_close()


class Client:
    """A raw HTTP client on one connection, reading responses the way RFC 9112 §6.3 frames them."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, *requests):
        self.sock.sendall(b"".join(requests))

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buffer += data

    def _take_until(self, marker):
        while marker not in self.buffer:
            self._fill()
        head, self.buffer = self.buffer.split(marker, 1)
        return head

    def _take(self, size):
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, head=False):
        """(status, headers with lower-case names, body, framing)."""
        lines = self._take_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated header {name}"
            headers[name.lower()] = value.strip()
        if head or status in (204, 304) or 100 <= status < 200:
            return status, headers, b"", "none"
        if headers.get("transfer-encoding") == "chunked":
            assert "content-length" not in headers
            body = b""
            while True:
                size = int(self._take_until(b"\r\n"), 16)
                chunk = self._take(size + 2)
                assert chunk.endswith(b"\r\n")
                if size == 0:
                    return status, headers, body, "chunked"
                body += chunk[:-2]
        if "content-length" in headers:
            return status, headers, self._take(int(headers["content-length"])), "length"
        with contextlib.suppress(EOFError):
            while True:
                self._fill()
        body, self.buffer = self.buffer, b""
        return status, headers, body, "close"

    def closed(self, within=5.0):
        """Whether the server closes the connection (EOF or reset) within ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def request(method="GET", path=EXPORT, headers=(), body=b"", version="HTTP/1.1"):
    lines = [f"{method} {path} {version}", "Host: 127.0.0.1", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def authorization(token):
    return [f"Authorization: Token token={token}"]


@pytest.fixture
def small_and_large(data):
    """A user with 3 slots (sent whole) and one with 900 (streamed, well past 64 KiB)."""
    small_id, small_token = data.user("small")
    for number in range(3):
        data.slot(small_id, title=f"Small {number}")
    large_id, large_token = data.user("large")
    for number in range(900):
        data.slot(large_id, title=f"Large slot {number} with a title long enough", time_zone="Europe/Berlin",
                  start_at=f"2026-12-01T{number % 24:02d}:00:00Z")
    return small_token, large_token


def test_several_requests_on_one_connection(db_path, small_and_large):
    small, _ = small_and_large
    expected = make_client(db_path).post(EXPORT, headers=auth(small)).body
    with http11_server(db_path) as port:
        client = Client(port)
        for _ in range(5):
            client.send(request("POST", headers=authorization(small)))
            status, headers, body, framing = client.response()
            assert (status, body, framing) == (200, expected, "length") and "connection" not in headers
        client.send(request("GET", "/nowhere"))
        assert client.response()[0] == 404
        client.send(request("POST", headers=["Authorization: Token token=wrong"]))
        assert client.response()[0] == 401                  # errors keep the connection too
        client.send(request("POST", headers=authorization(small)))
        assert client.response()[2] == expected
        client.close()


def test_pipelined_requests_are_answered_in_order(db_path, small_and_large):
    small, large = small_and_large
    local = make_client(db_path)
    with http11_server(db_path) as port:
        client = Client(port)
        client.send(request("POST", headers=authorization(large)), request("GET", "/nowhere"),
                    request("POST", headers=authorization(small)), request("HEAD", headers=authorization(small)))
        assert client.response()[2] == local.post(EXPORT, headers=auth(large)).body
        assert client.response()[0] == 404
        assert client.response()[2] == local.post(EXPORT, headers=auth(small)).body
        status, headers, body, _ = client.response(head=True)
        assert status == 200 and body == b""
        client.send(request("POST", headers=authorization(small)))
        assert client.response()[0] == 200
        client.close()


def test_a_large_export_is_chunked_and_the_connection_goes_on(db_path, small_and_large):
    small, large = small_and_large
    local = make_client(db_path)
    expected = local.post(EXPORT, headers=auth(large)).body
    assert len(expected) > 64 * 1024
    with http11_server(db_path) as port:
        client = Client(port)
        for token, body in ((large, expected), (small, local.post(EXPORT, headers=auth(small)).body),
                            (large, expected)):
            client.send(request("POST", headers=authorization(token)))
            status, headers, received, framing = client.response()
            assert (status, received) == (200, body)
            assert framing == ("chunked" if token == large else "length")
        client.close()


def test_head_and_304_on_a_kept_alive_connection(db_path, small_and_large):
    small, large = small_and_large
    tag = make_client(db_path).get(EXPORT, headers=auth(large)).headers["ETag"]
    with http11_server(db_path) as port:
        client = Client(port)
        client.send(request("HEAD", headers=authorization(large)))
        status, headers, body, _ = client.response(head=True)
        assert status == 200 and headers["etag"] == tag and "transfer-encoding" not in headers
        client.send(request("GET", headers=[*authorization(large), f"If-None-Match: {tag}"]))
        status, headers, body, framing = client.response()
        assert (status, framing) == (304, "none") and "content-length" not in headers
        client.send(request("GET", headers=authorization(small)))
        status, _, body, _ = client.response()
        assert status == 200 and body.endswith(b"END:VCALENDAR\r\n")
        client.close()


def test_an_http_1_0_client_gets_its_answer_and_the_close(db_path, small_and_large):
    small, large = small_and_large
    expected = make_client(db_path).post(EXPORT, headers=auth(large)).body
    with http11_server(db_path) as port:
        client = Client(port)
        client.send(request("POST", headers=authorization(large), version="HTTP/1.0"))
        status, headers, body, framing = client.response()
        assert (status, body, framing) == (200, expected, "close")         # never chunked for HTTP/1.0
        assert client.closed()
        client = Client(port)
        client.send(request("POST", headers=authorization(small), version="HTTP/1.0"))
        status, headers, body, framing = client.response()
        assert status == 200 and framing == "length" and client.closed()


def test_an_http_1_0_client_that_asks_for_keep_alive_is_told_or_closed(db_path, small_and_large):
    """RFC 9112 §9.3 and Appendix C.2.2: persistent only when the 1.0 client asked, the response says
    `Connection: keep-alive` and it carries a length (or has no body); otherwise closed after the response."""
    small, large = small_and_large
    local = make_client(db_path)
    tag = local.get(EXPORT, headers=auth(small)).headers["ETag"]
    keep_alive = ["Connection: keep-alive"]
    with http11_server(db_path) as port:
        client = Client(port)
        started = time.monotonic()
        for method, headers, expected_status in (("POST", authorization(small), 200),
                                                 ("HEAD", authorization(small), 200),
                                                 ("GET", [*authorization(small), f"If-None-Match: {tag}"], 304),
                                                 ("GET", ["Authorization: Token token=wrong"], 401)):
            client.send(request(method, headers=[*headers, *keep_alive], version="HTTP/1.0"))
            status, answer, body, framing = client.response(head=method == "HEAD")
            assert status == expected_status and answer["connection"] == "keep-alive"
            assert framing in ("length", "none") and "transfer-encoding" not in answer
        assert not client.closed(within=0.3)                                  # it stays open: the client asked
        client.send(request("POST", headers=[*authorization(large), *keep_alive], version="HTTP/1.0"))
        status, answer, body, framing = client.response()
        assert (status, body) == (200, local.post(EXPORT, headers=auth(large)).body)
        assert answer["connection"] == "close" and framing == "close"        # no length: the close ends it
        assert client.closed() and time.monotonic() - started < 5             # never the idle timeout
        client = Client(port)
        client.send(request("POST", headers=authorization(small), version="HTTP/1.0"))
        status, answer, body, framing = client.response()
        assert answer["connection"] == "close" and framing == "length" and client.closed(within=2)
        client = Client(port)
        client.send(request("GET", headers=[*authorization(small), "Connection: keep-alive, close"],
                            version="HTTP/1.0"))
        assert client.response()[1]["connection"] == "close" and client.closed(within=2)


def test_connection_close_is_honoured(db_path, small_and_large):
    small, _ = small_and_large
    with http11_server(db_path) as port:
        client = Client(port)
        client.send(request("POST", headers=[*authorization(small), "Connection: close"]))
        status, headers, _, _ = client.response()
        assert status == 200 and headers["connection"] == "close" and client.closed()


def test_an_idle_connection_is_closed_after_the_idle_timeout(db_path, small_and_large):
    small, _ = small_and_large
    with http11_server(db_path, idle_timeout=0.5) as port:
        client = Client(port)
        client.send(request("POST", headers=authorization(small)))
        assert client.response()[0] == 200
        started = time.monotonic()
        assert client.closed(within=5)
        assert 0.4 < time.monotonic() - started < 3
        silent = Client(port)                                  # one that never sends anything
        assert silent.closed(within=5)


def test_idle_clients_never_hold_every_worker(db_path, small_and_large):
    """Two workers, 300 idle keep-alive connections: a new client is still answered at once."""
    small, _ = small_and_large
    with http11_server(db_path, threads=2) as port:
        idle = [Client(port) for _ in range(300)]
        for client in idle[:50]:                               # some have had an answer and stay open
            client.send(request("POST", headers=authorization(small)))
            assert client.response()[0] == 200
        started = time.monotonic()
        newcomer = Client(port)
        newcomer.send(request("POST", headers=authorization(small)))
        assert newcomer.response()[0] == 200
        assert time.monotonic() - started < 2
        for client in idle[:50]:
            client.send(request("POST", headers=authorization(small)))
            assert client.response()[0] == 200
        for client in [*idle, newcomer]:
            client.close()


def test_at_the_bound_the_oldest_idle_connections_make_room(db_path, small_and_large):
    small, _ = small_and_large
    with http11_server(db_path, max_connections=5) as port:
        first = [Client(port) for _ in range(5)]
        for client in first:
            client.send(request("POST", headers=authorization(small)))
            assert client.response()[0] == 200
        newcomer = Client(port)
        newcomer.send(request("POST", headers=authorization(small)))
        assert newcomer.response()[0] == 200
        assert first[0].closed(within=5)                       # the oldest idle one made room
        first[-1].send(request("POST", headers=authorization(small)))
        assert first[-1].response()[0] == 200                  # the others stay open
        for client in [*first, newcomer]:
            client.close()


def test_a_body_that_stops_arriving_is_408_after_the_read_timeout(db_path, small_and_large):
    small, _ = small_and_large
    with http11_server(db_path, read_timeout=0.5) as port:
        client = Client(port)
        client.send(b"POST /v1/export/ical HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Token token={small}\r\nContent-Length: 100\r\n\r\n".encode() + b'{"gro')
        status, headers, body, _ = client.response()
        assert status == 408 and b"request body not received in time" in body
        assert client.closed()


@pytest.mark.parametrize("framing, status", [
    (["Transfer-Encoding: chunked"], 411),
    (["Content-Length: 4", "Transfer-Encoding: chunked"], 411),
    (["Content-Length: 4", "Content-Length: 5"], 400),
    (["Content-Length: 4, 4"], 400),
    (["Content-Length: -4"], 400),
])
def test_ambiguous_framing_is_refused_and_closes_the_connection(db_path, small_and_large, framing, status):
    """No request can hide in another's body (RFC 9112 §6.3): the answer comes, then the connection closes."""
    small, _ = small_and_large
    smuggled = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    with http11_server(db_path) as port:
        client = Client(port)
        head = "\r\n".join(["POST /v1/export/ical HTTP/1.1", "Host: x", *authorization(small), *framing])
        client.send(head.encode() + b"\r\n\r\n" + b"4\r\n{}{}\r\n0\r\n\r\n" + smuggled)
        assert client.response()[0] == status
        assert client.closed() and client.buffer == b""


def test_an_unread_body_is_skipped_not_read_as_the_next_request(db_path, small_and_large):
    small, _ = small_and_large
    smuggled = b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    with http11_server(db_path) as port:
        client = Client(port)
        # the export path never reads a body on 405; the body looks like a request of its own
        client.send(request("DELETE", headers=["Content-Type: text/plain"], body=smuggled),
                    request("POST", headers=authorization(small)))
        assert client.response()[0] == 405
        assert client.response()[0] == 200                    # the next request, not the "smuggled" 404
        client.close()


def test_expect_100_continue_is_answered_before_the_body_is_sent(db_path, small_and_large):
    """curl sends `Expect: 100-continue` for larger bodies and waits for the interim answer."""
    small, _ = small_and_large
    body = b'{"group": null, "padding": "' + b"x" * 2000 + b'"}'
    with http11_server(db_path) as port:
        client = Client(port, timeout=2)
        client.send(b"POST /v1/export/ical HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Token token={small}\r\nExpect: 100-continue\r\n".encode()
                    + f"Content-Length: {len(body)}\r\n\r\n".encode())
        status, _, _, _ = client.response()                    # within the client's 2-second timeout
        assert status == 100
        client.send(body)
        status, _, received, _ = client.response()
        assert status == 200 and received.endswith(b"END:VCALENDAR\r\n")
        client.close()


# --- serve --workers: processes sharing the port ------------------------------------------------------------

def children_of(pid):
    """The pids whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
    return sorted(found)


def established_on(pid, port):
    """How many TCP connections to local ``port`` the process ``pid`` holds (from /proc)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    count = 0
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
                count += 1
    return count


@contextlib.contextmanager
def serve_with_workers(db_path, workers, *options):
    """running_server with ``workers`` processes of 2 threads; yields (process, port). A worker still alive
    once the supervisor has gone is killed, and fails the test."""
    started = []
    try:
        with running_server(db_path, 2, "--workers", str(workers), *options) as (base, server):
            assert f"({workers} workers x 2 threads, HTTP/1.1)" in server.ready_line
            started = children_of(server.pid)
            yield server, int(base.rsplit(":", 1)[1])
    finally:
        left = [pid for pid in started if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert left == [], "workers outlived the supervisor"


def alive(pid):
    """Whether ``pid`` runs (a zombie no longer does)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_share_the_port_and_the_connections(db_path, small_and_large):
    small, _ = small_and_large
    with serve_with_workers(db_path, 2) as (server, port):
        workers = children_of(server.pid)
        assert len(workers) == 2
        clients = [Client(port) for _ in range(16)]
        try:
            for client in clients:
                client.send(request(headers=authorization(small)))
                status, headers, body, _ = client.response()
                assert status == 200 and body.count(b"BEGIN:VEVENT") == 3
            held = [established_on(worker, port) for worker in workers]
            assert sum(held) == 16 and min(held) >= 1, held       # both workers answer
            for client in clients:                                 # and keep their connections alive
                client.send(request(headers=authorization(small)))
                assert client.response()[0] == 200
        finally:
            for client in clients:
                client.sock.close()


def test_a_worker_that_dies_is_replaced_and_sigterm_stops_them_all(db_path, small_and_large):
    small, _ = small_and_large
    with serve_with_workers(db_path, 2) as (server, port):
        first = children_of(server.pid)
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        now = children_of(server.pid)
        while (len(now) < 2 or first[0] in now) and time.monotonic() < deadline:    # one scan each time
            time.sleep(0.05)
            now = children_of(server.pid)
        assert len(now) == 2 and first[0] not in now and first[1] in now, (first, now)
        for _ in range(8):
            client = Client(port)
            client.send(request(headers=authorization(small)))
            assert client.response()[0] == 200
            client.sock.close()
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0
        assert children_of(server.pid) == []
    errors = server.log.read_text()
    assert "Traceback" not in errors
    assert f"worker {first[0]} ended (signal 9); starting another" in errors
    assert errors.count("server stopped") == 3                    # each worker, then the supervisor


def test_workers_stop_when_their_supervisor_is_killed(db_path, small_and_large):
    with serve_with_workers(db_path, 2) as (server, port):
        workers = children_of(server.pid)
        server.kill()                                  # SIGKILL: no chance to stop them itself
        server.wait()
        deadline = time.monotonic() + 10
        while any(alive(worker) for worker in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(worker) for worker in workers)
    assert "the supervisor" in server.log.read_text() and "is gone; stopping" in server.log.read_text()


def test_workers_must_be_a_sensible_number(db_path):
    for value in ("0", "65"):
        assert "--workers must be 1-64" in one_line_error(cli("serve", "--db", str(db_path), "--workers", value))
