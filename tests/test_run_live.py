"""`dreamdeck run` end to end with its live controls: OSC in, OSCQuery and the status page out."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from pythonosc.udp_client import SimpleUDPClient

from engine.app import App, AppConfig
from engine.clock import ManualClock
from engine.render.surface import HeadlessSurface


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    return None


def test_run_takes_osc_and_shows_it_in_oscquery_and_health(tmp_path):
    osc_port, query_port, status_port = free_port(socket.SOCK_DGRAM), free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "engine",
            "--no-log-file",
            "run",
            "--headless",
            "--no-midi",
            "--osc-port",
            str(osc_port),
            "--oscquery-port",
            str(query_port),
            "--status-port",
            str(status_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        health = wait_for(lambda: get_json(f"http://127.0.0.1:{status_port}/health"))
        assert health is not None, "the status page never answered"
        assert wait_for(lambda: get_json(f"http://127.0.0.1:{query_port}/?HOST_INFO")), "no OSCQuery"
        client = SimpleUDPClient("127.0.0.1", osc_port)
        url = f"http://127.0.0.1:{query_port}/dreamdeck/fx/kaleido/segments?VALUE"

        def landed():
            client.send_message("/dreamdeck/fx/kaleido/segments", 11)
            reply = get_json(url)
            return reply is not None and reply["VALUE"] == [11]

        assert wait_for(landed), "the OSC value never reached the registry"
        assert wait_for(lambda: (get_json(f"http://127.0.0.1:{status_port}/health") or {}).get("fps", 0) > 0)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "signal 2: stopping" in err


def test_learn_key_without_midi_says_why():
    surface = HeadlessSurface()
    app = App(AppConfig(hot_reload=False), surface, ManualClock())
    try:
        app.start()
        app.handle_action("learn")
        app.step()
        assert any("MIDI is off" in line for line in app.hud_lines())
    finally:
        app.close()
        surface.close()
