"""``dreamdeck doctor``: what this machine offers the engine, one row per check.

Each row is ``(check, status, detail)`` with status ``ok``, ``warn`` or ``missing``. Every
probe runs on its own: a probe that raises becomes a ``warn`` row carrying the reason, so
one broken driver never hides the rest of the report (the report is most needed exactly
when something is broken). Optional packages are imported inside their probe, so the
doctor runs on a machine that has none of them.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import platform
import re
import sys
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

Row = tuple[str, str, str]
OK, WARN, MISSING = "ok", "warn", "missing"
SOFTWARE_RENDERERS = ("llvmpipe", "softpipe", "swrast", "software")


def _one_line(text: object) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else ""


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {_one_line(exc)}"


# -- packages ---------------------------------------------------------------------------


def probe_python() -> Row:
    status = OK if sys.version_info >= (3, 10) else WARN
    return "python", status, f"{platform.python_version()} ({sys.executable})"


def _package_row(check: str, module: str, missing_hint: str) -> Row:
    try:
        imported = importlib.import_module(module)
    except ImportError as exc:
        return check, MISSING, f"not installed — {missing_hint} ({_one_line(exc)})"
    return check, OK, str(getattr(imported, "__version__", "unknown version"))


def probe_numpy() -> Row:
    return _package_row("numpy", "numpy", "pip install numpy")


def probe_opencv() -> Row:
    return _package_row("opencv", "cv2", "pip install opencv-python-headless")


def probe_torch() -> Row:
    check, status, detail = _package_row("torch", "torch", "install the diffusion extra")
    if status == MISSING:
        detail = "not installed — install the diffusion extra"
    return check, status, detail


def probe_accelerator() -> Row:
    """The diffusion scenes need CUDA or MPS to be live; CPU works but is far from real time."""
    try:
        import torch
    except ImportError:
        return "accelerator", WARN, "unknown: torch is not installed"
    if torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            devices.append(f"cuda:{index} {props.name} ({props.total_memory / 2**30:.0f} GiB)")
        return "accelerator", OK, ", ".join(devices)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "accelerator", OK, "Apple MPS"
    return "accelerator", WARN, "CPU only: diffusion scenes will not be real time"


# -- display and GL ---------------------------------------------------------------------


def probe_gl() -> Row:
    """A headless EGL context: the same GL the compositor's tests and offline renders use."""
    try:
        import moderngl
    except ImportError as exc:
        return "gl", MISSING, f"moderngl not installed ({_one_line(exc)})"
    try:
        ctx = moderngl.create_context(standalone=True, backend="egl")
    except Exception as exc:  # EGL failures come as several types (ImportError, RuntimeError, Error)
        return "gl", WARN, f"no EGL context: {_error(exc)}"
    try:
        renderer, version = ctx.info["GL_RENDERER"], ctx.info["GL_VERSION"]
    finally:
        ctx.release()
    detail = f"{renderer}, OpenGL {version}"
    if any(word in renderer.lower() for word in SOFTWARE_RENDERERS):
        return "gl", WARN, detail + " (software rendering: slow)"
    return "gl", OK, detail


def probe_display(env: Mapping[str, str] | None = None) -> Row:
    """Can a window open? The doctor runs on its own, so initialising GLFW here is harmless."""
    env = os.environ if env is None else env
    names = [f"{key}={env[key]}" for key in ("DISPLAY", "WAYLAND_DISPLAY") if env.get(key)]
    where = ", ".join(names) if names else "no DISPLAY or WAYLAND_DISPLAY"
    try:
        import glfw
    except ImportError as exc:
        return "display", MISSING, f"{where}; glfw not importable ({_one_line(exc)})"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pyGLFW reports errors as warnings by default
        ready = glfw.init()
    if ready:
        glfw.terminate()
        return "display", OK, f"{where}; glfw {glfw.get_version_string().decode()} ready"
    reason = _glfw_reason(str(caught[-1].message)) if caught else "no reason given"
    return "display", WARN, f"{where}; glfw.init() failed: {reason} (headless only)"


def _glfw_reason(message: str) -> str:
    """pyGLFW words its warnings as ``(65550) b'X11: ...'``; keep the readable part."""
    match = re.fullmatch(r"\((\d+)\) b(['\"])(.*)\2", message.strip(), re.DOTALL)
    return _one_line(match[3] if match else message)


# -- devices ------------------------------------------------------------------------------


def probe_cameras(pattern: str = "/dev/video*") -> Row:
    """Open each V4L2 node once. Many webcams expose a second, metadata-only node that
    never opens, so a node that fails is skipped, not reported."""
    nodes = sorted(glob.glob(pattern))
    if not nodes:
        return "cameras", WARN, "none found"
    import cv2

    old_level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # no warning per closed node
    found = []
    try:
        for node in nodes:
            capture = cv2.VideoCapture(node, cv2.CAP_V4L2)
            try:
                if capture.isOpened():
                    width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
                    height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
                    found.append(f"{node} ({width}x{height})")
            finally:
                capture.release()
    finally:
        cv2.utils.logging.setLogLevel(old_level)
    if not found:
        return "cameras", WARN, f"none found ({len(nodes)} nodes, none opens)"
    return "cameras", OK, ", ".join(found)


