"""OSC control: every parameter at ``/dreamdeck<path>``, the named actions, feedback.

    /dreamdeck/fx/kaleido/segments 8          a parameter (i, f, d, T, F; text for enums)
    /dreamdeck/norm/layer/scene/opacity 0.5   the same through its 0..1 form (CHOP channels)
    /dreamdeck/fx/*/enabled 1                 OSC 1.0 wildcards (* ? [a-z] [!x] {a,b}) fan out
    /dreamdeck/scene/next                     an action (declared in engine.control.actions.ACTIONS)
    /dreamdeck/get /fx/kaleido/segments       reply /dreamdeck/fx/kaleido/segments 8 to the sender

    server.py    OscServer: the UDP listener, packets checked whole and queued (a Control)
    tcp.py       OSC 1.0 / 1.1 streams over TCP on the same port
    address.py   the address space: patterns, argument shapes, encoding, the fast parser
    feedback.py  changes that landed, sent back once per frame

Who may send is engine.control.access's rule (loopback, or an allowlist).
"""

from engine.control.access import SenderFilter, check_binding, is_loopback
from engine.control.osc.address import (
    PREFIX,
    action_args,
    address_collisions,
    compile_pattern,
    encode_message,
    has_pattern,
    normalised_value,
    param_value,
    parse_plain_message,
)
from engine.control.osc.feedback import Feedback
from engine.control.osc.server import (
    DEFAULT_OSC_PORT,
    FRAME_BUDGET,
    MAX_DATAGRAM,
    ORIGIN,
    POLL_INTERVAL,
    RECEIVE_BUFFER,
    OscCounts,
    OscServer,
)
from engine.control.osc.tcp import MAX_TCP_PACKET
from engine.logsetup import RateLimitedLog

__all__ = [
    "DEFAULT_OSC_PORT",
    "FRAME_BUDGET",
    "MAX_DATAGRAM",
    "MAX_TCP_PACKET",
    "ORIGIN",
    "POLL_INTERVAL",
    "PREFIX",
    "RECEIVE_BUFFER",
    "Feedback",
    "OscCounts",
    "OscServer",
    "RateLimitedLog",
    "SenderFilter",
    "action_args",
    "address_collisions",
    "check_binding",
    "compile_pattern",
    "encode_message",
    "has_pattern",
    "is_loopback",
    "normalised_value",
    "param_value",
    "parse_plain_message",
]
