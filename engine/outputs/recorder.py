"""Recording the output to an MP4 file without ever stalling the show.

    render thread   after_render: is a frame due on the recording's timeline? ask the
                    readback for it (one frame late, no GPU wait) ──► bounded buffer pool
    writer thread   raw RGBA into an ffmpeg subprocess ──► ``.NAME.part`` ──► renamed NAME

``/output/record`` turns recording on and off (OSC, MIDI, the web page, ``--record``);
each time it goes on, a new file is named from the path pattern's date and time fields.

The file has a fixed frame rate and a timeline: each rendered frame falls in one slot of
it. A faster show skips frames; when the show is slower, or when a frame was dropped
because the writer was behind, the next frame that makes it is repeated over the empty
slots, so the MP4 always plays at the speed the show ran (sound recorded elsewhere stays
in sync). A frame that does not fit in the pool is dropped from the recording and
counted, never from the show. The file appears under its final name only once ffmpeg
has finished it: a crash or a kill leaves at most the hidden ``.part`` file beside it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

import moderngl

from engine.outputs.readback import Pixels, Readback
from engine.params import bool_param
from engine.status import RenderedFrame

log = logging.getLogger(__name__)

DEFAULT_PATTERN = "~/Videos/dreamdeck-%Y%m%d-%H%M%S.mp4"
RECORD_PARAM = "/output/record"
RECORDER_PARAMS = (
    bool_param(
        RECORD_PARAM,
        False,
        in_presets=False,
        description="Record the output to an MP4 file while on (the file is finished when it goes off)",
    ),
)
FFMPEG_HINT = "install ffmpeg (apt-get install ffmpeg / brew install ffmpeg / winget install ffmpeg)"


class RecorderError(RuntimeError):
    """A recording that cannot start or go on; the message says why. The show is not affected."""


def recording_path(pattern: str, when: float | None = None) -> Path:
    """The pattern with ``~`` expanded and its strftime fields (``%Y%m%d-%H%M%S``) filled in."""
    return Path(time.strftime(pattern, time.localtime(when))).expanduser()


def free_path(path: Path) -> Path:
    """``path``, or ``name-2.mp4``, ``name-3.mp4``... when a file is already there (never overwrite)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


class Encoder(Protocol):
    """Where a recording's frames go (ffmpeg; tests use slow or failing ones)."""

    def open(self, path: Path, size: tuple[int, int], fps: float) -> None: ...
    def write(self, rgba: bytearray, count: int) -> None: ...  # one RGBA frame, ``count`` times
    def finish(self) -> None: ...  # the file at ``path`` is complete (raises RecorderError)
    def abort(self) -> None: ...  # stop at once; what is at ``path`` is half a file


@functools.cache
def ffmpeg_encoders(ffmpeg: str) -> frozenset[str]:
    """The video encoders this ffmpeg build has (``ffmpeg -encoders``), asked once per binary."""
    result = subprocess.run([ffmpeg, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=30)
    names = set()
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0].startswith("V"):
            names.add(fields[1])
    return frozenset(names)


