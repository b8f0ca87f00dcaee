"""Where grpcio's sync server runs a unary RPC: fewer thread handoffs per call.

grpcio's serving thread hands every call to the pool at once; the pool thread then asks
for the request message and sleeps until the serving thread delivers it, so each call
wakes a pool thread twice. Run the handler in the serving thread instead and the call
deadlocks: the serving thread would wait for a message only it can deliver.

`ReceiveFirstExecutor` does that for a unary handler marked `non_blocking`: it asks for
the message itself and runs the handler in the serving thread when the message arrives.
Such a handler must never wait on I/O that can hang, or on a lock a slow call holds: every
other call waits meanwhile. Everything else goes to the pool as before. It relies on grpcio
internals (`grpc._server`, checked at start for the pinned version); when they are not as
expected, or a submit does not look like a unary call, it is a plain pool.
"""

from __future__ import annotations

import logging
from concurrent import futures
from typing import Any, Callable, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
_MARK = "cvmfs_non_blocking"


def non_blocking(fn: F) -> F:
    """Mark a servicer method safe to run in grpcio's serving thread: it answers from
    memory or a local sqlite read, never waits on a repository, a tree walk or a lock a
    write holds (a bound method reads the mark from its function)."""
    setattr(fn, _MARK, True)
    return fn


def _internals() -> Any | None:
    """grpc._server and cygrpc when they have what this module uses, else None."""
    try:
        from grpc import _server
        from grpc._cython import cygrpc
    except ImportError:
        return None
    names = ("cygrpc", "_unary_response_in_pool", "_receive_message", "_abort", "_is_rpc_state_active",
             "_RECEIVE_MESSAGE_TOKEN", "_CLOSED", "_EMPTY_FLAGS")
    if not all(hasattr(_server, n) for n in names) or not hasattr(cygrpc, "ReceiveMessageOperation"):
        return None
    return _server


class ReceiveFirstExecutor(futures.Executor):
    """The executor for `grpc.server(...)`; `pool` runs what cannot run inline."""

    def __init__(self, pool: futures.ThreadPoolExecutor) -> None:
        self.pool = pool
        self._server = _internals()
        if self._server is None:
            log.warning("grpcio internals differ from the pinned version: every RPC goes through the pool")

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future:
        s = self._server
        # grpc._server._handle_unary_unary: submit(state.context.run, _unary_response_in_pool,
        # rpc_event, state, behavior, unary_request, request_deserializer, response_serializer)
        if (s is None or kwargs or len(args) != 7 or args[0] is not s._unary_response_in_pool
                or not getattr(args[3], _MARK, False)):
            return self.pool.submit(fn, *args, **kwargs)
        try:
            return self._receive_first(fn, *args[1:])
        except Exception:  # noqa: BLE001 - never fail a call for the shortcut: the pool's way
            log.exception("receive-first dispatch failed; using the pool")
            return self.pool.submit(fn, *args, **kwargs)

    def _receive_first(self, run, rpc_event, state, behavior, _thunk, deserializer, serializer) -> futures.Future:
        s = self._server
        done: futures.Future = futures.Future()
        done.set_running_or_notify_cancel()
        receive = s._receive_message(state, rpc_event.call, deserializer)

        def on_message(event):  # in the serving thread; must not raise
            result = receive(event)  # stores state.request, or marks the client closed
            try:
                with state.condition:
                    request, state.request = state.request, None
                    if request is None and s._is_rpc_state_active(state) and state.client is s._CLOSED:
                        s._abort(state, rpc_event.call, s.cygrpc.StatusCode.unimplemented,
                                 b"a unary call requires exactly one request message")
                if request is not None:
                    # grpcio's own function (it catches what the handler raises), given the request
                    run(s._unary_response_in_pool, rpc_event, state, behavior, lambda: request, deserializer,
                        serializer)
                done.set_result(None)
            except Exception:  # noqa: BLE001 - an exception here would end grpcio's serving thread
                log.exception("receive-first dispatch failed after the request arrived")
                if not done.done():
                    done.set_result(None)
            return result

        # The caller (grpc._server._handle_with_method_handler) holds state.condition, an RLock.
        with state.condition:
            rpc_event.call.start_server_batch((s.cygrpc.ReceiveMessageOperation(s._EMPTY_FLAGS),), on_message)
            state.due.add(s._RECEIVE_MESSAGE_TOKEN)
        return done

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.pool.shutdown(wait=wait, cancel_futures=cancel_futures)