def probe_midi() -> Row:
    try:
        import mido
    except ImportError:
        return "midi", MISSING, "not installed — pip install mido python-rtmidi"
    try:
        inputs, outputs = mido.get_input_names(), mido.get_output_names()
    except Exception as exc:  # the backend (rtmidi) may be missing or the MIDI system down
        return "midi", WARN, f"cannot list ports: {_error(exc)}"
    if not inputs and not outputs:
        return "midi", WARN, "no ports"
    return "midi", OK, f"in: {', '.join(inputs) or 'none'}; out: {', '.join(outputs) or 'none'}"


# -- models ---------------------------------------------------------------------------------


def model_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where huggingface_hub keeps models, by its own rules, without importing it."""
    env = os.environ if env is None else env
    hub_cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub_cache:
        return Path(hub_cache).expanduser()
    hf_home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(hf_home).expanduser() / "hub"


def _size_of(folder: Path) -> int:
    """Bytes of regular files only: snapshots/ holds symlinks into blobs/, counted once."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    scaled = float(size)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "TiB":
            break
    return f"{scaled:.1f} {unit}"


def probe_model_cache(env: Mapping[str, str] | None = None) -> Row:
    cache = model_cache_dir(env)
    if not cache.is_dir():
        return "model cache", WARN, f"{cache} does not exist (models download on first use)"
    models = sorted(p for p in cache.glob("models--*") if p.is_dir())
    if not models:
        return "model cache", WARN, f"{cache} is empty (models download on first use)"
    listed = [f"{p.name.removeprefix('models--').replace('--', '/')} ({_human(_size_of(p))})" for p in models]
    return "model cache", OK, f"{cache}: {', '.join(listed)}"


SHIPPED_DDPM = Path(__file__).resolve().parent / "models" / "ddpm-textures"
VQGAN_FOLDER = "vqgan_imagenet_f16_16384"  # engine.vqclip.vqgan's default place (that module needs torch)


def probe_scene_models(env: Mapping[str, str] | None = None) -> Row:
    """The models the slow scenes play without a hub: the shipped DDPM and the VQGAN checkpoint."""
    env = os.environ if env is None else env
    weights = SHIPPED_DDPM / "unet" / "diffusion_pytorch_model.safetensors"
    ddpm = f"shipped DDPM {_human(weights.stat().st_size)}" if weights.is_file() else "shipped DDPM missing"
    vqgan_dir = Path(env.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "dreamdeck" / VQGAN_FOLDER
    found = (
        any((vqgan_dir / name).is_file() for name in ("model.ckpt", "last.ckpt"))
        and (vqgan_dir / "model.yaml").is_file()
    )
    vqgan = (
        f"VQGAN in {vqgan_dir}"
        if found
        else f"no VQGAN checkpoint in {vqgan_dir} (vqgan_clip's vqgan drawer plays the DDPM; pixel and fft need none)"
    )
    return "scene models", OK if weights.is_file() else MISSING, f"{ddpm}; {vqgan}"


# -- the report -----------------------------------------------------------------------------

PROBES: tuple[tuple[str, Callable[[], Row]], ...] = (
    ("python", probe_python),
    ("numpy", probe_numpy),
    ("opencv", probe_opencv),
    ("torch", probe_torch),
    ("accelerator", probe_accelerator),
    ("gl", probe_gl),
    ("display", probe_display),
    ("cameras", probe_cameras),
    ("midi", probe_midi),
    ("model cache", probe_model_cache),
    ("scene models", probe_scene_models),
)
CHECKS = tuple(name for name, _probe in PROBES)


def collect() -> list[Row]:
    """Run every probe; a probe that raises becomes a warn row with the reason."""
    rows = []
    for name, probe in PROBES:
        try:
            rows.append(probe())
        except Exception as exc:  # isolation is the point: the report must still come out
            log.debug("doctor probe %s failed", name, exc_info=True)
            rows.append((name, WARN, f"probe failed: {_error(exc)}"))
    return rows


def format_table(rows: list[Row]) -> str:
    """Columns padded to their widest cell; the last column is left ragged."""
    table = [("check", "status", "detail"), *rows]
    widths = [max(len(row[i]) for row in table) for i in range(2)]
    return "\n".join(
        f"{check.ljust(widths[0])}  {status.ljust(widths[1])}  {detail}".rstrip() for check, status, detail in table
    )


def main() -> int:
    print(format_table(collect()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
