"""Live control: OSC, OSCQuery, MIDI, audio, tempo and modulation.

Every control reads and writes the parameter registry and posts named actions; nothing
else. A control is an object with ``start()``, ``stop()``, ``frame(now)`` (called on the
render thread at each frame boundary, after parameter changes landed) and ``status``
(one line for the HUD).
"""

from engine.control.actions import ActionError, Actions, Control

__all__ = ["ActionError", "Actions", "Control"]
