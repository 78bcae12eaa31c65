"""``dreamdeck``: run the show, list presets, check the machine, benchmark.

Usage errors exit with status 2 and a one-line message; the library never calls exit().
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine.catalog import PRESETS_DIR
from engine.diffusion.options import ACCEL_CHOICES, ACCEL_HELP, DTYPE_CHOICES, check_device_spec
from engine.outputs.recorder import DEFAULT_PATTERN

if TYPE_CHECKING:
    from engine.show import ShowConfig

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


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)")
    return value


def _monitor(text: str) -> int | str:
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("a monitor is an index or part of its name")
    return int(text) if text.isdigit() else text


def _device(text: str) -> str:
    try:
        return check_device_spec(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, _port(port)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _suffix_safetensors(text: str) -> Path:
    path = Path(text).expanduser()
    if path.suffix != ".safetensors":
        raise argparse.ArgumentTypeError(f"{text!r}: the LoRA is written as a .safetensors file")
    return path


def _at_least_one(text: str) -> int:
    value = _positive_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_train_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", type=Path, metavar="IMAGES_DIR", help="folder of pictures (any sizes: resized and center-cropped)"
    )
    parser.add_argument(
        "--base", required=True, metavar="MODEL", help="base model: hub id, diffusers folder or .safetensors file"
    )
    parser.add_argument(
        "--out", required=True, type=_suffix_safetensors, metavar="FILE.safetensors", help="the LoRA to write"
    )
    parser.add_argument("--steps", type=_at_least_one, default=500, help="training steps (default 500)")
    parser.add_argument(
        "--rank", type=_at_least_one, default=16, help="LoRA rank (default 16; the slots play up to 64)"
    )
    parser.add_argument(
        "--size", type=_at_least_one, default=512, help="training resolution, square (default 512; SDXL: 1024)"
    )
    parser.add_argument(
        "--caption",
        help='caption for every picture without a sidecar NAME.txt, e.g. "a drawing in sks style"',
    )
    parser.add_argument("--lr", type=_positive_float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--batch", type=_at_least_one, default=1, help="pictures per step (default 1)")
    parser.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=100,
        metavar="N",
        help="checkpoint every N steps (default 100; 0: at the end only)",
    )
    parser.add_argument(
        "--sample-every",
        type=_positive_int,
        default=100,
        metavar="N",
        help="a sample picture beside --out every N steps (default 100; 0: none)",
    )
    parser.add_argument(
        "--sample-steps",
        type=_at_least_one,
        help="denoising steps of a sample (default 4 for turbo / LCM bases, else 25)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from FILE.checkpoint.pt beside --out")
    parser.add_argument("--kohya", action="store_true", help="also write FILE.kohya.safetensors in kohya's layout")
    parser.add_argument(
        "--device", type=_device, default="auto", help="auto | cuda | cuda:N | mps | cpu (default auto)"
    )
    parser.add_argument("--seed", type=_positive_int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dreamdeck", description="Real-time audiovisual performance engine.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-file",
        type=Path,
        help="rotating log file, 5 MB x 5 (default: ~/.local/state/dreamdeck/log/dreamdeck.log)",
    )
    parser.add_argument("--no-log-file", action="store_true", help="log to the console only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser(
        "run",
        help="play: source -> scene -> compositor -> window",
        description="Play. Keys: space next scene, 1-9 presets, F fullscreen, H HUD, Esc quit.",
    )
    run.add_argument("--preset", help="preset name or 1-based number (default: the last one played, else default)")
    run.add_argument(
        "--source",
        help="camera:N | camera:/dev/videoN | file:PATH | image:PATH | pattern "
        "(default: first camera that opens, else pattern)",
    )
    run.add_argument("--fullscreen", action=argparse.BooleanOptionalAction, help="fullscreen on --monitor")
    run.add_argument(
        "--monitor", type=_monitor, help="monitor for fullscreen: index, or part of its name, e.g. HDMI (default 0)"
    )
    run.add_argument("--borderless", action="store_true", help="no window frame when windowed")
    run.add_argument(
        "--preview",
        action="store_true",
        help="a second window with the output and the HUD (the main window stays clean)",
    )
    run.add_argument("--preview-size", type=_size, default=(640, 360), help="preview window size (default 640x360)")
    run.add_argument("--allow-sleep", action="store_true", help="let the screensaver / display sleep run")
    outs = run.add_argument_group("recording and sharing")
    outs.add_argument(
        "--record",
        nargs="?",
        const=DEFAULT_PATTERN,
        metavar="PATTERN",
        help="record the output to MP4 from the start (default " + DEFAULT_PATTERN.replace("%", "%%") + ")",
    )
    outs.add_argument("--record-fps", type=_positive_float, default=30.0, help="recording frame rate (default 30)")
    outs.add_argument(
        "--virtualcam",
        nargs="?",
        const="",
        metavar="DEVICE",
        help="share the output as a virtual camera (pyvirtualcam; Linux: v4l2loopback)",
    )
    outs.add_argument("--ndi", nargs="?", const="dreamdeck", metavar="NAME", help="share over NDI (cyndilib)")
    outs.add_argument("--spout", nargs="?", const="dreamdeck", metavar="NAME", help="share by Spout (Windows)")
    outs.add_argument("--syphon", nargs="?", const="dreamdeck", metavar="NAME", help="share by Syphon (macOS)")
    run.add_argument("--size", type=_size, help="window size WxH (default 1280x720)")
    run.add_argument(
        "--output", type=_size, help="output resolution WxH, letterboxed into the window (default 1280x720)"
    )
    run.add_argument(
        "--fresh", action="store_true", help="ignore the saved state (last preset, source, window) and use the defaults"
    )
    run.add_argument("--headless", action="store_true", help="no window: offscreen EGL (tests, servers)")
    run.add_argument("--frames", type=_positive_int, help="stop after N frames")
    run.add_argument("--screenshot", type=Path, help="save the last output frame to this image file")
    run.add_argument("--fps", type=_positive_float, default=60.0, help="frame rate cap (default 60)")
    run.add_argument("--presets-dir", type=Path, default=PRESETS_DIR, help="where presets live")
    run.add_argument("--no-vsync", action="store_true", help="do not wait for the display's refresh")
    run.add_argument(
        "--status-port",
        type=_port,
        help="status page and phone remote (default 9330; if that is taken, the show runs without)",
    )
    run.add_argument(
        "--status-host", default="127.0.0.1", help="address to serve it on (default 127.0.0.1; any other needs a token)"
    )
    run.add_argument(
        "--status-token",
        default=os.environ.get("DREAMDECK_STATUS_TOKEN"),
        help="token for the status page (default: $DREAMDECK_STATUS_TOKEN; generated when off "
        "the loopback and not given)",
    )
    run.add_argument(
        "--status-allow",
        action="append",
        default=[],
        metavar="ADDR",
        help="only these senders may use the status page (an IP or a network like 192.168.1.0/24; "
        "repeat for more); the token is still needed off the loopback",
    )
    run.add_argument("--no-status", action="store_true", help="no status page")
    live = run.add_argument_group("live control (OSC, OSCQuery, MIDI, DMX, audio)")
    live.add_argument("--osc-port", type=_port, default=9321, help="OSC UDP port (default 9321)")
    live.add_argument(
        "--osc-host",
        default="127.0.0.1",
        help="address for OSC and OSCQuery (default 127.0.0.1; any other needs --osc-allow)",
    )
    live.add_argument(
        "--osc-allow",
        action="append",
        default=[],
        metavar="ADDR",
        help="sender address or network allowed when OSC is open to the network (repeatable)",
    )
    live.add_argument(
        "--osc-feedback",
        type=_host_port,
        metavar="HOST:PORT",
        help="send every parameter change here (TouchDesigner / TouchOSC panels follow)",
    )
    live.add_argument("--osc-tcp", action="store_true", help="also take OSC over TCP on the same port")
    live.add_argument("--no-osc", action="store_true", help="no OSC and no OSCQuery")
    live.add_argument(
        "--oscquery-port", type=_port, default=9322, help="OSCQuery HTTP and WebSocket port (default 9322)"
    )
    live.add_argument(
        "--oscquery-token",
        default=os.environ.get("DREAMDECK_OSCQUERY_TOKEN") or None,
        metavar="TOKEN",
        help="OSC sent over OSCQuery's WebSocket is applied only from clients that connect with "
        "?token=TOKEN (default: $DREAMDECK_OSCQUERY_TOKEN; none: any client the allowlist lets in)",
    )
    live.add_argument("--no-oscquery", action="store_true", help="no OSCQuery server")
    live.add_argument("--advertise", action="store_true", help="announce OSCQuery by zeroconf (_oscjson._tcp)")
    live.add_argument(
        "--midi-in",
        action="append",
        default=[],
        metavar="NAME",
        help="MIDI input port name or part of it (repeatable; '*' = all)",
    )
    live.add_argument(
        "--midi-out",
        action="append",
        default=[],
        metavar="NAME",
        help="MIDI output port for LED / motor-fader feedback (repeatable)",
    )
    live.add_argument("--midi-map", type=Path, help="MIDI mappings file (default ~/.config/dreamdeck/midi.toml)")
    live.add_argument("--midi-api", default="auto", choices=["auto", "alsa", "jack"], help="MIDI system")
    live.add_argument("--no-midi", action="store_true", help="no MIDI")
    live.add_argument(
        "--dmx",
        action="append",
        default=[],
        metavar="PROTO[:UNIVERSE]",
        help="DMX in from a lighting desk: artnet[:UNIVERSE] or sacn[:UNIVERSE] (repeatable or comma list; "
        "mappings in the --midi-map file)",
    )
    live.add_argument(
        "--dmx-host",
        default="127.0.0.1",
        help="address DMX listens on (default 127.0.0.1; any other needs --dmx-allow; sACN multicast then)",
    )
    live.add_argument(
        "--dmx-allow",
        action="append",
        default=[],
        metavar="ADDR",
        help="desk address or network allowed when DMX is open to the network (repeatable)",
    )
    live.add_argument(
        "--audio", metavar="SPEC", help="audio input: a device name or index, 'default', or file:PATH (a WAV, looped)"
    )
    torch_group = run.add_argument_group("where the diffusion scenes run (realtime, ddpm, vqgan_clip)")
    torch_group.add_argument(
        "--device",
        type=_device,
        default=None,
        help="auto | cuda | cuda:N | mps | cpu (default auto: CUDA, then MPS, then CPU)",
    )
    torch_group.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default=None,
        help="precision (default auto: float16 on a GPU, float32 on a CPU; bfloat16 on request)",
    )
    torch_group.add_argument(
        "--accel",
        choices=ACCEL_CHOICES,
        default=None,
        help=f"realtime scene backend: {ACCEL_HELP} (default auto: compile on CUDA, eager elsewhere)",
    )
    run.add_argument(
        "--hours", help='opening hours, e.g. "Mon-Fri 10:00-18:00, Sat 12:00-20:00": black and paused outside them'
    )

    service = sub.add_parser(
        "install-service",
        help="run unattended: write a systemd user unit",
        description="Write ~/.config/systemd/user/dreamdeck.service: restarts on crash "
        "and on a frozen frame loop (watchdog).",
    )
    service.add_argument("--dry-run", action="store_true", help="print the unit, write nothing")
    service.add_argument(
        "run_args",
        nargs=argparse.REMAINDER,
        metavar="-- RUN FLAGS",
        help="flags for `dreamdeck run`, e.g. -- --preset gallery --fullscreen --monitor 1",
    )

    params = sub.add_parser(
        "params",
        help="list every parameter (the OSC / MIDI / preset address space)",
        description="Every parameter: path, kind, range and unit, default and "
        "description, as a table that fits 100 columns.",
    )
    form = params.add_mutually_exclusive_group()
    form.add_argument("--markdown", action="store_true", help="a Markdown table (as in the documentation)")
    form.add_argument("--json", action="store_true", help="JSON, one object per parameter")

    presets = sub.add_parser("presets", help="list presets and whether each is valid")
    presets.add_argument("--presets-dir", type=Path, default=PRESETS_DIR)

    sub.add_parser("doctor", help="check this machine: Python, torch, GPU, OpenGL, cameras, MIDI, models")

    add_train_lora_arguments(
        sub.add_parser(
            "train-lora",
            help="train a LoRA on a folder of pictures, to play in the LoRA slots",
            description="Train a LoRA (diffusers + peft) on the pictures in IMAGES_DIR; it loads in "
            "the realtime scene's LoRA slots, diffusers' load_lora_weights, ComfyUI and A1111. "
            "Real models need a GPU; the CPU trains tiny test models.",
        )
    )

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", metavar="WHAT")
    bench_sub.required = True
    render = bench_sub.add_parser("render", help="compositor frame time: source + scene + 3 effects")
    render.add_argument("--sizes", type=_size, nargs="+", default=[(1280, 720), (1920, 1080)])
    render.add_argument("--frames", type=_positive_int, default=200)
    render.add_argument("--json", type=Path, help="also write the results here")
    from engine.diffusion.bench import add_arguments as add_diffusion_bench_arguments

    add_diffusion_bench_arguments(
        bench_sub.add_parser(
            "diffusion", help="diffusion img2img: the hot path against diffusers, same weights, same run"
        )
    )
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from engine.render.surface import SurfaceError
    from engine.schedule import ScheduleError
    from engine.show import ShowError, build_show

    try:
        config = show_config(args)
    except (ScheduleError, ValueError) as exc:
        print(f"dreamdeck run: {exc}", file=sys.stderr)
        return 2
    if args.screenshot is not None and not _can_write_image(args.screenshot):
        # said now, not after the show: the screenshot is written when the run ends
        print(
            f"dreamdeck run: --screenshot {args.screenshot}: cannot write {args.screenshot.suffix!r} images "
            "(use .png or .jpg)",
            file=sys.stderr,
        )
        return 2
    try:
        show = build_show(config)
    except ShowError as exc:
        print(f"dreamdeck run: {exc}", file=sys.stderr)
        return 2
    except SurfaceError as exc:
        print(f"dreamdeck run: {exc}", file=sys.stderr)
        return 1
    if show.status_page is not None:
        print(f"status page: {show.status_page.url}", flush=True)  # once: it holds the token when open to the network
    app = show.app

    def stop_show(signum: int, frame: object) -> None:
        # end the loop at the next frame boundary: a KeyboardInterrupt raised inside a lock
        # could leave it held and hang the shutdown
        log.info("signal %d: stopping", signum)
        app.running = False

    previous = {sig: signal.signal(sig, stop_show) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        show.start()
        show.run(frames=args.frames)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if args.screenshot is not None:
                path = app.screenshot(args.screenshot)
                log.info("screenshot written to %s", path)
        finally:
            s = app.stats
            log.info("%d frames, render %.1f fps, longest frame %.1f ms", s.frames, s.render_fps, s.longest_frame_ms)
            show.close()
    return 0


def show_config(args: argparse.Namespace) -> ShowConfig:
    """`dreamdeck run` flags -> the show's config. A flag given now wins, then what was saved
    before a crash or restart, then the default. Raises ShowError / ScheduleError for a bad flag."""
    import dataclasses

    from engine.app import AppConfig
    from engine.control.setup import ControlConfig
    from engine.diffusion.options import TorchDefaults
    from engine.render.surface import WindowConfig
    from engine.schedule import ScheduleError, parse_hours
    from engine.show import OutputConfig, ShowConfig, StateConfig, StatusPageConfig
    from engine.state import SessionState, load_state
    from engine.web import DEFAULT_PORT as DEFAULT_STATUS_PORT
    from engine.web import StatusConfig

    saved = SessionState() if args.fresh else load_state()
    source = args.source if args.source is not None else saved.source
    fullscreen = args.fullscreen if args.fullscreen is not None else saved.fullscreen
    monitor = args.monitor if args.monitor is not None else saved.monitor
    size = args.size or saved.window_size or (1280, 720)
    output = args.output or saved.output_size or (1280, 720)
    try:
        hours = parse_hours(args.hours) if args.hours else None
    except ScheduleError as exc:
        raise ScheduleError(f"--hours: {exc}") from None
    torch = TorchDefaults(args.device or "auto", args.dtype or "auto", args.accel or "auto")
    window = (
        None
        if args.headless
        else WindowConfig(
            size=size,
            fullscreen=bool(fullscreen),
            monitor=monitor if monitor is not None else 0,
            vsync=not args.no_vsync,
            borderless=args.borderless,
            preview=args.preview,
            preview_size=args.preview_size,
            keep_awake=not args.allow_sleep,
        )
    )
    controls = ControlConfig(
        osc_host=args.osc_host,
        osc_port=None if args.no_osc else args.osc_port,
        osc_allow=tuple(args.osc_allow),
        osc_feedback=args.osc_feedback,
        osc_tcp=args.osc_tcp,
        oscquery_port=None if args.no_oscquery else args.oscquery_port,
        oscquery_token=args.oscquery_token,
        advertise=args.advertise,
        midi=not args.no_midi and bool(args.midi_in or args.midi_out),
        midi_inputs=tuple(args.midi_in),
        midi_outputs=tuple(args.midi_out),
        midi_map=args.midi_map,
        midi_api=args.midi_api,
        dmx_inputs=tuple(args.dmx),
        dmx_host=args.dmx_host,
        dmx_allow=tuple(args.dmx_allow),
        audio=None if args.audio is None else ("" if args.audio == "default" else args.audio),
        hours=hours,
    )
    outputs = OutputConfig(
        record_pattern=args.record or DEFAULT_PATTERN,
        record_fps=args.record_fps,
        record_at_start=bool(args.record),
        virtualcam=args.virtualcam,
        ndi=args.ndi,
        spout=args.spout,
        syphon=args.syphon,
    )
    state = StateConfig(
        initial=dataclasses.replace(
            saved, source=source, fullscreen=fullscreen, monitor=monitor, window_size=size, output_size=output
        )
    )
    status = (
        None
        if args.no_status
        else StatusPageConfig(
            StatusConfig(
                args.status_host,
                DEFAULT_STATUS_PORT if args.status_port is None else args.status_port,
                args.status_token,
                allow=tuple(args.status_allow) or None,
            ),
            required=args.status_port is not None,
        )
    )  # asked for: a port that cannot be had is a usage error
    return ShowConfig(
        app=AppConfig(
            source=source,
            preset=args.preset or saved.preset or "default",
            output_size=output,
            presets_dir=args.presets_dir,
            torch=torch,
        ),
        window=window,
        fps=args.fps,
        controls=controls,
        outputs=outputs,
        state=state,
        status=status,
    )


def cmd_install_service(args: argparse.Namespace) -> int:
    from engine.service import enable_hint, install_service

    run_args = args.run_args[1:] if args.run_args[:1] == ["--"] else args.run_args
    try:  # the flags are checked now, not at 3 am when systemd starts the show
        build_parser().parse_args(["run", *run_args])
    except SystemExit:
        return 2
    result = install_service(None, run_args, dry_run=args.dry_run)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.dry_run:
        print(result.text, end="")
        return 0
    print(f"wrote {result.path}\n{result.verify}\n\nthen:\n{enable_hint(result.path)}")
    return 1 if result.valid is False else 0


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
    if args.bench == "diffusion":
        from engine.diffusion.bench import run

        return run(args)
    from engine.bench import bench_render

    bench_render(args.sizes, args.frames, args.json)
    return 0


def cmd_train_lora(args: argparse.Namespace) -> int:
    """Usage and input errors (pictures, base model, checkpoint) exit 2, a file that cannot be
    written exits 1; each with one line. What was written before stays whole."""
    if args.no_progress:  # and no loading bars from diffusers and transformers either
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    from engine.diffusion.device import choose_device
    from engine.diffusion.errors import ModelNotFound
    from engine.diffusion.train_lora import TrainConfig, TrainError, needs_gpu, train

    def fail(message: str, code: int) -> int:
        print(f"dreamdeck train-lora: {' '.join(message.split())}", file=sys.stderr)  # one line, always
        return code

    try:
        choice = choose_device(args.device, "float32")
    except ValueError as exc:
        return fail(str(exc), 2)
    if choice.device.type == "cuda":  # the frozen model in half precision; the LoRA trains in float32
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        choice = dataclasses.replace(choice, dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    config = TrainConfig(
        images=args.images,
        base=args.base,
        out=args.out,
        steps=args.steps,
        rank=args.rank,
        size=args.size,
        caption=args.caption,
        lr=args.lr,
        batch=args.batch,
        checkpoint_every=args.checkpoint_every,
        sample_every=args.sample_every,
        sample_steps=args.sample_steps,
        resume=args.resume,
        seed=args.seed,
        kohya=args.kohya,
    )

    def gpu_check(unet: object) -> str | None:
        message = needs_gpu(unet, choice)
        if message and args.device == "auto":  # --device cpu: asked for, so it trains
            return f"{message}; pass --device cpu to train on the CPU anyway"
        if message:
            log.warning("train-lora: %s", message)
        return None

    try:
        report = train(config, choice, progress=not args.no_progress, check=gpu_check)
    except (TrainError, ModelNotFound) as exc:
        return fail(str(exc), 2)
    except OSError as exc:
        return fail(f"cannot write {exc.filename or args.out}: {exc.strerror or exc} (is the disk full?)", 1)
    except KeyboardInterrupt:
        return fail("interrupted; the same command with --resume continues from the last checkpoint", 130)
    print(
        f"wrote {report.out} ({report.steps} steps, {report.steps_per_second:.2f} steps/s"
        + (f", last loss {report.losses[-1]:.4f})" if report.losses else ")")
        + (f"; kohya copy {report.kohya}" if report.kohya else "")
        + (f"; samples {report.samples[0].parent}/{args.out.stem}.sample-*.png" if report.samples else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from engine.logsetup import setup_logging

    # the file is for the show (and its post-mortem); `dreamdeck params` need not touch the disk
    setup_logging(args.log_level, args.log_file, to_file=args.command == "run" and not args.no_log_file)
    commands = {
        "run": cmd_run,
        "params": cmd_params,
        "presets": cmd_presets,
        "doctor": cmd_doctor,
        "bench": cmd_bench,
        "install-service": cmd_install_service,
        "train-lora": cmd_train_lora,
    }
    from engine.scenes.plugins import ScenesNotFound

    try:
        return commands[args.command](args)
    except BrokenPipeError:  # `dreamdeck params | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ScenesNotFound as exc:  # an install problem: one line that says the fix
        print(f"dreamdeck: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
