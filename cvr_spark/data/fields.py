"""Field catalogue of Ali-CCP and the field presets.

Groups follow MODELS.md §9.2: user fields are keyed by ``101`` (user id), item fields by
``205`` (item id); the rest is context (cross features and the scenario field).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

USER_KEY_FIELD = "101"
ITEM_KEY_FIELD = "205"

USER_FIELDS = ["101", "121", "122", "124", "125", "126", "127", "128", "129"]
ITEM_FIELDS = ["205", "206", "207", "210", "216"]
CONTEXT_FIELDS = ["508", "509", "702", "853", "301"]
MULTI_VALUED_FIELDS = ["109_14", "110_14", "127_14", "150_14"]

# The 18 single-valued fields of AITM / CSTWA / DDPO (no 210, no *_14 history fields).
AITM18 = [
    "101", "121", "122", "124", "125", "126", "127", "128", "129",
    "205", "206", "207", "216",
    "508", "509", "702", "853", "301",
]
# All 23 fields, multi-valued user history included.
FULL = USER_FIELDS + MULTI_VALUED_FIELDS + ITEM_FIELDS + CONTEXT_FIELDS

PRESETS = {"aitm18": AITM18, "full": FULL}


@dataclass(frozen=True)
class FieldInfo:
    """One categorical field: its name, group (user/item/context) and whether it is an array."""

    name: str
    group: str
    multi: bool = False


def safe_name(info: FieldInfo) -> str:
    """The field's name, checked to be letters, digits or '_': safe inside SQL text (quoted as
    an identifier or a string) and in the JVM parser's comma- and semicolon-separated spec.

    Raises:
        ValueError: any other character in the name.
    """
    if not re.fullmatch(r"\w+", info.name):
        raise ValueError(f"field name '{info.name}' must be letters, digits or '_'")
    return info.name


def group_of(name: str) -> str:
    """user / item / context for an Ali-CCP field name (unknown names are context)."""
    if name in USER_FIELDS or name in MULTI_VALUED_FIELDS:
        return "user"
    if name in ITEM_FIELDS:
        return "item"
    return "context"


def aliccp_fields(preset: str) -> list[FieldInfo]:
    """The :class:`FieldInfo` list of a preset (``aitm18`` or ``full``).

    Raises:
        ValueError: unknown preset name.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown field preset '{preset}', expected one of {sorted(PRESETS)}")
    return [FieldInfo(f, group_of(f), f in MULTI_VALUED_FIELDS) for f in PRESETS[preset]]
