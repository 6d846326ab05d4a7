"""One numba compilation per distinct FFCV pipeline function in a process.

Every FFCV loader generates its pipeline's functions anew (closures over the
dataset's metadata, the crop's seed, the normalisation table) and numba compiles
each again at the loader's first batch (tests/benchmarks/test_loader_compile.py
measures a second identical loader 4x faster with this memo), paid by every pretrain (a train and an
eval loader), every extracted split and every resolution of progressive
resizing, even when the function is the one already compiled.

numba freezes a function's closure variables and globals at compilation, so two
functions with the same code, the same closure values and the same globals
compile to the same machine code. (numba freezes them at the first call, the key is taken at
``compile``: FFCV's ``generate_code`` never changes a value in between.) ``memoized_compile`` keys each generated
closure by exactly those (arrays by dtype, shape and a hash of their bytes;
other jitted functions by their own key) and hands back the dispatcher already
compiled. A value it cannot key (any object that is not a number, string,
array, tuple, module, type, ctypes pointer or function) makes it compile as FFCV
does. Functions without a closure (FFCV's leaf helpers: ``imdecode``,
``memcpy``...) are never shared: numba types a leaf per calling function, and a
leaf dispatcher reused by two callers failed with a KeyError on literal types.

Written here because neither FFCV nor numba offers it: numba's ``cache=True``
needs a function defined in a file, and FFCV's are made by ``generate_code``.
"""

from __future__ import annotations

import ctypes
import hashlib
import threading
import types

import numpy as np
from numba.core.dispatcher import Dispatcher

_DEPTH = 8  # closures of closures: FFCV's are two deep
_IDENTITY = (type, types.BuiltinFunctionType, ctypes._CFuncPtr)  # module-level objects, alive for the process
_SCALARS = (int, float, bool, complex, str, bytes, type(None))

COUNTS = {"compiled": 0, "reused": 0, "unkeyable": 0}  # this process's, for tests and the benchmark


class _UnkeyableError(Exception):
    pass


def _frozen(value, depth: int = 0):
    """A hashable stand-in equal for two values numba compiles alike, or ``_UnkeyableError``.

    Types are kept exactly (a subclass, an enum, a namedtuple is not its base), floats by their bits
    (0.0 and -0.0 compare equal), arrays by their full dtype (a structured one's fields too).
    """
    if depth > _DEPTH:
        raise _UnkeyableError
    if isinstance(value, np.ndarray):
        data = hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=16).hexdigest()
        return ("array", value.dtype, value.shape, data)
    if isinstance(value, np.generic):  # np.uint64(3) and 3 type differently in numba
        return ("numpy", value.dtype, value.tobytes())
    if isinstance(value, float | complex):
        return (type(value), repr(value), value.hex() if isinstance(value, float) else None)
    if isinstance(value, _SCALARS):
        return (type(value), value)
    if isinstance(value, tuple):
        return ("tuple", type(value), *(_frozen(v, depth + 1) for v in value))
    if isinstance(value, types.ModuleType):
        # By name: numba reads a module's attributes when it compiles, and FFCV's pipeline code reads only
        # functions and constants from modules (np, numba), which no one rebinds.
        return ("module", value.__name__)
    if isinstance(value, Dispatcher):
        return ("jit", _frozen(value.py_func, depth + 1), repr(sorted(value.targetoptions.items())))
    if isinstance(value, types.FunctionType):
        return ("function", *_function_key(value, depth + 1))
    if isinstance(value, _IDENTITY):
        return ("object", id(value))
    raise _UnkeyableError(type(value).__name__)


def _global_names(code: types.CodeType) -> set[str]:
    """Every name ``code`` and the functions defined inside it may read as a global."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _function_key(function: types.FunctionType, depth: int) -> tuple:
    cells = tuple(cell.cell_contents for cell in function.__closure__ or ())
    scope = function.__globals__
    used = tuple(sorted((name, scope[name]) for name in _global_names(function.__code__) if name in scope))
    defaults = (function.__defaults__ or (), tuple(sorted((function.__kwdefaults__ or {}).items())))
    return function.__code__, _frozen(cells, depth), _frozen(used, depth), _frozen(defaults, depth)


_MEMO: dict = {}  # key -> (dispatcher, the function it was made from: keeps every id in the key alive)
_LOCK = threading.Lock()


def memoized_compile(compile_):
    """FFCV's ``Compiler.compile`` (a classmethod), sharing the dispatcher of an identical closure."""

    def compile_once(cls, code, signature=None):
        if not getattr(code, "__closure__", None):
            return compile_.__func__(cls, code, signature)
        parallel = bool(getattr(code, "is_parallel", False)) and cls.num_threads > 1  # as FFCV decides
        try:
            key = (_frozen(code), str(signature), parallel, cls.is_enabled)
        except _UnkeyableError:
            with _LOCK:
                COUNTS["unkeyable"] += 1
            return compile_.__func__(cls, code, signature)
        with _LOCK:
            if key in _MEMO:
                COUNTS["reused"] += 1
                return _MEMO[key][0]
            COUNTS["compiled"] += 1
            _MEMO[key] = (compile_.__func__(cls, code, signature), code)
            return _MEMO[key][0]

    compile_once.original = compile_  # FFCV's, for the benchmark that compares the two
    return classmethod(compile_once)
