"""Lead names: the canonical 12, alias matching, named lead sets and derivation of limb leads.

Leads are always matched by name, never by position: archives differ in order (some list aVF before aVL) and in
spelling (``avr``, ``AVR``, ``LEAD_aVR``, ``ECG_II``, ``lead V1``). Matching strips separators and prefix words
(``lead``, ``ecg``, ``ekg``) and then compares whole tokens, so ``I`` never matches the start of ``II`` or ``III``.

Signed names: a channel recorded with inverted polarity is written ``-aVR`` (or ``aVR-``, ``-avr``, with a Unicode
minus, in any case). :func:`parse_lead_name` returns the lead and the sign ``-1``; :func:`map_channels` carries the
sign so that readers negate the channel and store it as the lead (``-aVR`` becomes ``aVR``). The plain name
functions (:func:`try_canonical_lead_name`, :func:`canonical_lead_name`) refuse signed names, so a signed channel can
never be taken un-negated by accident.
"""

import logging
import re
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

CANONICAL_LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LIMB_LEADS: tuple[str, ...] = CANONICAL_LEADS[:6]
LEAD_SETS: dict[str, tuple[str, ...]] = {"12L": CANONICAL_LEADS, "6L": LIMB_LEADS}

_LOOKUP = {name.lower(): name for name in CANONICAL_LEADS}
_PREFIX_WORDS = ("lead", "ecg", "ekg")
_MINUS_SIGNS = ("-", "\u2212", "\u2013")


def _strip_prefixes(token: str) -> str:
    changed = True
    while changed:
        changed = False
        for word in _PREFIX_WORDS:
            if token.startswith(word) and token[len(word) :] in _LOOKUP:
                token = token[len(word) :]
                changed = True
    return token


def _unsigned_name(alias: str) -> str | None:
    tokens = [t for t in re.split(r"[^0-9a-z]+", str(alias).strip().lower()) if t]
    tokens = [t for t in tokens if t not in _PREFIX_WORDS]
    if len(tokens) != 1:
        return None
    return _LOOKUP.get(_strip_prefixes(tokens[0]))


def _split_sign(alias: str) -> tuple[str, int]:
    text = str(alias).strip()
    sign = 1
    if text[:1] in _MINUS_SIGNS:
        sign, text = -1, text[1:].strip()
    elif text[-1:] in _MINUS_SIGNS:
        sign, text = -1, text[:-1].strip()
    elif text[:1] == "+":
        text = text[1:].strip()
    return text, sign


def parse_lead_name(alias: str) -> tuple[str, int] | None:
    """Canonical name and polarity of a channel name.

    Args:
        alias: a channel name, e.g. ``"aVR"``, ``"-aVR"``, ``"aVR-"``, ``"-avr"``, ``"+V1"``, ``"LEAD_II"``.

    Returns:
        ``(name, sign)`` with ``name`` in :data:`CANONICAL_LEADS` and ``sign`` ``1`` (as recorded) or ``-1``
        (inverted: the channel must be negated to give the lead), or ``None`` when the alias names no standard lead.
    """
    text, sign = _split_sign(alias)
    if not text or text[:1] in _MINUS_SIGNS + ("+",) or text[-1:] in _MINUS_SIGNS:
        return None  # '--aVR' or '-aVR-': ambiguous polarity, not a lead name
    name = _unsigned_name(text)
    return None if name is None else (name, sign)


def try_canonical_lead_name(alias: str) -> str | None:
    """Canonical name of an unsigned lead alias, or ``None`` when the alias names no standard lead.

    Signed names (``-aVR``) return ``None``: use :func:`parse_lead_name` to read their polarity.

    Args:
        alias: a channel name as found in a header, e.g. ``"avr"``, ``"LEAD_aVR"``, ``"lead V1"``, ``"ii"``.

    Returns:
        One of :data:`CANONICAL_LEADS` or ``None``.
    """
    parsed = parse_lead_name(alias)
    return parsed[0] if parsed is not None and parsed[1] == 1 else None


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
    if name is None and parse_lead_name(alias) is not None:
        raise ValueError(
            f"{alias!r} names an inverted lead; select leads by their plain names ({', '.join(CANONICAL_LEADS)})"
        )
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


class ChannelMap(NamedTuple):
    """How a record's channels map to the canonical leads.

    Attributes:
        slots: canonical lead name -> channel index.
        signs: canonical lead name -> ``1.0`` or ``-1.0`` (the channel was recorded inverted and must be negated).
        unrecognised: channel names that name no standard lead (e.g. a respiration trace), in file order.
        duplicates: channel names ignored because an earlier channel named the same lead.
    """

    slots: dict[str, int]
    signs: dict[str, float]
    unrecognised: tuple[str, ...]
    duplicates: tuple[str, ...]


def map_channels(channel_names: Sequence[str]) -> ChannelMap:
    """Map a record's channels to canonical leads by name, with their polarity.

    A signed name (``-aVR``, ``aVR-``) maps to the lead with sign ``-1``; when two channels name the same lead the
    first one wins and a warning is logged; channels that name no standard lead are listed in ``unrecognised``.

    Args:
        channel_names: the record's channel names, in file order.

    Returns:
        :class:`ChannelMap`.
    """
    slots: dict[str, int] = {}
    signs: dict[str, float] = {}
    unknown: list[str] = []
    dups: list[str] = []
    for idx, raw in enumerate(channel_names):
        parsed = parse_lead_name(raw)
        if parsed is None:
            logger.debug("channel %r is not a standard lead; ignored", raw)
            unknown.append(str(raw))
            continue
        name, sign = parsed
        if name in slots:
            first = channel_names[slots[name]]
            logger.warning("channels %r and %r both name lead %s; keeping the first", first, raw, name)
            dups.append(str(raw))
            continue
        slots[name] = idx
        signs[name] = float(sign)
    return ChannelMap(slots, signs, tuple(unknown), tuple(dups))


def match_channels(channel_names: Sequence[str]) -> dict[str, int]:
    """Map canonical lead names to channel positions of a record, by name.

    Channels that name no standard lead (e.g. a respiration trace) are ignored; when two channels name the same lead
    the first one wins and a warning is logged. Inverted channels (``-aVR``) are included: read their signs from
    :func:`map_channels`, which readers must use to store them negated.

    Args:
        channel_names: the record's channel names, in file order.

    Returns:
        Dict canonical lead name -> channel index.
    """
    return map_channels(channel_names).slots


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
