"""The deployment files of deploy/ (README.md, "Running in production"): the systemd unit passes
`systemd-analyze verify`, and the nginx site, started for real in front of `serve`, proxies exports and
keeps feed secrets out of its access log."""

import os
import re
import shutil
import ssl
import subprocess
import time
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


def test_the_nginx_site_proxies_the_service_and_masks_feed_secrets(tmp_path, data, db_path):
    nginx, openssl = required("nginx"), required("openssl")
    user_id, token = data.user()
    data.slot(user_id, title="Through the proxy")
    _, secret = data.feed(user_id)
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")], check=True,
                   capture_output=True, timeout=60)
    http_port, https_port = free_port(), free_port()
    with running_server(db_path) as (base, _):
        site = (DEPLOY / "nginx-timeslot.conf").read_text()
        for old, new in (("listen 80;", f"listen 127.0.0.1:{http_port};"),
                         ("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
                         ("127.0.0.1:8000", base.split("//")[1]), ("/var/log/nginx/", f"{tmp_path}/"),
                         ("/etc/ssl/certs/calendar.example.org.pem", str(tmp_path / "cert.pem")),
                         ("/etc/ssl/private/calendar.example.org.key", str(tmp_path / "key.pem"))):
            assert old in site, old
            site = site.replace(old, new)
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
            context = ssl._create_unverified_context()                     # the self-signed certificate
            origin = f"https://127.0.0.1:{https_port}"
            deadline = time.monotonic() + 30
            while True:
                try:
                    feed = urllib.request.urlopen(f"{origin}/v1/feeds/{secret}.ics", context=context, timeout=5)
                    break
                except OSError:
                    assert proxy.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            with feed:
                assert feed.status == 200 and feed.headers["Content-Type"] == "text/calendar; charset=utf-8"
            request = urllib.request.Request(f"{origin}/v1/export/ical", data=b"", method="POST", headers=auth(token))
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                assert response.status == 200 and b"SUMMARY:Through the proxy" in response.read()
                assert len(response.headers["X-Request-Id"]) == 32               # nginx's $request_id, echoed
        finally:
            proxy.terminate()
            proxy.wait(timeout=15)
    log = (tmp_path / "timeslot.access.log").read_text()
    assert "/v1/feeds/[secret].ics" in log and secret not in log and '"POST /v1/export/ical" 200' in log
