"""Tests of the node's configuration loading and validation."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from mr2nst.node.cli.main import main
from mr2nst.node.config import load_config, parse_config
from mr2nst.node.errors import ConfigError

GOOD = """
[node]
ae_title = "NODE1"
port = 11200
allowed_callers = ["MODALITY", "PACS@10.0.0.5"]

[[routes]]
name = "ge"
match = { Modality = "MG", Manufacturer = "GE*" }
action = "normalize"
method = "passthrough"
destinations = ["cad"]

[destinations.cad]
ae_title = "CAD"
host = "127.0.0.1"
port = 104
"""


def write(tmp_path: Path, text: str) -> Path:
    """Write ``text`` as the config file under ``tmp_path``."""
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults_written_once():
    """A config with no file gives the documented defaults."""
    cfg = load_config(None, environ={})
    assert (
        cfg.node.ae_title == "MR2NST" and cfg.node.port == 11112 and cfg.engine.grids == (1, 2, 4)
    )
    assert cfg.forwarding.max_attempts == 8 and cfg.derived.series_number_offset == 1000
    assert cfg.ledger_url.endswith("mr2nst-data/ledger.db")


def test_good_file_loads_frozen(tmp_path):
    """A valid file loads into a frozen object."""
    cfg = load_config(write(tmp_path, GOOD), environ={})
    assert cfg.routes[0].destinations == ("cad",) and cfg.destinations["cad"].port == 104
    with pytest.raises(ValidationError):
        cfg.node.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[node]\nport = 70000\n", "node.port"),
        ("[node]\nbogus = 1\n", "node.bogus: unknown key"),
        ("[engine]\ndevice = 'tpu'\n", "engine.device"),
        ("[node]\nallowed_callers = ['A@not-an-ip']\n", "node.allowed_callers"),
        ("[[routes]]\nname='r'\ndestinations=['nowhere']\n", "routes[0].destinations"),
        ("[logging]\nlevel = 'loud'\n", "logging.level"),
        ("[forwarding]\ncalling_ae = 'MUCH_TOO_LONG_AE_TITLE'\n", "forwarding.calling_ae"),
        ("[derived]\nuid_root = '1.2.x'\n", "derived.uid_root"),
        ("[ledger]\nurl = 'sqlitex:///x.db'\n", "ledger.url"),
        ("[engine]\nfeatures = 'hed-vgg19'\n", "engine.features"),
        ("[engine]\ncontent_layers = ['relu4_2', 'fc7']\n", "engine.content_layers"),
        ("[engine]\nstyle_weights = [1, 1]\n", "engine.style_weights"),
        ("[engine]\npixel_weight = -1\n", "engine.pixel_weight"),
        ("[engine]\nhistogram_weight = 'lots'\n", "engine.histogram_weight"),
        ("[engine]\nlr_schedule = 'cosine'\n", "engine.lr_schedule"),
        ("[engine]\nmerge = 'median'\n", "engine.merge"),
        ("[engine]\ntone = 'gamma'\n", "engine.tone"),
        ("[engine]\ndetail_sigma = -2\n", "engine.detail_sigma"),
        ("[engine]\nresample = 'nearest'\n", "engine.resample"),
        ("[engine]\npatch_size = 40\n", "engine.patch_size: must be a multiple of 16"),
        ("[engine]\ngrids = []\n", "engine.grids"),
        ("[engine]\noverlap = 0.5\n", "engine.overlap"),
        ("[engine]\niterations = -1\n", "engine.iterations"),
        ("[engine]\nlr = 0\n", "engine.lr"),
        ("[workers]\ncount = 0\n", "workers.count"),
        ("[spectral]\nbins = 2\n", "spectral.bins"),
        ("[spectral]\nmax_gain = 0.5\n", "spectral.max_gain"),
    ],
)
def test_bad_value_names_key(tmp_path, text, key):
    """Each bad key or value gives an error that names the key."""
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), environ={})
    assert key in str(info.value)


def test_env_overrides_file(tmp_path):
    """MR2NST_SECTION__KEY overrides the file, parsed as a TOML value."""
    cfg = load_config(
        write(tmp_path, GOOD),
        environ={"MR2NST_NODE__PORT": "11300", "MR2NST_LOGGING__LEVEL": "debug"},
    )
    assert cfg.node.port == 11300 and cfg.logging.level == "debug"


def test_invalid_toml_is_config_error(tmp_path):
    """A syntax error in the file is reported as a config error."""
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[node\n"), environ={})


def test_fingerprint_tracks_engine_settings():
    """The fingerprint changes with output-shaping settings, not with worker count."""
    base = parse_config({}, environ={})
    assert base.fingerprint() == parse_config({"workers": {"count": 4}}, environ={}).fingerprint()
    assert (
        base.fingerprint() != parse_config({"engine": {"iterations": 10}}, environ={}).fingerprint()
    )


def test_config_check_cli(tmp_path, capsys):
    """`mr2nst config check` exits 0 on a good file and 2 with a one-line reason on a bad one."""
    assert main(["config", "check", str(write(tmp_path, GOOD))]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text(
        "[[routes]]\nname='r'\nmatch={NotAKeyword='x'}\ndestinations=['d']\n"
        "[destinations.d]\nae_title='D'\nhost='h'\nport=1\n"
    )
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "routes[0].match.NotAKeyword" in err


def test_unknown_method_rejected(tmp_path, capsys):
    """A route naming a method that does not exist is a config error naming the key."""
    text = GOOD.replace('method = "passthrough"', 'method = "nosuchmethod"')
    assert main(["config", "check", str(write(tmp_path, text))]) == 2
    assert "routes[0].method" in capsys.readouterr().err
