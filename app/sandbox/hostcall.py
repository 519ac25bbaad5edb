"""Raw host functions: WASI imports shadowed without wasmtime-py's per-call conversions, and calls back into wasm."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

from wasmtime import Caller, Func, FuncType, Linker, Memory, WasmtimeError
from wasmtime import _ffi as ffi

log = logging.getLogger(__name__)

# The raw argument array of one call: `args[i].i32` / `args[i].i64`; the result goes in args[0].
RawArgs = Any
Handler = Callable[[Caller, RawArgs], int | None]

_TrapPointer = ctypes.POINTER(ffi.wasm_trap_t)
_RAW_SIZE = ctypes.sizeof(ffi.wasmtime_val_raw_t)
# A NULL finalizer: the callbacks carry no environment, and a Python finalizer could be called
# by a Linker dropped during interpreter shutdown, after the function object is gone.
_NO_FINALIZER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)()


class EndRun(Exception):
    """Raised inside a handler to end the guest's call with `trap` (an owned wasm_trap_t address)."""

    def __init__(self, trap: int) -> None:
        super().__init__(trap)
        self.trap = trap


def cause(error: WasmtimeError) -> str:
    """The line of a wasmtime error that says what went wrong (its last; a backtrace comes first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def new_trap(message: str) -> int:
    """A fresh trap, owned by whoever receives it: returned from a host function, wasmtime takes it."""
    data = message.encode()
    trap = ffi.wasmtime_trap_new(ctypes.create_string_buffer(data), len(data))
    address: int = ctypes.cast(trap, ctypes.c_void_p).value or 0
    return address


def define_raw(linker: Linker, module: str, name: str, ty: FuncType, handler: Handler) -> object:
    """Define `module.name` on the linker as `handler`; keep the returned callback alive as long as the linker.

    wasmtime-py's own trampoline converts every argument and result through Val objects: a
    wrapped fd_write to stdout cost about 50 µs more than WASI's own (about 20 µs) here, this one
    about 10 µs more (measured under load, a loop of one-byte writes).

    A handler never lets an exception out: EndRun becomes the trap it carries, anything else a
    trap that ends the run (and a log line), so no Python exception is ever parked in
    wasmtime-py's module-global slot, which concurrent runs would race on.
    """
    returns = bool(ty.results)

    def callback(_env: int | None, caller_pointer: Any, args: RawArgs, _count: int) -> int:
        caller = Caller(caller_pointer)
        try:
            result = handler(caller, args)
            if returns:
                args[0].i32 = result
            return 0
        except EndRun as end:
            return end.trap
        except BaseException:
            log.exception("sandbox host function %s.%s failed", module, name)
            return new_trap(f"sandbox host function {name} failed")
        finally:
            caller._invalidate()

    raw_callback = ffi.wasmtime_func_unchecked_callback_t(callback)
    module_bytes, name_bytes = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func_unchecked(
        linker.ptr(),
        ctypes.create_string_buffer(module_bytes),
        len(module_bytes),
        ctypes.create_string_buffer(name_bytes),
        len(name_bytes),
        ty.ptr(),
        raw_callback,
        None,
        _NO_FINALIZER,
    )
    if error:
        raise WasmtimeError._from_ptr(error)
    return raw_callback


class RawFunc:
    """A wasm function called from inside a host function, with raw i32/i64 values.

    `kinds` spells the parameters, "i" for i32 and "I" for i64; the function returns one i32. A
    trap or error in the callee raises EndRun, so the guest's own call ends with it (a deadline or
    fuel running out in the callee ends the run with the same trap code).
    """

    def __init__(self, func: Func, kinds: str) -> None:
        self._func = func._func  # keeps the struct alive for the byref below
        self._ref = ctypes.byref(self._func)
        self._kinds = kinds
        self._args = (ffi.wasmtime_val_raw_t * max(len(kinds), 1))()

    def __call__(self, caller: Caller, *params: int) -> int:
        args = self._args
        for index, (kind, value) in enumerate(zip(self._kinds, params, strict=True)):
            if kind == "I":
                args[index].i64 = value
            else:
                args[index].i32 = value
        return self._call(caller)

    def forward(self, caller: Caller, args: RawArgs) -> int:
        """Call with the raw arguments a host function received (same signature): one copy, no conversions."""
        ctypes.memmove(self._args, args, len(self._kinds) * _RAW_SIZE)
        return self._call(caller)

    def _call(self, caller: Caller) -> int:
        args = self._args
        trap = _TrapPointer()
        error = ffi.wasmtime_func_call_unchecked(caller._context(), self._ref, args, len(args), ctypes.byref(trap))
        if error:
            raise EndRun(new_trap(cause(WasmtimeError._from_ptr(error))))
        if trap:
            raise EndRun(ctypes.cast(trap, ctypes.c_void_p).value or 0)
        result: int = args[0].i32
        return result


class RawMemory:
    """Bounds-checked access to a wasm memory from inside a host function.

    wasmtime-py's Memory.read builds a new ctypes array type on every call (tens of µs); this
    asks for the base and size (a memory may have grown since the last call) and copies directly.
    """

    def __init__(self, memory: Memory) -> None:
        self._memory = memory._memory  # keeps the struct alive for the byref below
        self._ref = ctypes.byref(self._memory)

    def read(self, caller: Caller, ptr: int, size: int) -> bytes | None:
        """`size` bytes at `ptr` (a guest u32 address), or None when they are not all inside the memory."""
        base, length = self._span(caller)
        ptr &= 0xFFFFFFFF
        if size < 0 or ptr + size > length:
            return None
        return ctypes.string_at(base + ptr, size)

    def write(self, caller: Caller, ptr: int, data: bytes) -> bool:
        base, length = self._span(caller)
        ptr &= 0xFFFFFFFF
        if ptr + len(data) > length:
            return False
        ctypes.memmove(base + ptr, data, len(data))
        return True

    def _span(self, caller: Caller) -> tuple[int, int]:
        context = caller._context()
        base = ctypes.cast(ffi.wasmtime_memory_data(context, self._ref), ctypes.c_void_p).value or 0
        length: int = ffi.wasmtime_memory_data_size(context, self._ref)
        return base, length
