"""Unattended running: the systemd unit, sd_notify from the frame loop, the rotating log.

A real unix datagram socket stands in for systemd: the test reads what a real systemd
would read. The unit file is checked by the real ``systemd-analyze verify`` where the
machine has it.
"""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.app import App, AppConfig
from engine.clock import ManualClock
from engine.logsetup import default_log_file, setup_logging
from engine.render.surface import HeadlessSurface
from engine.service import (
    STATUS_CHARS,
    UNIT_NAME,
    Notifier,
    install_service,
    render_unit,
    run_command,
    status_line,
    systemd_quote,
    user_unit_dir,
    verify_unit,
)
from engine.status import RenderedFrame, ShowStatus

ROOT = Path(__file__).resolve().parents[1]


# -- the unit ------------------------------------------------------------------------------


def unit_entries(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit, every value of each key in order (comments skipped)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out.setdefault(key, []).append(value)
    return out


def test_unit_runs_the_show_under_a_watchdog() -> None:
    command = run_command("gallery", ["--fullscreen", "--monitor", "1"], python="/opt/venv/bin/python")
    assert command == [
        "/opt/venv/bin/python",
        "-m",
        "engine",
        "run",
        "--preset",
        "gallery",
        "--fullscreen",
        "--monitor",
        "1",
    ]
    text = render_unit(command, environment={"DISPLAY": ":0"})
    entries = unit_entries(text)
    assert entries["Type"] == ["notify"] and entries["NotifyAccess"] == ["main"]
    assert entries["Restart"] == ["always"] and entries["WatchdogSec"] == ["10"]
    assert float(entries["RestartSec"][0]) > 0 and entries["StartLimitIntervalSec"] == ["0"]
    assert entries["ExecStart"] == ["/opt/venv/bin/python -m engine run --preset gallery --fullscreen --monitor 1"]
    assert '"DISPLAY=:0"' in entries["Environment"] and "PYTHONUNBUFFERED=1" in entries["Environment"]
    assert entries["KillSignal"] == ["SIGINT"], "SIGINT takes the CLI's clean shutdown path"
    assert entries["WantedBy"] == ["default.target"]
    assert text.index("[Unit]") < text.index("[Service]") < text.index("[Install]")
    with pytest.raises(ValueError):
        render_unit([])


@pytest.mark.parametrize(
    ("arg", "quoted"),
    [
        ("plain", "plain"),
        ("/path/with space/x.toml", '"/path/with space/x.toml"'),
        ("100%", "100%%"),  # systemd expands %-specifiers
        ("$HOME", "$$HOME"),  # and $VARIABLES in ExecStart
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        (";", '";"'),  # a bare ; separates commands in ExecStart
    ],
)
def test_exec_start_words_are_quoted_for_systemd(arg: str, quoted: str) -> None:
    assert systemd_quote(arg) == quoted


def test_control_characters_cannot_reach_a_unit_file() -> None:
    with pytest.raises(ValueError, match="control character"):
        systemd_quote("a\nExecStartPre=/bin/evil")
    with pytest.raises(ValueError, match="control character"):
        render_unit(["x"], environment={"DISPLAY": ":0\n[Service]"})


def test_dry_run_renders_without_writing(tmp_path: Path) -> None:
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "config"), "DISPLAY": ":1", "XAUTHORITY": "/home/a/.Xauthority"}
    result = install_service("default", ["--output", "1920x1080"], dry_run=True, environ=environ)
    assert result.path == tmp_path / "config" / "systemd" / "user" / UNIT_NAME
    assert not result.written and not result.path.exists() and result.valid is None
    entries = unit_entries(result.text)
    assert '"DISPLAY=:1"' in entries["Environment"] and '"XAUTHORITY=/home/a/.Xauthority"' in entries["Environment"]
    assert entries["ExecStart"][0].endswith("-m engine run --preset default --output 1920x1080")
    assert result.notes == ()
    no_display = install_service("default", [], dry_run=True, environ={})
    assert "DISPLAY is not set" in no_display.notes[0], "a unit without a display would restart forever"
    assert install_service("default", ["--headless"], dry_run=True, environ={}).notes == ()
    assert user_unit_dir({}) == Path.home() / ".config" / "systemd" / "user"
    assert user_unit_dir({"XDG_CONFIG_HOME": "relative/ignored"}) == Path.home() / ".config" / "systemd" / "user"


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed on this machine"
)


