"""Standalone reproduction (pyzmq and jupyter_client only) of a reply stranded on a ``zmq.asyncio`` socket by
``jupyter_client.session.Session.send``, the cause of nbclient#312 (a widget cell never finishes).

A client waits for a reply with ``await socket.poll()`` on an asyncio DEALER. The reply arrives, and before the
event loop runs again the client sends a message on the same socket with ``Session.send`` (nbclient's Output-widget
mimic does this for every output of an ``Output`` widget while it waits for the cell's ``execute_reply``).
``Session.send`` sends through a plain ``zmq.Socket`` shadow; the plain send processes the socket's pending
commands, which consumes the edge-triggered ``ZMQ_FD`` wake-up of the reply without telling the asyncio wrapper.
The poll then waits for its own timeout although the reply is in the socket.

Run: ``python lost_reply.py`` prints how long the pending poll took after the send (about the timeout: stranded)
and, after re-arming the asyncio socket with ``socket.get(zmq.EVENTS)`` following the send, how long it takes then
(milliseconds). Versions seen: pyzmq 27.3.0, jupyter_client 8.10.0, libzmq 4.3.5, Python 3.11, Linux.
"""
import asyncio
import select
import sys
import time

import zmq
import zmq.asyncio
from jupyter_client.session import Session

TIMEOUT_S = 4.0


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


async def reply_while_sending(rearm: bool = False, timeout_s: float = TIMEOUT_S) -> dict:
    """One round: returns {"seconds": how long the pending poll took after the send, "ready": its result,
    "drained": whether the send consumed the fd's wake-up, "reply_waiting": whether the reply was in the socket}."""
    ctx = zmq.asyncio.Context()
    server = zmq.Context.instance().socket(zmq.ROUTER)
    client = ctx.socket(zmq.DEALER)
    try:
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        session = Session(key=b"")
        session.send(client, "execute_request", {"code": "pass"})
        ident = server.recv_multipart()[0]                  # the request reached the kernel side
        waiting = asyncio.ensure_future(client.poll(timeout_s * 1000))
        await asyncio.sleep(0.05)                           # the client's poll is registered and pending
        assert not waiting.done()
        server.send_multipart([ident, b"execute_reply"])   # the kernel replies...
        deadline = time.monotonic() + 30
        while not _readable(client.FD):                     # ...and the reply's wake-up reaches the client's fd
            if time.monotonic() > deadline:
                raise RuntimeError("the reply's wake-up never reached the client")
            time.sleep(0.01)                                # blocking: the event loop does not run meanwhile
        session.send(client, "comm_msg", {"comm_id": "x", "data": {}})   # an Output widget's state sync
        drained = not _readable(client.FD)
        reply_waiting = bool(zmq.Socket.get(client, zmq.EVENTS) & zmq.POLLIN)
        if rearm:
            client.get(zmq.EVENTS)                          # zmq.asyncio's getter schedules the pending events
        t0 = time.monotonic()
        ready = await waiting
        seconds = time.monotonic() - t0
        frames = server.recv_multipart()
        if not any(b"comm_msg" in bytes(f) for f in frames):
            raise RuntimeError("the comm_msg did not arrive")
        return {"seconds": seconds, "ready": ready, "drained": drained, "reply_waiting": reply_waiting}
    finally:
        client.close(linger=0)
        server.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    print(f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, Python {sys.version.split()[0]}")
    for rearm in (False, True):
        r = asyncio.run(reply_while_sending(rearm))
        print(f"{'re-armed after the send' if rearm else 'as jupyter_client sends'}: the pending poll took "
              f"{r['seconds']:.3f} s (timeout {TIMEOUT_S:g} s); the send drained the wake-up: {r['drained']}; "
              f"reply in the socket meanwhile: {r['reply_waiting']}")
