"""OpenAI's attribute filters (comparison and compound), applied to a chunk's file attributes.

A filter naming a key no file of the snapshot has is refused (400 naming the key and the keys there are),
rather than silently matching nothing: a typo in a key should not look like an empty store.
"""

from __future__ import annotations

from typing import Any

from tpm_fed.protocol.errors import InvalidRequest
from tpm_fed.stores.protocol import ComparisonFilter, CompoundFilter, Filter


def keys_of(condition: Filter) -> set[str]:
    if isinstance(condition, ComparisonFilter):
        return {condition.key}
    return set().union(*(keys_of(part) for part in condition.filters))


def check_keys(condition: Filter | None, known: set[str]) -> None:
    """Raises InvalidRequest: the filter names an attribute no file of the store has."""
    if condition is None:
        return
    unknown = sorted(keys_of(condition) - known)
    if unknown:
        raise InvalidRequest(f"filters: no file of this store has the attribute(s) {', '.join(map(repr, unknown))}; "
                             f"its files have {', '.join(map(repr, sorted(known))) or 'no attributes'}")


def matches(condition: Filter | None, attributes: dict[str, Any]) -> bool:
    if condition is None:
        return True
    if isinstance(condition, CompoundFilter):
        results = (matches(part, attributes) for part in condition.filters)
        return all(results) if condition.type == "and" else any(results)
    if condition.key not in attributes:
        return condition.type in ("ne", "nin")
    value, wanted = attributes[condition.key], condition.value
    if condition.type == "in":
        return value in wanted
    if condition.type == "nin":
        return value not in wanted
    if condition.type == "eq":
        return value == wanted
    if condition.type == "ne":
        return value != wanted
    if isinstance(value, bool) or isinstance(wanted, bool) or isinstance(value, str) != isinstance(wanted, str):
        return False  # an order between a number and a text, or with a boolean, holds for no chunk
    return {"gt": value > wanted, "gte": value >= wanted, "lt": value < wanted, "lte": value <= wanted}[condition.type]
