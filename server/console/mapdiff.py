"""The difference between two versions of a context map, item by item (ids are stable across versions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.contextmap.views import MapItem, MapView


@dataclass
class Changed:
    """An item in both versions whose content or section changed."""

    old: MapItem
    new: MapItem


@dataclass
class Rescored:
    """An item with the same content whose feedback (helpful, harmful, score, stale) changed."""

    old: MapItem
    new: MapItem


@dataclass
class MapDiff:
    old_version: int
    new_version: int
    old_tokens: int
    new_tokens: int
    added: list[MapItem] = field(default_factory=list)
    removed: list[MapItem] = field(default_factory=list)
    changed: list[Changed] = field(default_factory=list)
    rescored: list[Rescored] = field(default_factory=list)
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.rescored)


def _feedback(item: MapItem) -> tuple[int, int, float, bool]:
    return item.helpful, item.harmful, round(item.score, 6), item.stale


def diff_maps(old: MapView, new: MapView) -> MapDiff:
    """What ``new`` added, removed, rewrote and re-scored relative to ``old`` (in the maps' item order)."""
    before = {i.id: i for i in old.items}
    after = {i.id: i for i in new.items}
    out = MapDiff(old_version=old.version, new_version=new.version, old_tokens=old.tokens, new_tokens=new.tokens)
    out.removed = [i for i in old.items if i.id not in after]
    for item in new.items:
        prior = before.get(item.id)
        if prior is None:
            out.added.append(item)
        elif (prior.content, prior.section) != (item.content, item.section):
            out.changed.append(Changed(prior, item))
        elif _feedback(prior) != _feedback(item):
            out.rescored.append(Rescored(prior, item))
        else:
            out.unchanged += 1
    return out