class FfmpegEncoder:
    """H.264 (libx264, yuv420p: plays everywhere) when ffmpeg has it, else MPEG-4 part 2."""

    CODECS = {
        "libx264": ["-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"],
        "mpeg4": ["-c:v", "mpeg4", "-q:v", "2", "-pix_fmt", "yuv420p"],
    }

    def __init__(self, ffmpeg: str = "ffmpeg", codec: str | None = None) -> None:
        if codec is not None and codec not in self.CODECS:
            raise ValueError(f"codec must be one of {', '.join(self.CODECS)}, not {codec!r}")
        self.ffmpeg = ffmpeg
        self.codec = codec
        self._proc: subprocess.Popen | None = None
        self._stderr: BinaryIO | None = None

    def command(self, path: Path, size: tuple[int, int], fps: float, binary: str, codec: str) -> list[str]:
        cmd = [
            binary,
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostats",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgba",
            "-s",
            f"{size[0]}x{size[1]}",
            "-framerate",
            f"{fps:g}",
            "-i",
            "pipe:0",
            "-an",
        ]
        if size[0] % 2 or size[1] % 2:  # 4:2:0 chroma needs even sides: lose the odd last row/column
            cmd += ["-vf", "crop=trunc(iw/2)*2:trunc(ih/2)*2:0:0"]
        return cmd + self.CODECS[codec] + ["-f", "mp4", "-y", str(path)]

    def open(self, path: Path, size: tuple[int, int], fps: float) -> None:
        binary = shutil.which(self.ffmpeg)
        if binary is None:
            raise RecorderError(f"ffmpeg not found ({self.ffmpeg!r}): {FFMPEG_HINT}")
        codec = self.codec or ("libx264" if "libx264" in ffmpeg_encoders(binary) else "mpeg4")
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (ffmpeg writes to it all take; closed in stop)
        # its own process group: Ctrl+C in the terminal stops dreamdeck, which then finishes
        # the file; an ffmpeg interrupted with it would exit mid-file and lose the take
        detach = (
            {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else {"start_new_session": True}
        )
        self._proc = subprocess.Popen(
            self.command(path, size, fps, binary, codec),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            **detach,
        )
        log.info("recording with %s (%s) to %s", codec, binary, path)

    def write(self, rgba: bytearray, count: int) -> None:
        assert self._proc is not None and self._proc.stdin is not None, "write before open"
        try:
            for _ in range(count):
                self._proc.stdin.write(rgba)
        except (BrokenPipeError, ValueError):
            self._proc.wait()
            raise RecorderError(f"ffmpeg stopped (exit {self._proc.returncode}): {self._ffmpeg_said()}") from None

    def finish(self) -> None:
        assert self._proc is not None and self._proc.stdin is not None, "finish before open"
        with contextlib.suppress(BrokenPipeError):  # ffmpeg already gone: its exit status below says why
            self._proc.stdin.close()
        code = self._proc.wait()
        if code != 0:
            raise RecorderError(f"ffmpeg failed (exit {code}): {self._ffmpeg_said()}")
        self._close_stderr()

    def abort(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._close_stderr()

    def _ffmpeg_said(self) -> str:
        if self._stderr is None:
            return "(no message)"
        self._stderr.seek(0)
        lines = [ln for ln in self._stderr.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1].strip() if lines else "(no message)"

    def _close_stderr(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class Recording:
    """One file: timeline and readback on the render thread, the encoder on its own thread."""

    def __init__(
        self, path: Path, ctx: moderngl.Context, size: tuple[int, int], fps: float, buffers: int, encoder: Encoder
    ) -> None:
        self.path = path  # the final name (made unique when the writer starts)
        self.part = path.with_name(f".{path.name}.part")
        self.size = size
        self.fps = fps
        self.due = 0  # frames the timeline asked for
        self.written = 0  # frames in the file, repeats included (writer thread)
        self.error: str | None = None
        self.error_reported = False  # render thread: the Recorder has logged it
        self.finished = threading.Event()
        self._encoder = encoder
        self._readback = Readback(ctx, size, buffers)
        self._frames: queue.SimpleQueue[tuple[Pixels, int] | None] = queue.SimpleQueue()  # bounded by the pool
        self._start: float | None = None
        self._next_slot = 0
        self._covered = 0  # slots handed to the writer so far
        self._ended = False
        self._thread = threading.Thread(target=self._write, name="recorder", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Frames due that never reached the writer because it was behind."""
        return self._readback.dropped

    @property
    def seconds(self) -> float:
        return self.written / self.fps

    # -- render thread ------------------------------------------------------------------------
    def offer(self, texture: moderngl.Texture, now: float) -> None:
        """This frame, if the timeline wants it; hands the previous one to the writer."""
        if self._start is None:
            self._start = now
        slot = math.floor((now - self._start) * self.fps + 1e-6)
        if slot < self._next_slot:  # faster than the file's rate: this slot already has its frame
            self._hand(self._readback.collect())
            return
        self.due += 1
        self._next_slot = slot + 1
        self._hand(self._readback.request(texture, slot))

    def end(self) -> None:
        """No more frames: the writer finishes the file in the background (see ``finished``)."""
        if self._ended:
            return
        self._ended = True
        self._hand(self._readback.collect())
        self._readback.release()
        self._frames.put(None)

    def _hand(self, pixels: Pixels | None) -> None:
        if pixels is None:
            return
        count = pixels.tag + 1 - self._covered  # this frame, and any slots dropped before it
        self._covered = pixels.tag + 1
        self._frames.put((pixels, count))

    @property
    def waiting(self) -> int:
        """Frames handed to the writer and not written yet (approximate; for tests and status)."""
        return self._frames.qsize()

    # -- writer thread ------------------------------------------------------------------------
    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._encoder.open(self.part, self.size, self.fps)
            while (item := self._frames.get()) is not None:
                pixels, count = item
                try:
                    self._encoder.write(pixels.data, count)
                finally:
                    self._readback.give_back(pixels)
                self.written += count
            self._encoder.finish()
            self.path = free_path(self.path)
            os.replace(self.part, self.path)
            log.info(
                "recording saved: %s (%d frames, %.1f s, %d dropped)",
                self.path,
                self.written,
                self.seconds,
                self.dropped,
            )
        except (RecorderError, OSError) as exc:
            self.error = str(exc) if isinstance(exc, RecorderError) else f"{self.path.parent}: {exc}"
            self._encoder.abort()
            self._remove_part()
        finally:
            self.finished.set()

    def _remove_part(self) -> None:
        try:
            self.part.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # e.g. the folder was never made: nothing of ours is there
            log.debug("no partial take to remove at %s: %s", self.part, exc)

    def wait(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return self.finished.is_set()


class Recorder:
    """An ``Output``: records while ``/output/record`` is on, one file per take."""

    name = "recorder"

    def __init__(
        self,
        pattern: str = DEFAULT_PATTERN,
        fps: float = 30.0,
        queue_frames: int = 8,
        encoder: Callable[[], Encoder] = FfmpegEncoder,
        finish_timeout: float = 60.0,
    ) -> None:
        if not fps > 0:
            raise ValueError("fps must be positive")
        if queue_frames < 1:
            raise ValueError("queue_frames must be at least 1")
        self.pattern = pattern
        self.fps = fps
        self.queue_frames = queue_frames
        self.finish_timeout = finish_timeout
        self.last_error: str | None = None
        self.current: Recording | None = None
        self.last: Recording | None = None  # the take being finished or finished last
        self._finishing: list[Recording] = []  # ended takes whose files are not finished yet
        self._encoder = encoder

    @property
    def status(self) -> str:
        """One line for the HUD and the status page, after the name ("" until the first take)."""
        rec = self.current
        if rec is not None:
            minutes, seconds = divmod(int(rec.seconds), 60)
            return f"REC {minutes:02d}:{seconds:02d} {rec.path.name}  {rec.written} frames, {rec.dropped} dropped"
        last = self.last
        if last is None:
            return ""
        if last.error:
            return f"failed: {last.error}"
        if not last.finished.is_set():
            return f"finishing {last.path.name}"
        return f"saved {last.path} ({last.written} frames, {last.seconds:.1f} s, {last.dropped} dropped)"

    def start(self) -> None:
        """Nothing to do until ``/output/record`` goes on."""

    def after_render(self, frame: RenderedFrame) -> None:
        rec, wanted = self.current, bool(frame.params.get(RECORD_PARAM))
        if rec is not None and (rec.error or not wanted):
            self._end(rec)
            if rec.error:
                frame.params.set(RECORD_PARAM, False, origin=self.name)  # so every view shows it is off
            rec = None
        elif rec is None and wanted:
            rec = self.current = Recording(
                recording_path(self.pattern), frame.ctx, frame.size, self.fps, self.queue_frames, self._encoder()
            )
            self.last_error = None
            log.info("recording to %s", rec.path)
        if rec is not None:
            rec.offer(frame.texture, frame.time)
        for take in [t for t in self._finishing if t.finished.is_set()]:
            self._finishing.remove(take)
            self._report(take)  # a take that failed while finishing (disk full, ffmpeg error)

    def stop(self) -> None:
        """Finish the take in progress and wait (up to ``finish_timeout`` in all) for the files."""
        if self.current is not None:
            self._end(self.current)
        deadline = time.monotonic() + self.finish_timeout
        for take in self._finishing:
            if not take.wait(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "recording %s still finishing after %.0f s; it stays at %s",
                    take.path,
                    self.finish_timeout,
                    take.part,
                )
            self._report(take)
        self._finishing = [t for t in self._finishing if not t.finished.is_set()]

    def _end(self, rec: Recording) -> None:
        rec.end()
        self.current, self.last = None, rec
        self._finishing.append(rec)

    def _report(self, rec: Recording) -> None:
        """Say once why a take failed (render thread); the show goes on."""
        if rec.error and not rec.error_reported:
            rec.error_reported = True
            self.last_error = rec.error
            log.error("recording failed: %s (the show goes on)", rec.error)
