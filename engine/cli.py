"""``dreamdeck``: run the show, list presets, check the machine, benchmark.

Usage errors exit with status 2 and a one-line message; the library never calls exit().
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from engine.catalog import PRESETS_DIR

log = logging.getLogger("dreamdeck")


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1280x720") from None
    if not (16 <= w <= 16384 and 16 <= h <= 16384):
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be between 16 and 16384")
    return w, h


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamdeck", description="Real-time audiovisual performance engine.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="play: source -> scene -> compositor -> window",
                         description="Play. Keys: space next scene, 1-9 presets, F fullscreen, H HUD, Esc quit.")
    run.add_argument("--preset", default="default", help="preset name or 1-based number (default: default)")
    run.add_argument("--source", help="camera:N | camera:/dev/videoN | file:PATH | image:PATH | pattern "
                                      "(default: first camera that opens, else pattern)")
    run.add_argument("--fullscreen", action="store_true", help="fullscreen on --monitor")
    run.add_argument("--monitor", type=_positive_int, default=0, help="monitor index for fullscreen (default 0)")
    run.add_argument("--size", type=_size, default=(1280, 720), help="window size WxH (default 1280x720)")
    run.add_argument("--output", type=_size, default=(1280, 720),
                     help="output resolution WxH, letterboxed into the window (default 1280x720)")
    run.add_argument("--headless", action="store_true", help="no window: offscreen EGL (tests, servers)")
    run.add_argument("--frames", type=_positive_int, help="stop after N frames")
    run.add_argument("--screenshot", type=Path, help="save the last output frame to this image file")
    run.add_argument("--fps", type=_positive_float, default=60.0, help="frame rate cap (default 60)")
    run.add_argument("--presets-dir", type=Path, default=PRESETS_DIR, help="where presets live")
    run.add_argument("--no-vsync", action="store_true", help="do not wait for the display's refresh")

    params = sub.add_parser("params", help="list every parameter (the OSC / MIDI / preset address space)")
    form = params.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="a Markdown table (for the README)")
    form.add_argument("--json", action="store_true", help="JSON, one object per parameter")

    presets = sub.add_parser("presets", help="list presets and whether each is valid")
    presets.add_argument("--presets-dir", type=Path, default=PRESETS_DIR)

    sub.add_parser("doctor", help="check this machine: Python, torch, GPU, OpenGL, cameras, MIDI, models")

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT")
    bench_sub.required = True
    render = bench_sub.add_parser("render", help="compositor frame time: source + scene + 3 effects")
    render.add_argument("--sizes", type=_size, nargs="+", default=[(1280, 720), (1920, 1080)])
    render.add_argument("--frames", type=_positive_int, default=200)
    render.add_argument("--json", type=Path, help="also write the results here")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from engine.app import App, AppConfig
    from engine.clock import RealClock
    from engine.render.surface import HeadlessSurface, SurfaceError, WindowConfig, WindowSurface
    from engine.sources import SourceSpecError, parse_source_spec

    if args.source is not None:
        try:
            parse_source_spec(args.source)
        except SourceSpecError as exc:
            print(f"dreamdeck run: {exc}", file=sys.stderr)
            return 2
    if args.screenshot is not None and not _can_write_image(args.screenshot):
        # said now, not after the show: the screenshot is written when the run ends
        print(f"dreamdeck run: --screenshot {args.screenshot}: cannot write {args.screenshot.suffix!r} images "
              "(use .png or .jpg)", file=sys.stderr)
        return 2
    try:
        if args.headless:
            surface = HeadlessSurface()
        else:
            surface = WindowSurface(WindowConfig(size=args.size, fullscreen=args.fullscreen,
                                                 monitor=args.monitor, vsync=not args.no_vsync))
    except SurfaceError as exc:
        print(f"dreamdeck run: {exc}", file=sys.stderr)
        return 1
    config = AppConfig(source=args.source, preset=args.preset, output_size=args.output,
                       presets_dir=args.presets_dir)
    app = App(config, surface, RealClock(args.fps))
    try:
        app.start()
        app.run(frames=args.frames)
    except KeyboardInterrupt:
        log.info("interrupted")
    finally:
        try:
            if args.screenshot is not None:
                path = app.screenshot(args.screenshot)
                log.info("screenshot written to %s", path)
        finally:
            s = app.stats
            log.info("%d frames, render %.1f fps, longest frame %.1f ms", s.frames, s.render_fps,
                     s.longest_frame_ms)
            app.close()
            surface.close()
    return 0


def _can_write_image(path: Path) -> bool:
    import cv2

    return cv2.haveImageWriter(f"image{path.suffix or '.png'}")  # App.screenshot writes PNG without a suffix


def cmd_params(args: argparse.Namespace) -> int:
    from engine.catalog import build_registry
    from engine.paramdoc import params_json, params_markdown, params_text

    registry = build_registry()
    if args.markdown:
        print(params_markdown(registry))
    elif args.json:
        print(params_json(registry))
    else:
        print(params_text(registry))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from engine.catalog import build_registry
    from engine.presets import PresetLibrary

    library = PresetLibrary(args.presets_dir, build_registry())
    entries = library.entries()
    if not entries:
        print(f"no presets in {args.presets_dir}")
        return 1
    for number, entry in enumerate(entries, 1):
        state = "ok" if entry.error is None else f"INVALID: {entry.error}"
        print(f"{number:3d}  {entry.name:<24} {state}")
    return 0 if all(e.error is None for e in entries) else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    from engine import doctor

    print(doctor.format_table(doctor.collect()))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import bench_render

    bench_render(args.sizes, args.frames, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    commands = {"run": cmd_run, "params": cmd_params, "presets": cmd_presets, "doctor": cmd_doctor, "bench": cmd_bench}
    try:
        return commands[args.command](args)
    except BrokenPipeError:  # `dreamdeck params | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
