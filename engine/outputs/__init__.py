"""Outputs: things that take each rendered frame to somewhere else than the window.

Each is an ``engine.app.Output`` (name, status, start, stop, after_render): after each
frame it gets an ``engine.status.RenderedFrame`` (the output texture, the frame's number
and time, the show's ``ShowStatus`` and the parameter registry), never the App, and no
module here imports ``engine.app``. They run on the render thread only long enough to
start an asynchronous read of the output texture; files, encoders, drivers and networks
are handled on their own threads, and a frame that does not fit is dropped from that
output (and counted), never from the show.

    recorder.py    MP4 through an ffmpeg subprocess (``/output/record``)
    sharing.py     frames to other apps: virtual camera, NDI, Spout, Syphon (optional extras)
    readback.py    the one-frame-late pixel readback they share (and the status thumbnail)
"""
