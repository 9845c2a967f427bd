"""The deployment files of deploy/ (docs/production.md, docs/several-machines.md): the systemd unit passes
`systemd-analyze verify`, the nginx site, started for real in front of `serve`, proxies exports and
keeps feed secrets out of its access log, and the load balancer of several machines sends feed changes to
the primary and the rest to a replica."""

import contextlib
import json
import os
import re
import shutil
import sqlite3
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import auth
from test_cli import ROOT, free_port
from test_hardening import running_server

DEPLOY = Path(ROOT) / "deploy"


def required(tool):
    """A tool the test starts; .ci/run installs them, so under CI a missing one is a failure, not a skip."""
    path = shutil.which(tool) or next((path for path in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}")
                                       if os.path.exists(path)), None)
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed (.ci/run installs it)")
        pytest.skip(f"{tool} is not installed")
    return path


def test_the_systemd_unit_verifies_and_is_sandboxed(tmp_path):
    verify = required("systemd-analyze")
    unit = (DEPLOY / "timeslot-export.service").read_text()
    for setting in ("User=timeslot", "NoNewPrivileges=yes", "ProtectSystem=strict",
                    "ReadWritePaths=/var/lib/timeslot", "ReadOnlyPaths=", "ProtectHome=yes", "PrivateTmp=yes",
                    "CapabilityBoundingSet=\n",
                    "--host 127.0.0.1", "KillSignal=SIGTERM"):
        assert setting in unit, setting
    # verify checks that ExecStart's program exists: point it at this checkout's installed console script
    local = tmp_path / "timeslot-export.service"
    installed = str(Path(ROOT, ".venv", "bin", "timeslot-export"))
    local.write_text(unit.replace("/opt/timeslot/venv/bin/timeslot-export", installed))
    result = subprocess.run([verify, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_the_follower_unit_verifies_and_is_sandboxed(tmp_path):
    verify = required("systemd-analyze")
    unit = (DEPLOY / "timeslot-follow.service").read_text()
    for setting in ("User=timeslot", "NoNewPrivileges=yes", "ProtectSystem=strict", "ReadWritePaths=/var/lib/timeslot",
                    "EnvironmentFile=/etc/timeslot/replica.env", "Restart=always", "Before=timeslot-export.service"):
        assert setting in unit, setting
    local = tmp_path / "timeslot-follow.service"
    (tmp_path / "replica.env").write_text("TIMESLOT_REPLICA_URL=file:///var/lib/timeslot-replica\n")
    local.write_text(unit.replace("/usr/local/bin/timeslot-follow", str(DEPLOY / "timeslot-follow"))
                     .replace("/etc/timeslot/replica.env", str(tmp_path / "replica.env")))
    result = subprocess.run([verify, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@contextlib.contextmanager
def running_nginx(tmp_path, site_file, upstreams):
    """nginx started for real with a site of deploy/, moved to loopback ports, a self-signed certificate and
    ``upstreams`` ({text in the file: what replaces it}, the addresses of running servers); yields the https
    origin; always stopped. The file's example addresses must all be replaced: nothing but loopback is asked."""
    nginx, openssl = required("nginx"), required("openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True,
                   capture_output=True, timeout=60)
    http_port, https_port = free_port(), free_port()
    site = (DEPLOY / site_file).read_text()
    replacements = [("listen 80;", f"listen 127.0.0.1:{http_port};"),
                    ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
                    ("/var/log/nginx/", f"{tmp_path}/"),
                    ("/etc/ssl/certs/calendar.example.org.pem", str(tmp_path / "cert.pem")),
                    ("/etc/ssl/private/calendar.example.org.key", str(tmp_path / "key.pem"))]
    for old, new in [*replacements, *upstreams.items()]:
        assert old in site, old
        site = site.replace(old, new)
    assert not re.search(r"server (?!127\.0\.0\.1:)\S+;", site), site               # loopback upstreams only
    site = re.sub(r"\n\s*listen \[::\]:\d+( ssl)?;", "", site)          # loopback only, IPv4
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\ndaemon off;\nevents {{}}\n"
        f"http {{\n    include {tmp_path}/site.conf;\n}}\n")
    command = [nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr
    proxy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        origin = f"https://127.0.0.1:{https_port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(origin + "/", context=UNVERIFIED, timeout=5).close()
            except urllib.error.HTTPError:
                break                                                     # nginx answers (the service's 404)
            except OSError:
                assert proxy.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        yield origin
    finally:
        proxy.terminate()
        proxy.wait(timeout=15)


UNVERIFIED = ssl._create_unverified_context()                           # the self-signed certificate


def through(origin, path, method="GET", token=None, body=None):
    """(status, headers, body) of one request to ``origin`` (the proxy, or a server itself); HTTP errors are
    answers too."""
    headers = {**(auth(token) if token else {}), **({"Content-Type": "application/json"} if body is not None else {})}
    request = urllib.request.Request(origin + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, context=UNVERIFIED, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_the_nginx_site_proxies_the_service_and_masks_feed_secrets(tmp_path, data, db_path):
    user_id, token = data.user()
    data.slot(user_id, title="Through the proxy")
    _, secret = data.feed(user_id)
    with running_server(db_path) as (base, _), running_nginx(tmp_path, "nginx-timeslot.conf",
                                                             {"127.0.0.1:8000": address(base)}) as origin:
        status, headers, _ = through(origin, f"/v1/feeds/{secret}.ics")
        assert status == 200 and headers["Content-Type"] == "text/calendar; charset=utf-8"
        assert through(origin, f"/v1/feeds/{secret}")[0] == 200
        status, headers, body = through(origin, "/v1/export/ical", "POST", token, {})
        assert status == 200 and b"SUMMARY:Through the proxy" in body
        assert len(headers["X-Request-Id"]) == 32                           # nginx's $request_id, echoed
        status, _, body = through(origin, "/v1/feeds", "POST", token, {"label": "via nginx"})
        assert status == 201 and json.loads(body)["url"].startswith("https://127.0.0.1/v1/feeds/")
    log = (tmp_path / "timeslot.access.log").read_text()
    assert '/v1/feeds/[secret].ics" 200' in log and '/v1/feeds/[secret]" 200' in log and secret not in log
    assert '"POST /v1/export/ical" 200' in log and '"POST /v1/feeds" 201' in log


def test_the_load_balancer_sends_feed_changes_to_the_primary_and_the_rest_to_a_replica(tmp_path, data, db_path):
    """deploy/nginx-timeslot-replicas.conf in front of a primary and a replica instance (`serve --replica` on a
    copy of the primary's database taken before the test's changes, so each answer shows who gave it)."""
    user_id, token = data.user()
    data.slot(user_id, title="Everywhere")
    old_feed, old_secret = data.feed(user_id)
    replica_path = tmp_path / "replica.sqlite3"
    with sqlite3.connect(db_path) as source, sqlite3.connect(replica_path) as copy:
        source.backup(copy)
    with running_server(db_path) as (primary, primary_process), \
            running_server(replica_path, 16, "--replica") as (replica, replica_process), \
            running_nginx(tmp_path, "nginx-timeslot-replicas.conf",
                          {"10.0.0.10:8000": address(primary), "10.0.0.11:8000": address(replica),
                           "    server 10.0.0.12:8000;\n": ""}) as origin:
        assert "hash $uri consistent;" in (tmp_path / "site.conf").read_text()
        # the replica itself refuses changes: they must go to the primary
        status, _, body = through(replica, "/v1/feeds", "POST", token, {})
        assert status == 503 and "primary" in json.loads(body)["error"]
        status, _, body = through(origin, "/v1/feeds", "POST", token, {"label": "new"})
        assert status == 201, body
        created = json.loads(body)
        new_secret = created["url"].rsplit("/", 1)[1][:-4]
        listing = json.loads(through(origin, "/v1/feeds", token=token)[2])["feeds"]
        assert [feed["id"] for feed in listing] == [old_feed, created["id"]]     # at once: the primary's list
        assert through(origin, f"/v1/feeds/{new_secret}")[0] == 200             # its page, at once
        assert through(origin, f"/v1/feeds/{new_secret}.ics")[0] == 200         # unknown to the replica yet
        assert through(origin, f"/v1/feeds/{old_secret}.ics")[0] == 200
        assert through(origin, "/v1/export/ical", "POST", token, {})[0] == 200
        assert through(origin, f"/v1/feeds/{created['id']}", "PATCH", token, {"label": "changed"})[0] == 200
        status, _, body = through(origin, f"/v1/feeds/{created['id']}/reset", "POST", token)
        assert status == 201
        assert through(origin, f"/v1/feeds/{json.loads(body)['id']}", "DELETE", token)[0] == 204
        assert through(origin, "/v1/feeds/Unknown-AbCdEfGhIjKlMnOpQrStUvWxYz0123456.ics")[0] == 404
        assert through(origin, "/v1/feeds/Unknown-AbCdEfGhIjKlMnOpQrStUvWxYz0123456")[0] == 404
    primary_log, replica_log = primary_process.log.read_text(), replica_process.log.read_text()
    for line in ("POST /v1/feeds 201", "GET /v1/feeds 200", "PATCH /v1/feeds/", "DELETE /v1/feeds/",
                 "/reset 201", "GET /v1/feeds/[secret] 200"):
        assert line in primary_log and line not in replica_log, line
    assert replica_log.count("POST /v1/export/ical 200") == 1 and "POST /v1/export/ical" not in primary_log
    assert replica_log.count("GET /v1/feeds/[secret].ics 200") == 1            # the old feed, from the replica
    assert replica_log.count("GET /v1/feeds/[secret].ics 404") == 2            # the new one and the unknown
    assert primary_log.count("GET /v1/feeds/[secret].ics 200") == 1            # the new one, asked again
    assert new_secret not in (tmp_path / "timeslot.access.log").read_text()


def address(base):
    """host:port of a base URL."""
    return base.split("//", 1)[1]