@needs_systemd_analyze
def test_installed_unit_is_written_atomically_and_verifies(tmp_path: Path) -> None:
    unit_dir = tmp_path / "units"
    result = install_service(
        "default",
        ["--fullscreen", "--size", "1920x1080"],
        unit_dir=unit_dir,
        environ={"DISPLAY": ":0"},
        python=sys.executable,
    )
    assert result.written and result.path.read_text(encoding="utf-8") == result.text
    assert result.valid is True, result.verify
    assert sorted(p.name for p in unit_dir.iterdir()) == [UNIT_NAME], "no temp file left behind"

    again = install_service("other", [], unit_dir=unit_dir, environ={}, python=sys.executable)
    assert "--preset other" in result.path.read_text(encoding="utf-8") and again.valid is True


@needs_systemd_analyze
def test_verify_finds_a_faulty_unit(tmp_path: Path) -> None:
    good = render_unit([sys.executable, "-m", "engine", "run"])
    typo = tmp_path / "typo.service"
    typo.write_text(good.replace("WatchdogSec=", "WatchdogSc="), encoding="utf-8")
    assert verify_unit(typo).startswith("INVALID") and "WatchdogSc" in verify_unit(typo)
    missing = tmp_path / "missing.service"
    missing.write_text(good.replace(sys.executable, "/nonexistent/python"), encoding="utf-8")
    assert verify_unit(missing).startswith("INVALID")


# -- sd_notify --------------------------------------------------------------------------------


