"""The lost ``execute_reply`` of a widget cell, and its fix: re-arm an asyncio socket after a send that bypassed it.

**The stall.** nbclient (what nbconvert's ``ExecutePreprocessor``, nbgrader's autograde and ``labkit.slides`` run
notebooks with) waits for a cell's ``execute_reply`` on a ``zmq.asyncio`` socket. While it waits it mimics a
frontend's ``Output`` widget: every output that lands in an ``Output`` (``with out: print(...)``, ``plt.show()``
in a widget callback, ``clear_output``) makes it send a ``comm_msg`` back to the kernel on the *same* shell socket.
jupyter_client's ``Session.send`` sends through a plain ``zmq.Socket`` shadow of that asyncio socket, and a plain
send runs libzmq's command processing, which drains the socket's edge-triggered ``ZMQ_FD``. If the reply has just
arrived, its wake-up is consumed by that send: the asyncio socket is never told, its pending ``poll`` never fires,
and the reply sits unread in the socket while the kernel is idle. It comes out only when the poll's own timeout
expires (nbclient's cell timeout: 10 minutes in our CI, 30 s in nbgrader's default) or when some later command
happens to wake the socket. The more outputs a cell sends into an ``Output`` and the busier the machine (the
client lags behind the kernel's outputs, so its sends overlap the reply), the more often it happens.

**The fix.** After ``Session.send`` (and ``send_raw``) on a ``zmq.asyncio`` socket, read ``EVENTS`` through the
asyncio socket: pyzmq then schedules the handler for whatever the plain send consumed. :func:`install` patches
jupyter_client's ``Session`` once per process; labkit calls it wherever it runs notebooks with nbclient (slides,
grading, ``python -m labkit stress``) and the test suite's ``conftest.py`` calls it for every test.
``tests/test_zmq_rearm.py`` shows the stranding deterministically on two sockets and that the patch ends it;
``python -m labkit stress --repro`` measures the stall rate on a real kernel with and without the patch.

Reported upstream as nbclient#312 (widgets) and discussed in jupyter_client#1059 (the shadow send); ipykernel 7.4
fixed the kernel-side twin of this bug (ipykernel#1529: a raw reply send on the kernel's shell ROUTER).
"""
from __future__ import annotations

import asyncio
import functools

_MARK = "_labkit_rearm"


def rearm(stream) -> None:
    """Make an asyncio socket look again at its events (schedules its handler if a message waits)."""
    import zmq
    import zmq.asyncio

    if not isinstance(stream, zmq.asyncio.Socket) or stream.closed:
        return
    loop = getattr(stream, "_current_loop", None)
    if loop is None:                       # never awaited: nothing is waiting on it
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        stream.get(zmq.EVENTS)             # zmq.asyncio's get(EVENTS) schedules the pending events
    elif not loop.is_closed():
        loop.call_soon_threadsafe(lambda: None if stream.closed else stream.get(zmq.EVENTS))


def _wrap(method):
    @functools.wraps(method)
    def send(self, stream, *args, **kwargs):
        try:
            return method(self, stream, *args, **kwargs)
        finally:
            rearm(stream)

    setattr(send, _MARK, True)
    return send


def install() -> bool:
    """Patch ``jupyter_client.session.Session.send`` and ``send_raw`` to re-arm asyncio sockets after the send.

    Idempotent; returns True when the patch is (now) in place, False when jupyter_client is not installed."""
    try:
        from jupyter_client.session import Session
    except ImportError:
        return False
    for name in ("send", "send_raw"):
        method = getattr(Session, name)
        if not getattr(method, _MARK, False):
            setattr(Session, name, _wrap(method))
    return True


def uninstall() -> None:
    """Undo :func:`install` (for A/B measurements)."""
    from jupyter_client.session import Session

    for name in ("send", "send_raw"):
        method = getattr(Session, name)
        if getattr(method, _MARK, False):
            setattr(Session, name, method.__wrapped__)


def installed() -> bool:
    try:
        from jupyter_client.session import Session
    except ImportError:
        return False
    return getattr(Session.send, _MARK, False) and getattr(Session.send_raw, _MARK, False)
