"""One call at a time per Model: a call from a second thread while another thread's
call or generate/chat stream is unfinished raises InputError at once (it does not wait),
and Stream, the iterator generate() and chat() return, holds the model until it is
exhausted, closed or garbage-collected.

Imports the standard library and cpuq.errors only.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from ..errors import InputError


class CallGuard:
    """The guard a Model inherits: _guard (a Lock, never held while the model computes)
    guards _call, the call that holds the model; `path` names it in messages."""

    def _init_guard(self) -> None:
        self._guard = threading.Lock()
        self._call: Call | None = None

    def _begin(self, what: str) -> "Call":
        """Take the model for a call, or raise InputError if it is taken: by a call running
        now (in any thread: reentry from a callback too), or by another thread's unfinished
        stream. A stream this thread left unfinished is ended (superseded) instead."""
        me = threading.get_ident()
        with self._guard:
            held = self._call
            if held is not None and (held.running or held.thread != me):
                if held.thread == me:
                    raise InputError(f"{self.path.name}: {what}() called while {held.what}() is running in the "
                                     f"same thread (a Model is not reentrant)")
                state = "is running" if held.running else "has an unfinished stream, not yet exhausted or closed"
                raise InputError(f"{self.path.name}: this Model is in use by another thread ({held.what}() "
                                 f"{state}); a Model holds one KV cache and runs one call at a time: use one "
                                 f"Model per thread, or serialize the calls")
            self._call = call = Call(what, me)
        return call

    def _end(self, call: "Call") -> None:
        with self._guard:
            call.running = False
            if self._call is call:
                self._call = None

    @contextmanager
    def _using(self, what: str, side: bool = False):
        """Hold the model for a call. side: a call that leaves the conversation alone
        (logits, in a fresh context of its own), which in the thread of a suspended stream
        runs without ending it, the stream marked running meanwhile."""
        me = threading.get_ident()
        with self._guard:
            held = self._call
            borrowed = side and held is not None and not held.running and held.thread == me
            if borrowed:
                held.running = True
        if borrowed:
            try:
                yield
            finally:
                with self._guard:
                    held.running = False
            return
        call = self._begin(what)
        try:
            yield
        finally:
            self._end(call)


class Call:
    """One call that holds a Model: its name, the thread that last ran it, and whether it
    is running now (a generate/chat stream between two pieces is not)."""
    __slots__ = ("what", "thread", "running")

    def __init__(self, what: str, thread: int):
        self.what, self.thread, self.running = what, thread, True


class Stream:
    """The iterator generate() and chat() return: the decode loop, holding the Model from
    the call until it is exhausted, closed or garbage-collected. A class, not a generator,
    so that one dropped before its first piece still lets the Model go."""

    def __init__(self, model: CallGuard, call: Call, pieces: Iterator[str]):
        self._model, self._call, self._pieces = model, call, pieces
        self._done = False

    def __iter__(self) -> "Stream":
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        model, call = self._model, self._call
        with model._guard:
            if model._call is not call:
                self._done = True
                raise InputError(f"this {call.what}() stream was ended by a later call on the same Model "
                                 f"(a Model holds one conversation); start a new one")
            if call.running:  # another thread is inside this stream's __next__
                raise InputError(f"this {call.what}() stream is being read by another thread")
            call.running, call.thread = True, threading.get_ident()
        try:
            piece = next(self._pieces)
        except BaseException:  # StopIteration, an error, Ctrl-C: the stream is over
            with model._guard:
                call.running = False
            self.close()
            raise
        with model._guard:
            call.running = False
        return piece

    def close(self) -> None:
        """End the stream early; the Model is free again. InputError while another thread
        is reading it."""
        with self._model._guard:
            if self._done:
                return
            if self._call.running:
                raise InputError(f"this {self._call.what}() stream is being read by another thread")
            self._done = True
        self._pieces.close()
        self._model._end(self._call)

    def __del__(self) -> None:
        self.close()
