"""Every parameter the engine has, declared in one place (no GL, no torch needed).

``build_registry`` is what the app, ``dreamdeck presets`` and the tests use, so a preset
is validated against exactly the parameters a running show has.
"""

from __future__ import annotations

from pathlib import Path

from engine.control.audio import AUDIO_PARAMS
from engine.control.link import LINK_PARAMS
from engine.control.modulation import MOD_PARAMS
from engine.control.tempo import ALL_TEMPO_PARAMS
from engine.outputs.recorder import RECORDER_PARAMS
from engine.params import ParamRegistry, bool_param, enum_param, int_param
from engine.render.compositor import COMPOSITOR_PARAMS
from engine.render.effects import EFFECTS
from engine.render.output import OUTPUT_PARAMS
from engine.scenes import SceneCatalog, installed_catalog
from engine.sources.pattern import PatternSource

ROOT = Path(__file__).resolve().parent.parent
SHADERS_DIR = ROOT / "shaders"
PRESETS_DIR = ROOT / "presets"
NO_CUE = "none"


def build_registry(catalog: SceneCatalog | None = None) -> ParamRegistry:
    catalog = catalog or installed_catalog()
    registry = ParamRegistry()
    registry.declare(
        enum_param(
            "/scene/active",
            catalog.names()[0],
            catalog.names(),
            description="The scene playing on the scene layer (by name, or its index from MIDI)",
        )
    )
    registry.declare(
        enum_param(
            "/scene/cue",
            NO_CUE,
            (NO_CUE, *catalog.names()),
            description="A scene to load in the background now, so that cutting to it is instant",
        )
    )
    registry.declare(
        int_param(
            "/scene/memory_budget",
            12000,
            0,
            1_000_000,
            unit="MB",
            in_presets=False,
            description="Accelerator memory the loaded scenes may hold; past it the least "
            "recently played are unloaded (0 = keep only the playing scene)",
        )
    )
    registry.declare_all(catalog.params())
    registry.declare_all(COMPOSITOR_PARAMS)
    registry.declare_all(OUTPUT_PARAMS)
    for fx in EFFECTS:
        registry.declare_all(fx.all_params())
    registry.declare_all(PatternSource.PARAMS)
    registry.declare_all(RECORDER_PARAMS)
    registry.declare(bool_param("/hud/visible", True, description="Show the HUD over the window", in_presets=False))
    for control_params in (AUDIO_PARAMS, ALL_TEMPO_PARAMS, LINK_PARAMS, MOD_PARAMS):
        registry.declare_all(control_params)
    return registry
