"""Tests of kale_ext.loaddata.leads: alias matching, lead sets and limb-lead derivation."""

import numpy as np
import pytest

from kale_ext.loaddata.leads import (
    CANONICAL_LEADS,
    LEAD_SETS,
    canonical_lead_name,
    derive_limb_leads,
    map_channels,
    match_channels,
    parse_lead_name,
    resolve_leads,
    try_canonical_lead_name,
)


@pytest.mark.parametrize(
    "alias, name",
    [
        ("avr", "aVR"),
        ("AVR", "aVR"),
        ("LEAD_aVR", "aVR"),
        ("i", "I"),
        ("ii", "II"),
        ("III", "III"),
        ("ECG_II", "II"),
        ("lead V1", "V1"),
        ("v1", "V1"),
        ("leadIII", "III"),
        (" aVf ", "aVF"),
        ("EKG-V6", "V6"),
    ],
)
def test_aliases(alias, name):
    assert canonical_lead_name(alias) == name


@pytest.mark.parametrize("alias", ["IIII", "V7", "resp", "I II", "avx", "", "lead"])
def test_non_leads_are_rejected(alias):
    assert try_canonical_lead_name(alias) is None
    with pytest.raises(ValueError, match="not a standard ECG lead"):
        canonical_lead_name(alias)


def test_resolve_leads():
    assert resolve_leads("12L") == CANONICAL_LEADS
    assert resolve_leads("6L") == ("I", "II", "III", "aVR", "aVL", "aVF")
    assert resolve_leads(["v2", "avl", "I"]) == ("V2", "aVL", "I")
    assert resolve_leads("aVF") == ("aVF",)
    assert set(LEAD_SETS) == {"12L", "6L"}
    with pytest.raises(ValueError):
        resolve_leads("3L")
    with pytest.raises(ValueError, match="twice"):
        resolve_leads(["aVL", "AVL"])


def test_match_channels_by_name_ignores_extras():
    names = ["V1", "resp", "avf", "AVL", "ii", "i", "III", "ii"]
    slots = match_channels(names)
    assert slots == {"V1": 0, "aVF": 2, "aVL": 3, "II": 4, "I": 5, "III": 6}


def test_derive_limb_leads_formulas_and_no_overwrite():
    rng = np.random.default_rng(0)
    x = np.zeros((12, 50))
    x[0], x[1] = rng.normal(size=50), rng.normal(size=50)
    x[4] = 7.0  # a present aVL must stay as recorded
    mask = np.zeros(12, bool)
    mask[[0, 1, 4]] = True
    y, m = derive_limb_leads(x, mask)
    assert m[:6].all() and not m[6:].any()
    np.testing.assert_allclose(y[2], x[1] - x[0])
    np.testing.assert_allclose(y[3], -(x[0] + x[1]) / 2)
    np.testing.assert_allclose(y[5], x[1] - x[0] / 2)
    assert (y[4] == 7.0).all()
    mask2 = mask.copy()
    mask2[1] = False
    y2, m2 = derive_limb_leads(x, mask2)
    np.testing.assert_array_equal(m2, mask2)


@pytest.mark.parametrize(
    "alias, parsed",
    [
        ("-aVR", ("aVR", -1)),
        ("aVR-", ("aVR", -1)),
        ("-avr", ("aVR", -1)),
        ("-AVR", ("aVR", -1)),
        ("\u2212aVR", ("aVR", -1)),
        (" - lead II ", ("II", -1)),
        ("+V1", ("V1", 1)),
        ("aVL", ("aVL", 1)),
        ("--aVR", None),
        ("-aVR-", None),
        ("-resp", None),
        ("-", None),
    ],
)
def test_signed_lead_names(alias, parsed):
    assert parse_lead_name(alias) == parsed


def test_signed_names_are_never_taken_unsigned():
    # a plain-name lookup of an inverted channel must not silently give the lead
    assert try_canonical_lead_name("-aVR") is None
    with pytest.raises(ValueError, match="inverted"):
        canonical_lead_name("-aVR")


def test_map_channels_carries_signs_and_reports_unknown_names():
    cmap = map_channels(["I", "-aVR", "ii", "resp", "V9", "aVR", "ii-"])
    assert cmap.slots == {"I": 0, "aVR": 1, "II": 2}
    assert cmap.signs == {"I": 1.0, "aVR": -1.0, "II": 1.0}
    assert cmap.unrecognised == ("resp", "V9")
    assert cmap.duplicates == ("aVR", "ii-")
    assert match_channels(["I", "-aVR"]) == {"I": 0, "aVR": 1}
