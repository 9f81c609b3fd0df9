"""Tests of route matching and decisions."""

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, DigitalMammographyXRayImageStorageForPresentation

from mr2nst.node.config import parse_config
from mr2nst.node.errors import ConfigError
from mr2nst.node.service.routing import Router, matches


def ds(**kw) -> Dataset:
    d = Dataset()
    d.SOPClassUID = kw.pop("SOPClassUID", DigitalMammographyXRayImageStorageForPresentation)
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def router(*routes) -> Router:
    cfg = parse_config(
        {
            "routes": list(routes),
            "destinations": {
                "cad": {"ae_title": "CAD", "host": "h", "port": 1},
                "pacs": {"ae_title": "P", "host": "h", "port": 2},
            },
        },
        environ={},
    )
    return Router(cfg.routes)


def test_glob_and_multivalue_matching():
    """Globs match case-sensitively; multi-valued attributes match on any value."""
    d = ds(Modality="MG", Manufacturer="GE MEDICAL SYSTEMS", ImageType=["ORIGINAL", "PRIMARY"])
    assert matches({"Modality": "MG", "Manufacturer": "GE*"}, d, "A", "B")
    assert not matches({"Manufacturer": "ge*"}, d, "A", "B")
    assert matches({"ImageType": "PRIMARY"}, d, "A", "B")
    assert not matches({"BodyPartExamined": "BREAST"}, d, "A", "B")
    assert matches({"BodyPartExamined": "*"}, d, "A", "B")
    assert matches({"calling_ae": "MOD*", "called_ae": "MR2NST"}, d, "MOD1", "MR2NST")


def test_first_matching_route_wins():
    """Routes are tried in order and the first match decides."""
    r = router(
        {
            "name": "ge",
            "match": {"Manufacturer": "GE*"},
            "method": "passthrough",
            "destinations": ["cad"],
        },
        {"name": "all", "match": {}, "action": "forward", "destinations": ["pacs"]},
    )
    d = r.decide(ds(Manufacturer="GE"), "A", "B")
    assert (d.route, d.action, d.method, d.destinations) == (
        "ge",
        "normalize",
        "passthrough",
        ("cad",),
    )
    d = r.decide(ds(Manufacturer="Hologic"), "A", "B")
    assert (d.route, d.action, d.method, d.destinations) == ("all", "forward", None, ("pacs",))


def test_normalize_route_skips_non_images():
    """A normalize route passes over an SR with a reason; the next route applies."""
    r = router(
        {"name": "ge", "match": {}, "method": "passthrough", "destinations": ["cad"]},
        {"name": "rest", "match": {}, "action": "forward", "destinations": ["pacs"]},
    )
    d = r.decide(ds(SOPClassUID=BasicTextSRStorage), "A", "B")
    assert d.route == "rest" and d.skipped and "ge:" in d.skipped[0]


def test_drop_and_unrouted():
    """A drop route drops; no matching route gives action none."""
    r = router({"name": "junk", "match": {"Modality": "OT"}, "action": "drop"})
    assert r.decide(ds(Modality="OT"), "A", "B").action == "drop"
    assert r.decide(ds(Modality="MG"), "A", "B").action == "none"


def test_unknown_keyword_is_config_error():
    """A match key that is not a DICOM keyword is rejected when the router is built."""
    with pytest.raises(ConfigError, match=r"routes\[0\].match.Manufactrer"):
        router({"name": "x", "match": {"Manufactrer": "GE"}, "action": "drop"})


def test_decision_carries_priority_fallback_and_forward_original():
    """A decision carries the route's priority, where the original goes on failure, and
    forward_original; a hold route has no fallback, a forward route none either."""
    r = router(
        {
            "name": "ge",
            "match": {"Manufacturer": "GE*"},
            "method": "ehm",
            "destinations": ["cad"],
            "priority": 4,
            "forward_original": ["pacs"],
        },
        {
            "name": "held",
            "match": {"Manufacturer": "Held"},
            "destinations": ["cad"],
            "on_failure": "hold",
            "fallback_destinations": ["pacs"],
        },
        {"name": "rest", "match": {}, "action": "forward", "destinations": ["pacs"], "priority": 9},
    )
    ge = r.decide(ds(Manufacturer="GE"), "A", "B")
    assert (ge.priority, ge.fallback, ge.forward_original) == (4, ("cad",), ("pacs",))
    held = r.decide(ds(Manufacturer="Held"), "A", "B")
    assert (held.priority, held.fallback, held.forward_original) == (0, (), ())
    rest = r.decide(ds(Manufacturer="Other"), "A", "B")
    assert (rest.action, rest.priority, rest.fallback) == ("forward", 9, ())
