"""``dreamdeck bundle``: what an offline machine needs to play some presets.

Galleries often have no network. ``bundle --preset NAME... --out DIR`` gathers:

- the models those presets name (every hub id among the active scene's text parameters,
  the preset's values over the defaults) from the local Hugging Face cache, found with
  huggingface_hub's cache scan and copied in the hub's own layout to ``DIR/hf/hub``, so
  ``HF_HOME=DIR/hf`` with ``HF_HUB_OFFLINE=1`` loads them as if downloaded;
- the wheels: this project's, and (unless ``--no-deps``) its dependencies for the target
  platform and Python through ``pip download``, into ``DIR/wheels``.

It says how much it is, and names each model the cache does not hold with the command that
fetches it. ``DIR/INSTALL.txt`` holds the install and run commands for the offline machine.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.params import Kind, ParamRegistry
from engine.presets import PresetLibrary

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class BundleReport:
    models: list[str] = field(default_factory=list)  # repo ids copied
    missing: dict[str, list[str]] = field(default_factory=dict)  # repo id -> presets that need it
    wheels: list[str] = field(default_factory=list)
    size_bytes: int = 0


def _uses_depth(scene: str, value: Callable[[str], str]) -> bool:
    """The depth model is loaded only for a ControlNet slot of type depth that has a model."""
    return any(
        value(f"/scene/{scene}/controlnets/{slot}/type") == "depth"
        and value(f"/scene/{scene}/controlnets/{slot}/model").strip()
        for slot in (1, 2, 3)
    )


# model parameters a scene reads only in some settings: (path under the scene, is it used?)
NEEDED_ONLY_IF: dict[str, Callable[[str, Callable[[str], str]], bool]] = {
    "controlnets/depth_model": _uses_depth,
}


def models_for(preset_names: list[str], presets_dir: Path, registry: ParamRegistry) -> dict[str, list[str]]:
    """Hub repo ids each preset's active scene names -> the presets that need them."""
    library = PresetLibrary(presets_dir, registry)
    needed: dict[str, list[str]] = {}
    for name in preset_names:
        values = library.load(name).values
        scene = values.get("/scene/active", registry.get("/scene/active"))

        def value_of(path: str, values: dict[str, object] = values) -> str:
            default = registry.param(path).default if path in registry else ""
            return str(values.get(path, default) or "")

        for param in registry.params():
            if param.kind is not Kind.STRING or not param.path.startswith(f"/scene/{scene}/"):
                continue
            used = NEEDED_ONLY_IF.get(param.path.removeprefix(f"/scene/{scene}/"))
            if used is not None and not used(scene, value_of):
                continue
            value = value_of(param.path)
            repo = "/".join(value.split("/")[:2])  # "org/name/weights.safetensors" is in org/name
            if HUB_ID.match(repo) and not Path(value).expanduser().exists():
                needed.setdefault(repo, []).append(name)
    return needed


def copy_models(needed: dict[str, list[str]], cache_dir: Path | None, out: Path, report: BundleReport) -> None:
    from huggingface_hub import scan_cache_dir

    cache = scan_cache_dir(cache_dir)
    repos = {repo.repo_id: repo for repo in cache.repos if repo.repo_type == "model"}
    hub = out / "hf" / "hub"
    hub.mkdir(parents=True, exist_ok=True)
    for repo_id in sorted(needed):
        repo = repos.get(repo_id)
        if repo is None:
            report.missing[repo_id] = needed[repo_id]
            continue
        target = hub / repo.repo_path.name  # models--org--name: the hub cache's own layout
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(repo.repo_path, target, symlinks=True)  # snapshots link into blobs, relatively
        report.models.append(repo_id)


def gather_wheels(out: Path, platform: str | None, python_version: str | None, deps: bool, extras: str) -> list[str]:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)], check=True)
    if deps:
        target = ["--only-binary=:all:"]
        if platform:
            target += ["--platform", platform]
        if python_version:
            target += ["--python-version", python_version]
        project = next(wheels.glob("dreamdeck-*.whl"))
        spec = f"{project}[{extras}]" if extras else str(project)
        subprocess.run([*pip, "download", "-q", "-d", str(wheels), *target, spec], check=True)
    return sorted(p.name for p in wheels.glob("*.whl"))


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def install_text(out: Path, presets: list[str], extras: str) -> str:
    spec = f"dreamdeck[{extras}]" if extras else "dreamdeck"
    first = presets[0] if presets else "default"
    return (
        "# on the offline machine, from this folder:\n"
        f"python3 -m venv venv && venv/bin/pip install --no-index --find-links wheels '{spec}'\n"
        f"HF_HOME=$PWD/hf HF_HUB_OFFLINE=1 venv/bin/dreamdeck run --presets-dir presets --shaders-dir shaders "
        f"--preset {first} --fullscreen\n"
    )


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} GB"


def make_bundle(
    presets: list[str],
    out: Path,
    presets_dir: Path,
    *,
    cache_dir: Path | None = None,
    wheels: bool = True,
    deps: bool = True,
    platform: str | None = None,
    python_version: str | None = None,
    extras: str = "diffusion",
) -> BundleReport:
    """Gather ``presets`` (files, models, wheels) into ``out``; the report says what and how much."""
    from engine.catalog import build_registry

    report = BundleReport()
    registry = build_registry()
    needed = models_for(presets, presets_dir, registry)
    copy_models(needed, cache_dir, out, report)
    library = PresetLibrary(presets_dir, registry)
    (out / "presets").mkdir(parents=True, exist_ok=True)
    for name in presets:
        shutil.copy2(library.load(name).path, out / "presets")
    # the shaders live beside the package, not in the wheel: the bundle carries them (--shaders-dir)
    from engine.catalog import SHADERS_DIR

    if (out / "shaders").exists():
        shutil.rmtree(out / "shaders")
    shutil.copytree(SHADERS_DIR, out / "shaders")
    if wheels:
        report.wheels = gather_wheels(out, platform, python_version, deps, extras)
    (out / "INSTALL.txt").write_text(install_text(out, presets, extras), encoding="utf-8")
    report.size_bytes = folder_size(out)
    return report
