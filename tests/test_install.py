"""SPEC §6 "Installed, not only checked out": the wheel, installed into a fresh virtual environment, runs
every command from another directory (the schema ships inside what is installed)."""

import json
import os
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from test_cli import ROOT, free_port


def run(command, cwd, **kwargs):
    result = subprocess.run(command, cwd=cwd, capture_output=True, timeout=300, **kwargs)
    assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
    return result.stdout.decode()


@pytest.mark.slow
def test_the_installed_wheel_runs_every_command_from_any_directory(tmp_path):
    dist, env, elsewhere = tmp_path / "dist", tmp_path / "env", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist), ROOT], cwd=tmp_path)
    (wheel,) = dist.glob("timeslot_export-*.whl")
    run([sys.executable, "-m", "venv", str(env)], cwd=tmp_path)
    python, command = str(env / "bin" / "python"), str(env / "bin" / "timeslot-export")
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(wheel)], cwd=tmp_path)
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("TIMESLOT_")}
    module = run([python, "-c", "import timeslot_export; print(timeslot_export.__file__)"], elsewhere,
                 env=environment)
    assert module.startswith(str(env)), module                    # the installed copy, not the checkout

    def cli(*arguments):
        return run([command, *arguments], elsewhere, env=environment)

    assert "Database ready" in cli("initdb", "--db", "x.sqlite3")
    assert "API token" in cli("add-user", "ann", "--db", "x.sqlite3")
    token = cli("demo", "--db", "x.sqlite3").split("API token: ")[1].split()[0]
    cli("export", "demo", "--db", "x.sqlite3", "-o", "demo.ics")
    exported = (elsewhere / "demo.ics").read_bytes()
    assert b"BEGIN:VTIMEZONE" in exported and exported.count(b"BEGIN:VEVENT") == 6
    assert "webcal://" in cli("feed", "create", "demo", "--db", "x.sqlite3")
    assert "full" in cli("feed", "list", "demo", "--db", "x.sqlite3")
    assert run([python, "-m", "timeslot_export", "--version"], elsewhere, env=environment).strip()
    port = free_port()
    server = subprocess.Popen([command, "serve", "--db", "x.sqlite3", "--port", str(port), "--threads", "2"],
                              cwd=elsewhere, env=environment, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert b"Serving" in server.stdout.readline()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/export/ical", data=b"", method="POST",
                                         headers={"Authorization": f"Token token={token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200 and response.read() == exported
        with pytest.raises(urllib.error.HTTPError) as not_found:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nowhere", timeout=30)
        assert not_found.value.code == 404 and json.loads(not_found.value.read()) == {"error": "not found"}
    finally:
        server.terminate()
        server.wait(timeout=15)


@pytest.mark.slow
def test_make_dist_builds_a_wheel_an_sdist_and_a_standard_library_zipapp(tmp_path):
    """`python3 timeslot-export.pyz ...` on an appliance: no site-packages (-I -S), from any directory."""
    dist, elsewhere = tmp_path / "dist", tmp_path / "elsewhere"
    elsewhere.mkdir()
    run(["make", "dist", f"DIST={dist}"], cwd=ROOT)
    names = sorted(path.name for path in dist.iterdir())
    assert len(names) == 3 and names[0] == "timeslot-export.pyz" and names[1].endswith(".whl")
    with tarfile.open(dist / names[2]) as sdist:
        members = {Path(name).name for name in sdist.getnames()}
    assert {"timeslot_export.py", "schema.sql", "conftest.py", "rfc5545.py", "schema-1.0.0.sql", "schema-1.1.0.sql"} <= members
    with zipfile.ZipFile(dist / names[1]) as wheel:
        assert any(name.endswith("data/share/timeslot-export/schema.sql") for name in wheel.namelist())
    pyz = [sys.executable, "-I", "-S", str(dist / "timeslot-export.pyz")]
    assert "Database ready" in run([*pyz, "initdb", "--db", "x.sqlite3"], elsewhere)
    assert "API token" in run([*pyz, "demo", "--db", "x.sqlite3"], elsewhere)
    assert run([*pyz, "export", "demo", "--db", "x.sqlite3"], elsewhere).count("BEGIN:VEVENT") == 6
    failed = subprocess.run([*pyz, "export", "nobody", "--db", "x.sqlite3"], cwd=elsewhere, capture_output=True)
    assert failed.returncode == 1 and failed.stderr == b"timeslot-export: no such user: nobody\n"
