"""DMX control: a lighting desk drives parameters and recalls presets over Art-Net or sACN.

    DmxControl(registry, actions, inputs=["artnet:0", "sacn:1"])

Threads:

    "dmx-artnet", "dmx-sacn"   one per protocol: reads its UDP socket, refuses and counts
                               floods, senders off the allowlist, malformed packets and
                               universes not listened to, and leaves the newest levels of
                               each universe in one slot (a newer packet replaces an older
                               one the render thread has not taken: counted as coalesced)
    render thread              ``frame(now)``: takes the slot without waiting (if a receiver
                               holds it that instant, next frame), and turns the channels
                               that changed into registry sets, preset recalls and learn
    "dmx-save"                 a learned mapping is written (atomically) off the frame

So a desk, or a flood, applies at most one value per channel per frame. Listeners bind
to 127.0.0.1 unless opened like OSC (a host off the loopback needs an allowlist); sACN
joins its universes' multicast groups only when opened. Mappings share MIDI's file (see
``engine.control.midimap``: ``type = "dmx"`` entries).

    receive.py   sockets, ArtDmx parsing, sACN through the sacn library, refusals
    control.py   DmxControl: levels -> mappings -> parameters and presets, learn
"""

from engine.control.dmx.control import ORIGIN, DmxControl
from engine.control.dmx.receive import (
    ARTNET_PORT,
    SACN_NEEDS,
    SACN_PORT,
    DmxInput,
    parse_artdmx,
    parse_inputs,
    sacn_available,
)

__all__ = [
    "ARTNET_PORT",
    "ORIGIN",
    "SACN_NEEDS",
    "SACN_PORT",
    "DmxControl",
    "DmxInput",
    "parse_artdmx",
    "parse_inputs",
    "sacn_available",
]
