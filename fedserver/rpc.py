"""The one place where fedgrid errors become gRPC status codes, and callers become identities.

Servicer methods are wrapped with `rpc(port)`: the wrapper identifies the caller from its verified
certificate before the method runs (refusing certificates that do not belong on this port), passes
the identity in, and turns a FedgridError into a status code with a clean message. Anything else is
logged with its traceback and answered as INTERNAL, so one bad request never takes the daemon down.
Every call is counted and timed here, by method and status code (fedserver/metrics.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from fedgrid import errors
from fedgrid.grpc_errors import error_metadata, status_of
from fedserver import metrics

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: BaseException, call: metrics.RPCCall) -> None:
    if isinstance(exc, errors.FedgridError):
        log.info("%s refused: %s", method, exc)
        _drop_frames(exc)
        status = status_of(exc)
        call.count(status.name)
        await context.abort(status, str(exc), error_metadata(exc))
    log.exception("%s failed", method)
    _drop_frames(exc)
    call.count(grpc.StatusCode.INTERNAL.name)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"{method}: internal error on the server ({type(exc).__name__}); see the server log"
    )


def _drop_frames(exc: BaseException | None) -> None:
    """Let go of the stack frames an answered error still holds (and those of the errors it chains).

    Its traceback keeps every frame of the failed call alive, with their locals: a refused upload's last
    2 MB frame, its stream, its buffers. The abort that answers it forms a reference cycle with it, which
    only a full garbage collection frees, and a quiet server seldom runs one: each refused 110 MB
    upload left it about 7 MB bigger. Once logged, the frames serve nobody.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        if exc.__cause__ is not None:
            _drop_frames(exc.__cause__)
        exc = exc.__context__


def rpc(fn: Callable) -> Callable:
    """Decorate a servicer method `f(self, request, context, caller)`.

    The servicer's `identify(context, method)` returns the caller or raises IdentityError; it runs
    before the body, so no method can forget it.
    """
    name = fn.__name__
    # Register and Hello take a newer roster first, then call their wrapped body `_register` / `_hello`.
    method = name[1:].capitalize() if name.startswith("_") else name
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            with metrics.rpc_call(method, context) as call:
                try:
                    caller = self.identify(context, name)
                    async for item in fn(self, request, context, caller):
                        yield item
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:  # noqa: BLE001 - every failure is answered, none kills the server
                    await _abort(context, name, exc, call)

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with metrics.rpc_call(method, context) as call:
            try:
                caller = self.identify(context, name)
                return await fn(self, request, context, caller)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure is answered, none kills the server
                await _abort(context, name, exc, call)

    return unary_wrapper
