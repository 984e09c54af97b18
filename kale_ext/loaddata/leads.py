"""Lead names: the canonical 12, alias matching, named lead sets and derivation of limb leads.

Leads are always matched by name, never by position: archives differ in order (some list aVF before aVL) and in
spelling (``avr``, ``AVR``, ``LEAD_aVR``, ``ECG_II``, ``lead V1``). Matching strips separators and prefix words
(``lead``, ``ecg``, ``ekg``) and then compares whole tokens, so ``I`` never matches the start of ``II`` or ``III``.
"""

import logging
import re
from collections.abc import Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

CANONICAL_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LIMB_LEADS: tuple[str, ...] = CANONICAL_LEADS[:6]
LEAD_SETS: dict[str, tuple[str, ...]] = {"12L": CANONICAL_LEADS, "6L": LIMB_LEADS}

_LOOKUP = {name.lower(): name for name in CANONICAL_LEADS}
_PREFIX_WORDS = ("lead", "ecg", "ekg")


def _strip_prefixes(token: str) -> str:
    changed = True
    while changed:
        changed = False
        for word in _PREFIX_WORDS:
            if token.startswith(word) and token[len(word) :] in _LOOKUP:
                token = token[len(word) :]
                changed = True
    return token


def try_canonical_lead_name(alias: str) -> str | None:
    """Canonical name of a lead alias, or ``None`` when the alias names no standard lead.

    Args:
        alias: a channel name as found in a header, e.g. ``"avr"``, ``"LEAD_aVR"``, ``"lead V1"``, ``"ii"``.

    Returns:
        One of :data:`CANONICAL_LEADS` or ``None``.
    """
    tokens = [t for t in re.split(r"[^0-9a-z]+", str(alias).strip().lower()) if t]
    tokens = [t for t in tokens if t not in _PREFIX_WORDS]
    if len(tokens) != 1:
        return None
    return _LOOKUP.get(_strip_prefixes(tokens[0]))


def canonical_lead_name(alias: str) -> str:
    """Canonical name of a lead alias (case- and prefix-insensitive); raises when it names no standard lead.

    Args:
        alias: channel name, e.g. ``"avl"`` -> ``"aVL"``, ``"ECG_III"`` -> ``"III"``, ``"v1"`` -> ``"V1"``.

    Returns:
        One of :data:`CANONICAL_LEADS`.

    Raises:
        ValueError: the alias is not a standard 12-lead name.
    """
    name = try_canonical_lead_name(alias)
    if name is None:
        raise ValueError(f"{alias!r} is not a standard ECG lead name; use one of {', '.join(CANONICAL_LEADS)}")
    return name


def resolve_leads(leads: str | Iterable[str]) -> tuple[str, ...]:
    """Resolve a lead selection to canonical names.

    Args:
        leads: a named set (``"12L"`` or ``"6L"``), one lead name, or an iterable of (alias) names.

    Returns:
        Tuple of canonical names in the order given (named sets in canonical order).

    Raises:
        ValueError: unknown set or lead name, or a lead listed twice.
    """
    if isinstance(leads, str):
        if leads in LEAD_SETS:
            return LEAD_SETS[leads]
        if try_canonical_lead_name(leads) is None:
            raise ValueError(f"unknown lead set {leads!r}; use one of {sorted(LEAD_SETS)} or a list of lead names")
        leads = [leads]
    names = tuple(canonical_lead_name(a) for a in leads)
    if len(set(names)) != len(names):
        raise ValueError(f"lead selection {list(leads)} names a lead twice")
    if not names:
        raise ValueError("empty lead selection; use '12L', '6L' or a list of lead names")
    return names


def match_channels(channel_names: Sequence[str]) -> dict[str, int]:
    """Map canonical lead names to channel positions of a record, by name.

    Channels that name no standard lead (e.g. a respiration trace) are ignored; when two channels name the same lead
    the first one wins and a warning is logged.

    Args:
        channel_names: the record's channel names, in file order.

    Returns:
        Dict canonical lead name -> channel index.
    """
    found: dict[str, int] = {}
    for idx, raw in enumerate(channel_names):
        name = try_canonical_lead_name(raw)
        if name is None:
            logger.debug("channel %r is not a standard lead; ignored", raw)
            continue
        if name in found:
            first = channel_names[found[name]]
            logger.warning("channels %r and %r both name lead %s; keeping the first", first, raw, name)
            continue
        found[name] = idx
    return found


def derive_limb_leads(signals: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fill absent limb leads from leads I and II (Einthoven and Goldberger relations).

    III = II - I, aVR = -(I + II) / 2, aVL = I - II / 2, aVF = II - I / 2. Only absent limb leads are filled, and
    only when both I and II are present; present leads are never overwritten.

    Args:
        signals: (12, T) signals in canonical lead order (:data:`CANONICAL_LEADS`).
        mask: (12,) bool, True = lead present.

    Returns:
        ``(signals, mask)``: copies with the derived leads filled and marked present.
    """
    signals = np.array(signals, copy=True)
    mask = np.array(mask, dtype=bool, copy=True)
    if signals.shape[0] != len(CANONICAL_LEADS) or mask.shape != (len(CANONICAL_LEADS),):
        raise ValueError(
            f"expected (12, T) signals and (12,) mask in canonical order, got {signals.shape} {mask.shape}"
        )
    if not (mask[0] and mask[1]):
        return signals, mask
    lead_i, lead_ii = signals[0], signals[1]
    formulas = {
        "III": lambda: lead_ii - lead_i,
        "aVR": lambda: -(lead_i + lead_ii) / 2,
        "aVL": lambda: lead_i - lead_ii / 2,
        "aVF": lambda: lead_ii - lead_i / 2,
    }
    for name, formula in formulas.items():
        k = CANONICAL_LEADS.index(name)
        if not mask[k]:
            signals[k] = formula()
            mask[k] = True
    return signals, mask
