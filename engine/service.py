"""Unattended running: a systemd user unit, and the sd_notify protocol without a dependency.

A gallery piece runs for weeks with nobody there. systemd restarts it when it crashes
(``Restart=always``) and also when it hangs: with ``WatchdogSec=10`` the process must
send ``WATCHDOG=1`` at least every 10 s, and ``Notifier`` sends it from the render
loop (it is an Output), so a frozen frame loop stops pinging and gets restarted, while
a slow model load on another thread does not.

The protocol is one datagram per message on the unix socket named by ``NOTIFY_SOCKET``
(a leading ``@`` means Linux's abstract namespace). Without that variable (not run by
systemd) the notifier does nothing.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.state import write_atomic
from engine.status import RenderedFrame, ShowStatus

log = logging.getLogger(__name__)

UNIT_NAME = "dreamdeck.service"
WATCHDOG_SEC = 10.0
RESTART_SEC = 3.0
STATUS_EVERY_S = 5.0  # `systemctl --user status dreamdeck` shows a line this fresh
STATUS_CHARS = 200  # a STATUS= line longer than a terminal row is cut by systemctl anyway
DISPLAY_VARIABLES = ("DISPLAY", "XAUTHORITY", "WAYLAND_DISPLAY")  # what a window needs from the session


# -- the unit file -------------------------------------------------------------------------


def user_unit_dir(environ: Mapping[str, str] | None = None) -> Path:
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "systemd" / "user"


def systemd_quote(arg: str) -> str:
    """One ExecStart word, quoted by systemd's rules (not the shell's).

    systemd expands ``%`` specifiers and ``$VAR`` in ExecStart, so both are doubled;
    a word with spaces, quotes or backslashes is double-quoted with C-style escapes.
    """
    if any(ord(ch) < 32 for ch in arg):
        raise ValueError(f"a control character cannot be passed to ExecStart: {arg!r}")
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if escaped and not any(ch in escaped for ch in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _env_quote(name: str, value: str) -> str:
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{name}: a control character cannot go into a unit file")
    text = f"{name}={value}".replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def run_command(preset: str | None = None, output_args: Sequence[str] = (), python: str | None = None) -> list[str]:
    """The command the unit runs: this Python, ``-m engine run``, the preset, the output flags.

    ``sys.executable`` rather than a ``dreamdeck`` found on PATH: a user service starts
    with systemd's PATH, not the shell's, and the virtual environment must be the one
    that was used to install.
    """
    command = [python or sys.executable, "-m", "engine", "run"]
    if preset:
        command += ["--preset", preset]
    return command + list(output_args)


def render_unit(
    command: Sequence[str],
    *,
    environment: Mapping[str, str] | None = None,
    working_directory: str = "~",
    watchdog_sec: float = WATCHDOG_SEC,
    restart_sec: float = RESTART_SEC,
    description: str = "dreamdeck: real-time visuals",
) -> str:
    """The text of the systemd user unit that runs ``command`` and restarts it on crash or hang."""
    if not command:
        raise ValueError("the unit needs a command to run")
    if watchdog_sec <= 0 or restart_sec < 0:
        raise ValueError("watchdog_sec must be positive and restart_sec not negative")
    env = dict(environment or {})
    lines = [
        "# Written by `dreamdeck install-service`; run it again rather than editing this file.",
        "[Unit]",
        f"Description={description}",
        "After=graphical-session.target",
        # a gallery piece must keep trying forever, not give up after five quick failures
        "StartLimitIntervalSec=0",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(systemd_quote(arg) for arg in command)}",
        "Restart=always",
        f"RestartSec={restart_sec:g}",
        f"WatchdogSec={watchdog_sec:g}",
        # the first frame may wait on shader compiles and a model's first load
        "TimeoutStartSec=120",
        # SIGINT takes the CLI's clean path: outputs closed, state saved, STOPPING=1 sent
        "KillSignal=SIGINT",
        "TimeoutStopSec=15",
        "Environment=PYTHONUNBUFFERED=1",
    ]
    lines += [f"Environment={_env_quote(name, value)}" for name, value in sorted(env.items())]
    # WorkingDirectory takes a path as it is (no quoting); "~" is the user's home
    lines.append(f"WorkingDirectory={working_directory.replace('%', '%%')}")
    lines += ["", "[Install]", "WantedBy=default.target", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class InstallResult:
    path: Path
    text: str
    written: bool
    verify: str  # what `systemd-analyze verify` said (starts with INVALID when it found a fault) or why it did not run
    notes: tuple[str, ...] = ()  # things the person installing should know (printed by the CLI)

    @property
    def valid(self) -> bool | None:
        """True verified, False found faulty, None not verified."""
        if self.verify.startswith("INVALID"):
            return False
        return True if self.verify.startswith("verified") else None


def install_service(
    preset: str | None,
    output_args: Sequence[str] = (),
    *,
    dry_run: bool = False,
    environ: Mapping[str, str] | None = None,
    unit_dir: Path | None = None,
    python: str | None = None,
    verify: bool = True,
) -> InstallResult:
    """Write ``~/.config/systemd/user/dreamdeck.service`` (atomically), or only render it.

    The display variables of the installing session (DISPLAY, XAUTHORITY,
    WAYLAND_DISPLAY) go into the unit: a user service does not inherit them.
    """
    environ = os.environ if environ is None else environ
    command = run_command(preset, output_args, python)
    environment = {name: environ[name] for name in DISPLAY_VARIABLES if environ.get(name)}
    text = render_unit(command, environment=environment)
    path = (unit_dir or user_unit_dir(environ)) / UNIT_NAME
    notes = []
    if "--headless" not in output_args and not ({"DISPLAY", "WAYLAND_DISPLAY"} & environment.keys()):
        notes.append(
            "DISPLAY is not set here, so the unit has none and its window will not open: install "
            "from the desktop session, or run with DISPLAY=:0"
        )
    if dry_run:
        return InstallResult(path, text, written=False, verify="not verified: dry run", notes=tuple(notes))
    write_atomic(path, text.encode("utf-8"))
    log.info("wrote %s", path)
    return InstallResult(
        path, text, written=True, verify=verify_unit(path) if verify else "not verified", notes=tuple(notes)
    )


def verify_unit(path: Path) -> str:
    """Run ``systemd-analyze verify`` on the unit; return its verdict as one line.

    It checks the syntax, unknown keys and that ExecStart's program exists. The user
    manager's mode is tried first; where there is no user session (a container, ssh
    without a login manager) it cannot start, and the system mode checks the same file.
    Machines without systemd have no ``systemd-analyze``: that is said, not an error.
    """
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return "not verified: systemd-analyze is not installed here"
    verdict = ""
    for mode in (["--user"], []):
        try:
            done = subprocess.run([tool, *mode, "verify", str(path)], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"not verified: systemd-analyze failed to run: {exc}"
        output = " ".join((done.stdout + done.stderr).split())
        if mode and "Failed to initialize manager" in output:
            continue  # no user manager here: try the system mode
        how = "" if mode else " (system mode: no user manager here)"
        if done.returncode != 0:
            return f"INVALID: systemd-analyze verify failed{how}: {output}"
        # it exits 0 on warnings such as an unknown key: those are mistakes in our unit too
        verdict = f"verified by systemd-analyze{how}" if not output else f"INVALID: systemd-analyze{how}: {output}"
        break
    return verdict or "not verified: systemd-analyze could not start"


def enable_hint(path: Path) -> str:
    """The commands a person runs after installing (printed by the CLI; not run for them)."""
    return "\n".join(
        [
            "systemctl --user daemon-reload",
            f"systemctl --user enable --now {shlex.quote(path.name)}",
            'loginctl enable-linger "$USER"   # start at boot, without anyone logging in',
            f"journalctl --user -u {shlex.quote(path.name)} -f   # follow its log",
        ]
    )


# -- sd_notify -----------------------------------------------------------------------------


def _socket_address(name: str) -> str | bytes:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()  # abstract namespace: no file on disk
    return name


class Notifier:
    """sd_notify for the frame loop: READY=1 once, WATCHDOG=1 from the render thread.

    Use it as an Output: the first ``after_render`` says READY=1 (the first frame is on
    screen), later ones send WATCHDOG=1 at most every ``watchdog_s / 2`` seconds of the
    app's clock, and every few seconds a STATUS= line (``status_line`` of the frame's
    ShowStatus). ``stop()`` sends STOPPING=1.
    The socket is non-blocking: a systemd that is busy never stalls a frame; a lost
    datagram is logged once, and the next ping tries again.
    """

    name = "systemd"

    def __init__(
        self,
        socket_name: str | None = None,
        *,
        watchdog_s: float | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if environ is None else environ
        self.socket_name = socket_name if socket_name is not None else environ.get("NOTIFY_SOCKET") or None
        if watchdog_s is None:
            watchdog_s = _watchdog_from_env(environ)
        self.watchdog_s = watchdog_s
        self.ping_every = watchdog_s / 2.0
        self.sent: dict[str, int] = {}
        self.ready = False
        self._socket: socket.socket | None = None
        self._next_ping = 0.0
        self._next_status = 0.0
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.socket_name is not None

    @property
    def status(self) -> str:
        if not self.enabled:
            return ""  # not run by systemd: nothing for the HUD to say
        return f"ready, {self.sent.get('WATCHDOG', 0)} watchdog pings" if self.ready else "starting"

    def start(self) -> None:
        if self.enabled and self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.setblocking(False)

    def stop(self) -> None:
        if self._socket is not None:
            self.notify("STOPPING=1")
            self._socket.close()
            self._socket = None

    def notify(self, message: str) -> bool:
        """Send one message (``KEY=value`` lines); False when it could not be sent."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto(message.encode("utf-8"), _socket_address(self.socket_name))  # type: ignore[arg-type]
        except OSError as exc:
            if not self._warned:  # once: a systemd that went away would otherwise fill the log
                log.warning("sd_notify to %s failed: %s (further failures not logged)", self.socket_name, exc)
                self._warned = True
            return False
        key = message.split("=", 1)[0]
        self.sent[key] = self.sent.get(key, 0) + 1
        return True

    def after_render(self, frame: RenderedFrame) -> None:
        if self._socket is None:
            return
        now = frame.time
        if not self.ready:
            self.ready = self.notify("READY=1")
            self._next_ping = now + self.ping_every
            return
        if now < self._next_ping:
            return
        self.notify("WATCHDOG=1")
        self._next_ping = now + self.ping_every
        if now >= self._next_status:  # rides on a ping: one datagram burst per period at most
            self._next_status = now + STATUS_EVERY_S
            self.notify(f"STATUS={status_line(frame.status)}")


def _watchdog_from_env(environ: Mapping[str, str]) -> float:
    """systemd says the watchdog period in WATCHDOG_USEC (for our PID only, per WATCHDOG_PID)."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if usec and (not pid or pid == str(os.getpid())):
        try:
            value = int(usec) / 1e6
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number: using %g s", usec, WATCHDOG_SEC)
        else:
            if value > 0:
                return value
    return WATCHDOG_SEC


def status_line(status: ShowStatus) -> str:
    """The line `systemctl --user status dreamdeck` shows: rate, scene, preset, memory, errors."""
    line = f"{status.fps:.1f} fps, scene {status.scene or '-'}, preset {status.preset or '-'}"
    if status.rss_mb is not None:
        line += f", memory {status.rss_mb:.0f} MB"
    if status.errors:
        line += f", {len(status.errors)} error{'s' if len(status.errors) > 1 else ''}: {status.errors[-1]}"
    return " ".join(line.split())[:STATUS_CHARS]  # one line, whatever an error message holds
