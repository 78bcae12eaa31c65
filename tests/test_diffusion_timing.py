"""Stage timing never fails a frame: events are read one frame late, only once they are done,
and an error reading them turns timing off (the frame comes out).

CUDA events cannot run here, so the timer is given ``GpuEvent``: events that complete only
when the test says the GPU got there, and that raise as CUDA's do ("Both events must be
completed") when read before. The same timer logic runs on the host clock in a CPU stream.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers", reason="the diffusion extra is not installed")

from diffusion_fixtures import one_torch_thread, tiny  # noqa: E402,F401  (fixtures)
from engine.diffusion.device import choose_device  # noqa: E402
from engine.diffusion.stream import LiveSettings, StreamConfig, StreamImg2Img  # noqa: E402
from engine.diffusion.timing import STAGES, StageTimer  # noqa: E402

CPU = torch.device("cpu")


class FakeGpu:
    """A device clock that the test moves: events recorded up to ``reach()`` are done."""

    def __init__(self) -> None:
        self.recorded = 0  # events recorded so far (each gets the next number)
        self.reached = 0  # the GPU has run every event numbered below this
        self.reads = 0

    def reach(self) -> None:
        self.reached = self.recorded

    def event(self) -> GpuEvent:
        return GpuEvent(self)


class GpuEvent:
    def __init__(self, gpu: FakeGpu) -> None:
        self.gpu = gpu
        self.number: int | None = None

    def record(self) -> None:
        self.number = self.gpu.recorded
        self.gpu.recorded += 1

    def query(self) -> bool:
        return self.number is not None and self.number < self.gpu.reached

    def elapsed_time(self, end: GpuEvent) -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("Both events must be completed before calculating elapsed time.")
        self.gpu.reads += 1
        return float(end.number - self.number)  # "ms": one per event in between


def timed_frame(timer: StageTimer) -> None:
    for name in STAGES:
        with timer.stage(name):
            pass
    timer.finish()


def test_events_are_read_one_frame_late_and_only_once_done():
    gpu = FakeGpu()
    timer = StageTimer(CPU, enabled=True, event_type=gpu.event)
    timed_frame(timer)  # frame 1 (its download's end event is not done yet, as after a real sync)
    assert timer.frames == 0 and gpu.reads == 0  # the frame just closed is never read
    gpu.reach()  # the GPU finishes frame 1
    timed_frame(timer)  # frame 2: frame 1 is read now
    assert timer.frames == 1 and timer.last == {name: 1.0 for name in STAGES}
    timed_frame(timer)  # frame 3: frame 2 is not done on the GPU: it waits, nothing is read
    assert timer.frames == 1
    gpu.reach()
    assert timer.means() == {name: 1.0 for name in STAGES}  # means() reads every frame that is done
    assert timer.frames == 3 and timer.error is None and timer.enabled


def test_a_frame_whose_events_never_complete_is_dropped_not_kept_forever():
    gpu = FakeGpu()
    timer = StageTimer(CPU, enabled=True, event_type=gpu.event)
    for _ in range(20):
        timed_frame(timer)  # the GPU never gets anywhere
    assert timer.frames == 0 and timer.dropped == 20 - 8  # at most 8 closed frames wait unread


class LyingEvent(GpuEvent):
    """Says it is done, and raises when read: what a driver error would look like."""

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: GpuEvent) -> float:
        raise RuntimeError("Both events must be completed before calculating elapsed time.")


def test_an_error_reading_events_turns_timing_off_and_never_escapes():
    gpu = FakeGpu()
    timer = StageTimer(CPU, enabled=True, event_type=lambda: LyingEvent(gpu))
    timed_frame(timer)
    timed_frame(timer)  # reads frame 1: raises inside, not out
    assert not timer.enabled and "Both events must be completed" in timer.error
    timed_frame(timer)  # off: nothing recorded any more
    assert gpu.recorded == 2 * 2 * len(STAGES)


def test_a_stream_times_only_when_asked_and_its_frames_survive_a_timer_that_fails(tiny):
    frames = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(4)]
    stream = StreamImg2Img(
        tiny,
        choose_device("cpu"),
        StreamConfig(size=(32, 32)),
        LiveSettings(similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
    )
    assert stream.prompts.wait(60)
    assert stream(frames[0]) is not None and stream.timer.frames == 0  # a show runs untimed
    gpu = FakeGpu()
    stream.timer = StageTimer(CPU, enabled=True, event_type=lambda: LyingEvent(gpu))
    images = [stream(frame) for frame in frames]
    assert all(image is not None for image in images)  # every frame came out
    assert not stream.timer.enabled and stream.timer.error.startswith("stage timing off")
    timed = StreamImg2Img(
        tiny,
        choose_device("cpu"),
        StreamConfig(size=(32, 32)),
        LiveSettings(similarity_threshold=0.0),
        prompts=[("a cat", 1.0)],
        timing=True,
    )
    assert timed.prompts.wait(60)
    for frame in frames:
        timed(frame)
    means = timed.timer.means()  # the host clock, through the same one-frame-late reading
    assert timed.timer.frames == len(frames) and set(means) == set(STAGES) and means["diffuse"] > 0
