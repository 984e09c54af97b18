"""Tests of kale_ext.loaddata.leads: alias matching, lead sets and limb-lead derivation."""

import numpy as np
import pytest

from kale_ext.loaddata.leads import (
    CANONICAL_LEADS,
    LEAD_SETS,
    canonical_lead_name,
    derive_limb_leads,
    match_channels,
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
