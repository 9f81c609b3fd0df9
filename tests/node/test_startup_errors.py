"""Start-up errors of ``mr2nst serve``: one line on stderr, exit 2 (config) or 1 (runtime)."""

import json
import os
import socket
import subprocess
import sys

import pytest


def serve(conf, timeout=60):
    """Run ``mr2nst serve --config conf``; returns (exit code, the non-log lines of stderr).

    Log lines (JSON) may come before the failure; the failure itself is one line.
    """
    done = subprocess.run(
        [sys.executable, "-m", "mr2nst.node.cli.main", "serve", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert "Traceback" not in done.stderr, done.stderr
    other = []
    for line in done.stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            if line.strip():
                other.append(line)
    return done.returncode, other


def write_conf(tmp_path, data_dir, host="127.0.0.1", port=0):
    conf = tmp_path / "node.toml"
    conf.write_text(
        f'[node]\nhost = "{host}"\nport = {port}\ndata_dir = "{data_dir}"\n'
        "min_free_disk_mb = 0\n[workers]\ncount = 1\n"
    )
    return conf


def test_data_dir_is_a_file(tmp_path):
    """A data_dir that is a file: exit 1, one line naming data_dir."""
    data = tmp_path / "data"
    data.write_text("not a directory")
    code, lines = serve(write_conf(tmp_path, data))
    assert code == 1
    [line] = lines
    assert line.startswith("mr2nst: error:") and "data_dir" in line and str(data) in line


def test_invalid_host_is_a_config_error(tmp_path):
    """node.host = 999.1.1.1: exit 2 (config), one line naming the key."""
    code, lines = serve(write_conf(tmp_path, tmp_path / "data", host="999.1.1.1"))
    assert code == 2
    [line] = lines
    assert "host" in line and "999.1.1.1" in line


def test_port_in_use(tmp_path):
    """The node's port is taken: exit 1, one line naming host and port."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines = serve(write_conf(tmp_path, tmp_path / "data", port=port))
    assert code == 1
    [line] = lines
    assert f"127.0.0.1:{port}" in line and "in use" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_data_dir(tmp_path):
    """A data_dir that cannot be written: exit 1, one line naming data_dir."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o555)
    try:
        code, lines = serve(write_conf(tmp_path, data))
    finally:
        data.chmod(0o755)
    assert code == 1
    [line] = lines
    assert "data_dir" in line and str(data) in line


def test_read_only_file_system(tmp_path, monkeypatch, capsys):
    """A data_dir on a read-only file system (EROFS, simulated: tests may run as root):
    exit 1, one line naming data_dir and the reason."""
    import errno
    import logging
    from pathlib import Path

    import structlog

    from mr2nst.node.cli.main import main

    data = tmp_path / "data"
    for sub in ("spool/tmp", "spool/in", "outbox", "dead"):
        (data / sub).mkdir(parents=True)

    def read_only(self, *_args, **_kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    try:
        code = main(["serve", "--config", str(write_conf(tmp_path, data))])
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("mr2nst:")]
    assert "data_dir" in line and "Read-only file system" in line
