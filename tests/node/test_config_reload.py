"""Reloading routes and destinations in a running node (SIGHUP, ``mr2nst config reload``)."""

from pathlib import Path

import pytest
from dicom_factory import make_mg

from mr2nst.node.cli.main import main
from mr2nst.node.config import load_config
from mr2nst.node.errors import ConfigError
from mr2nst.node.service.health import NodeStatus, read_status, write_status
from mr2nst.node.service.node import Node
from mr2nst.node.service.reload import plan_reload


def write_config(path: Path, data_dir: Path, destination: str, port: int = 11112) -> Path:
    """A node config whose one MG route forwards to ``destination``."""
    path.write_text(
        f"""
[node]
data_dir = "{data_dir}"
port = {port}

[[routes]]
name = "mg"
match = {{ Modality = "MG" }}
action = "forward"
destinations = ["{destination}"]

[destinations.{destination}]
ae_title = "{destination.upper()}"
host = "127.0.0.1"
port = 104
"""
    )
    return path


def test_plan_takes_routes_and_destinations_only(tmp_path):
    """A reload applies new routes and destinations; a changed port is reported, not applied."""
    running = load_config(write_config(tmp_path / "a.toml", tmp_path / "data", "cad"))
    new = load_config(write_config(tmp_path / "b.toml", tmp_path / "data", "pacs", port=4242))
    plan = plan_reload(running, new)
    assert plan.changed == ("routes", "destinations")
    assert plan.needs_restart == ("node",)
    assert plan.config.node.port == 11112
    assert list(plan.config.destinations) == ["pacs"]
    assert plan.config.routes[0].destinations == ("pacs",)


def test_plan_of_the_same_file_changes_nothing(tmp_path):
    """Reloading an unchanged file changes nothing and needs no restart."""
    path = write_config(tmp_path / "a.toml", tmp_path / "data", "cad")
    plan = plan_reload(load_config(path), load_config(path))
    assert (plan.changed, plan.needs_restart) == ((), ())


def test_plan_refuses_an_unknown_match_key(tmp_path):
    """A route matching on a non-DICOM keyword is refused, as at start."""
    running = load_config(write_config(tmp_path / "a.toml", tmp_path / "data", "cad"))
    bad = write_config(tmp_path / "b.toml", tmp_path / "data", "cad")
    bad.write_text(bad.read_text().replace("Modality", "NotAKeyword"))
    with pytest.raises(ConfigError, match="NotAKeyword"):
        plan_reload(running, load_config(bad))


def test_node_reload_swaps_routes_and_keeps_them_on_a_bad_file(tmp_path):
    """Node.reload routes new instances by the new file; a broken file changes nothing."""
    path = write_config(tmp_path / "node.toml", tmp_path / "data", "cad")
    node = Node(load_config(path), path)
    ds = make_mg()
    assert node.router.decide(ds, "MODALITY", "MR2NST").destinations == ("cad",)

    write_config(path, tmp_path / "data", "pacs")
    assert node.reload()
    assert node.router.decide(ds, "MODALITY", "MR2NST").destinations == ("pacs",)
    assert list(node.config.destinations) == ["pacs"]

    path.write_text("[[routes]\nname = ")  # not TOML
    assert not node.reload()
    assert node.router.decide(ds, "MODALITY", "MR2NST").destinations == ("pacs",)


def test_node_without_a_config_file_refuses_to_reload(tmp_path):
    """A node built from a Config object alone has no file to read again."""
    path = write_config(tmp_path / "node.toml", tmp_path / "data", "cad")
    assert not Node(load_config(path)).reload()


def test_cli_reload_without_a_running_node_exits_1(tmp_path, capsys):
    """`config reload` with no status file says no node runs there and exits 1."""
    path = write_config(tmp_path / "node.toml", tmp_path / "data", "cad")
    assert main(["config", "reload", "--config", str(path)]) == 1
    assert "no node is running" in capsys.readouterr().err


def test_cli_reload_of_an_invalid_file_exits_2_and_signals_nothing(tmp_path, capsys):
    """An invalid file is refused by the command itself (exit 2); the node is not signalled."""
    path = write_config(tmp_path / "node.toml", tmp_path / "data", "cad")
    path.write_text(path.read_text().replace('destinations = ["cad"]', 'destinations = ["x"]'))
    assert main(["config", "reload", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x" in err


def test_cli_reload_of_a_stopped_node_exits_1(tmp_path, capsys):
    """A status file left by a node that stopped: exit 1, saying when it stopped."""
    data = tmp_path / "data"
    data.mkdir()
    path = write_config(tmp_path / "node.toml", data, "cad")
    write_status(
        data,
        NodeStatus(1, "h", "v", "MR2NST", 104, "", 1.0, 1.0, 1, 1, "", stopped_at=2.0),
    )
    assert read_status(data) is not None
    assert main(["config", "reload", "--config", str(path)]) == 1
    assert "stopped at" in capsys.readouterr().err