@pytest.fixture
def systemd_socket() -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket where systemd's would be (short path: the limit is 108 bytes)."""
    folder = tempfile.mkdtemp(prefix="dd-notify-")
    path = os.path.join(folder, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()
    shutil.rmtree(folder)


def received(sock: socket.socket) -> list[str]:
    """Every datagram waiting now (the notifier's sends are done before this is called)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(0.2)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    surface = HeadlessSurface()
    presets = tmp_path / "presets"
    presets.mkdir()
    shutil.copy(ROOT / "presets" / "default.toml", presets)
    application = App(
        AppConfig(source="pattern", presets_dir=presets, output_size=(160, 90), hot_reload=False),
        surface,
        ManualClock(64.0),
    )  # 1/64 s is exact in binary: frame counts are exact
    yield application
    application.close()
    surface.close()


def frame_at(t: float, status: ShowStatus | None = None) -> RenderedFrame:
    """A frame as the notifier sees it: it reads the time and the status, never the pixels."""
    return RenderedFrame(
        ctx=None,
        texture=None,
        size=(0, 0),
        number=1,
        time=t,  # type: ignore[arg-type]
        status=status or ShowStatus(time=t),
        params=None,
    )  # type: ignore[arg-type]


def test_ready_then_watchdog_pings_follow_the_frame_loop(app: App, systemd_socket) -> None:
    sock, path = systemd_socket
    notifier = Notifier(path, watchdog_s=1.0)  # ping every 0.5 s of the app's clock: every 32 frames at 64 fps
    app.add_output(notifier)
    app.start()
    assert received(sock) == []

    app.step()
    assert received(sock) == ["READY=1"], "ready once the first frame is rendered"
    for _ in range(31):
        app.step()
    assert received(sock) == [], "no ping before half the watchdog period"
    app.step()
    messages = received(sock)
    assert messages[0] == "WATCHDOG=1" and messages[1] == f"STATUS={status_line(app.status)}"
    assert " fps, scene " in messages[1] and ", preset default" in messages[1]
    for _ in range(96):
        app.step()
    assert received(sock) == ["WATCHDOG=1"] * 3, "three more pings in 1.5 s of frames"

    # the frame loop freezes: nothing is sent, so systemd's watchdog would fire
    with pytest.raises(socket.timeout):
        sock.recv(4096)
    assert notifier.sent == {"READY": 1, "WATCHDOG": 4, "STATUS": 1}

    for _ in range(32):  # it runs again: the pings come back
        app.step()
    assert received(sock) == ["WATCHDOG=1"]
    app.stop()
    assert received(sock) == ["STOPPING=1"]


def test_status_line_is_one_short_line_of_the_show() -> None:
    quiet = ShowStatus(fps=59.94, scene="ddpm", preset="gallery", rss_mb=812.4)
    assert status_line(quiet) == "59.9 fps, scene ddpm, preset gallery, memory 812 MB"
    assert status_line(ShowStatus()) == "0.0 fps, scene -, preset -", "nothing known yet: no memory, no scene"
    troubled = ShowStatus(fps=30.0, scene="realtime", errors=("scene ddpm could not load", "preset refused:\nline 2"))
    line = status_line(troubled)
    assert line.endswith("2 errors: preset refused: line 2") and "\n" not in line, line
    assert len(status_line(ShowStatus(errors=("x" * 5000,)))) == STATUS_CHARS


def test_abstract_namespace_socket() -> None:
    name = f"dreamdeck-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        notifier = Notifier(
            environ={"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
        )
        assert notifier.enabled and notifier.watchdog_s == 4.0 and notifier.ping_every == 2.0
        notifier.start()
        notifier.after_render(frame_at(0.0))
        assert sock.recv(4096) == b"READY=1"
        notifier.after_render(frame_at(2.0))
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.stop()
    finally:
        sock.close()


def test_without_systemd_the_notifier_does_nothing() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled and notifier.status == ""
    notifier.start()
    notifier.after_render(frame_at(0.0))
    notifier.after_render(frame_at(100.0))
    notifier.stop()
    assert notifier.sent == {} and not notifier.ready
    other_pid = Notifier(environ={"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_s == 10.0, "a watchdog meant for another process is not ours"


def test_a_vanished_systemd_costs_one_log_line_not_a_frame(systemd_socket, caplog) -> None:
    sock, path = systemd_socket
    notifier = Notifier(path, watchdog_s=1.0)
    notifier.start()
    notifier.after_render(frame_at(0.0))
    os.unlink(path)  # systemd went away
    with caplog.at_level(logging.WARNING, logger="engine.service"):
        for n in range(1, 6):
            notifier.after_render(frame_at(float(n)))
    assert notifier.sent == {"READY": 1}
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1
    notifier.stop()


# -- the log ----------------------------------------------------------------------------------------


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("dreamdeck-logsetup-test")
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def test_log_goes_to_the_console_and_a_rotating_file(tmp_path: Path, logger: logging.Logger) -> None:
    # Asserts on what reaches the console and the file, and on the handlers setup_logging says
    # it installed: never on len(logger.handlers), which pytest's own capture handlers change.
    console = io.StringIO()
    path = tmp_path / "log" / "dreamdeck.log"
    setup = setup_logging("info", path, max_bytes=2000, backups=3, console=console, logger=logger)
    assert setup.path == path
    stream, rotating = setup.handlers
    assert type(stream) is logging.StreamHandler and stream.stream is console
    assert isinstance(rotating, logging.handlers.RotatingFileHandler)
    assert Path(rotating.baseFilename) == path and (rotating.maxBytes, rotating.backupCount) == (2000, 3)
    assert all(handler in logger.handlers for handler in setup.handlers)
    logger.debug("not shown at info")
    for n in range(200):
        logger.info("line %03d %s", n, "x" * 40)
    assert "line 199" in console.getvalue() and "not shown" not in console.getvalue()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["dreamdeck.log", "dreamdeck.log.1", "dreamdeck.log.2", "dreamdeck.log.3"], files
    assert all(p.stat().st_size <= 2000 for p in path.parent.iterdir()), "rotation bounds each file"
    assert "line 199" in path.read_text(encoding="utf-8")
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first[:4].isdigit() and first[4] == "-", "the file keeps dates: it outlives a day"

    again = setup_logging("warning", path, console=console, logger=logger)
    assert not any(handler in logger.handlers for handler in setup.handlers), "the first set-up is replaced"
    logger.warning("said once")
    logger.info("below warning now")
    assert console.getvalue().count("said once") == 1, "configuring twice must not log every line twice"
    assert path.read_text(encoding="utf-8").count("said once") == 1
    assert "below warning now" not in console.getvalue()
    again.close()
    logger.warning("after close")
    assert "after close" not in console.getvalue() and "after close" not in path.read_text(encoding="utf-8")
    assert not any(handler in logger.handlers for handler in again.handlers)


def test_unwritable_log_folder_falls_back_to_the_console(tmp_path: Path, logger: logging.Logger) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    console = io.StringIO()
    setup = setup_logging("info", blocker / "log" / "dreamdeck.log", console=console, logger=logger)
    assert setup.path is None
    [stream] = setup.handlers  # the console alone
    assert type(stream) is logging.StreamHandler and stream.stream is console and stream in logger.handlers
    assert "cannot write the log file" in console.getvalue() and "console only" in console.getvalue()
    logger.info("the show goes on")
    assert "the show goes on" in console.getvalue()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"], "no log file anywhere else"
    with pytest.raises(ValueError, match="unknown log level"):
        setup_logging("chatty", logger=logger, to_file=False)


def test_default_log_file_is_in_the_state_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_log_file() == tmp_path / "state" / "dreamdeck" / "log" / "dreamdeck.log"
