"""Finding the installed scenes: the ``dreamdeck.scenes`` entry point group.

Every scene, dreamdeck's own included, is an entry point whose name is the scene's name
and whose value is its class::

    [project.entry-points."dreamdeck.scenes"]
    tint = "dreamdeck_scene_tint:Tint"

The catalog order (F1..F9, the index of ``scene/select`` and of ``/scene/active`` from
MIDI) is: dreamdeck's own scenes by their ``order``, then every other package's scenes by
``(order, name)``. So installing a plugin never moves a built-in scene's key.

A plugin that fails to import, or is not a valid scene, costs one error line in the log
and is left out; the rest of the show plays. Finding none of dreamdeck's own scenes means
its install metadata is missing or older than the entry points: that is an error
(``ScenesNotFound``), with the command that fixes it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import metadata

from engine.params import ParamRegistry
from engine.scenes.base import Scene, SceneCatalog

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dreamdeck.scenes"
DISTRIBUTION = "dreamdeck"  # the distribution whose scenes come first


class ScenesNotFound(RuntimeError):
    """No scene of dreamdeck's own is registered: the package metadata is missing or stale."""


@dataclass(frozen=True)
class FoundScene:
    scene: type[Scene]
    entry_point: str  # "name = module:Class"
    distribution: str

    @property
    def builtin(self) -> bool:
        return _canonical(self.distribution) == DISTRIBUTION

    def sort_key(self) -> tuple[bool, int, str]:
        return not self.builtin, self.scene.order, self.scene.name


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _check(scene: object, entry_name: str) -> type[Scene]:
    """The entry point's object as a scene class, or ValueError / TypeError saying what is wrong."""
    if not (isinstance(scene, type) and issubclass(scene, Scene)):
        raise TypeError(f"{scene!r} is not a subclass of engine.scenes.Scene")
    if scene.name != entry_name:
        raise ValueError(
            f"the entry point is named {entry_name!r} but the scene is named {scene.name!r} (they must match)"
        )
    SceneCatalog((scene,))  # the name and parameter rules of the catalog
    ParamRegistry().declare_all(scene.PARAMS)  # parameters that clash with each other
    return scene


def find_scenes(entry_points: metadata.EntryPoints | None = None) -> list[FoundScene]:
    """The valid installed scenes in catalog order; each one left out is one error line in the log."""
    if entry_points is None:
        entry_points = metadata.entry_points(group=ENTRY_POINT_GROUP)
    candidates: list[FoundScene] = []
    for entry in entry_points:
        distribution = entry.dist.name if entry.dist is not None else "?"
        try:
            scene = _check(entry.load(), entry.name)
        except Exception as exc:  # a broken plugin must not end the show: named, logged, left out
            log.error(
                "scene plugin %r (%s, from %s) left out: %s: %s",
                entry.name,
                entry.value,
                distribution,
                type(exc).__name__,
                exc,
            )
            log.debug("scene plugin %r failed", entry.name, exc_info=True)
            continue
        candidates.append(FoundScene(scene, f"{entry.name} = {entry.value}", distribution))
    found: list[FoundScene] = []
    taken: dict[str, FoundScene] = {}
    for candidate in sorted(candidates, key=FoundScene.sort_key):
        first = taken.get(candidate.scene.name)
        if first is not None:
            if first.scene is not candidate.scene:  # the same class twice (two copies on the path) is no conflict
                log.error(
                    "scene plugin %r (%s, from %s) left out: the name is taken by %s from %s",
                    candidate.scene.name,
                    candidate.entry_point,
                    candidate.distribution,
                    first.entry_point,
                    first.distribution,
                )
            continue
        taken[candidate.scene.name] = candidate
        found.append(candidate)
    if not any(f.builtin for f in found):
        others = f" (other packages' scenes: {', '.join(f.scene.name for f in found)})" if found else ""
        raise ScenesNotFound(
            f"none of dreamdeck's own scenes is registered{others}: {_why_none()}. "
            "From the dreamdeck folder: pip install -e ."
        )
    return found


def _why_none() -> str:
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "dreamdeck is not installed"
    where = getattr(dist, "_path", None)  # the metadata folder read (no public name for it)
    return (
        f"dreamdeck's install metadata{f' in {where}' if where else ''} has no {ENTRY_POINT_GROUP!r} entry "
        "points (it was installed before its scenes were plugins), or they failed to load (above)"
    )


def installed_catalog() -> SceneCatalog:
    """Every installed scene, dreamdeck's own first (see the module's docstring for the order)."""
    return SceneCatalog(tuple(f.scene for f in find_scenes()))
