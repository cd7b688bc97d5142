"""What crosses between a solution's process and its judge's: plain data over a pipe, nothing else.

`code_tests` runs a completion's code in one sandboxed process and the dataset's tests in another
(grpokit/rewards/code.py). The tests call the solution's functions through `_grpokit_Remote`
proxies: each call sends its arguments over a pipe, the solution's process (`_grpokit_serve`)
calls the function and sends back the return value, and the tests compare what arrived. Values
cross as tagged JSON that decodes only to builtins: None, bool, int, float, str, bytes, complex,
list, tuple, dict, set, frozenset, nested as deep as `_GRPOKIT_MAX_DEPTH`. No object of the
solution's making ever reaches the tests: a subclass of a builtin (Counter, a namedtuple) crosses as
the plain value it holds, and anything else (an object with its own `__eq__` or `__bool__`, a
generator) is not plain data, so its call fails in the judge. An exception the solution raises
reaches the tests as the builtin type of that name (ValueError, KeyError, ...; never StopIteration,
which would end the tests' own loops), others as `_grpokit_RemoteError`. Whatever the
solution's process does to its own interpreter (its json, its builtins, a trace function, an early
exit) changes at most the bytes it sends, and the judge decodes those bytes itself, strictly.

Each message is an 8-byte big-endian length and that many bytes of JSON. A request is
{"n": name, "a": [args], "k": [[key, value], ...]}; a reply {"v": value} or
{"e": exception type name, "m": message}. A reply that does not decode, an oversized one, or the
end of the pipe (the solution's process exited or was killed) raises in the judge, so the case
that made the call fails.

This file is the source of both sides: code.py embeds its text in the two programs it builds, so it
imports nothing of grpokit and every name it defines starts with `_grpokit_` (the solution's own
names live in the same module). It is imported normally only by grpokit's tests.
"""

import builtins as _grpokit_builtins
import json as _grpokit_json
import os as _grpokit_os
import sys as _grpokit_sys

if hasattr(_grpokit_sys, "set_int_max_str_digits"):
    _grpokit_sys.set_int_max_str_digits(0)  # integers of any size cross as JSON numbers

_GRPOKIT_MAX_DEPTH = 100
_GRPOKIT_MAX_MESSAGE = 64 * 1024 * 1024
_GRPOKIT_TAGS = ("tuple", "dict", "set", "frozenset", "bytes", "complex", "float")


class _grpokit_NotPlainData(TypeError):
    """A value that is not plain data (or a message that is not well formed) crossed, or tried to."""


class _grpokit_RemoteError(Exception):
    """The solution raised an exception that is not a builtin exception type."""


def _grpokit_encode(value, depth=0):
    """value -> JSON-able tree; only exact builtin types (no subclasses) are plain data."""
    if depth > _GRPOKIT_MAX_DEPTH:
        raise _grpokit_NotPlainData("nested deeper than %d" % _GRPOKIT_MAX_DEPTH)
    kind = type(value)
    if value is None or kind is bool or kind is int or kind is str:
        return value
    if kind is float:
        if value != value or value in (float("inf"), float("-inf")):
            return {"$": "float", "v": repr(value)}
        return value
    if kind is list:
        return [_grpokit_encode(item, depth + 1) for item in value]
    if kind is tuple or kind is set or kind is frozenset:
        return {"$": kind.__name__, "v": [_grpokit_encode(item, depth + 1) for item in value]}
    if kind is dict:
        return {"$": "dict", "v": [[_grpokit_encode(k, depth + 1), _grpokit_encode(v, depth + 1)]
                                   for k, v in value.items()]}
    if kind is bytes:
        return {"$": "bytes", "v": value.hex()}
    if kind is complex:
        return {"$": "complex", "v": [_grpokit_encode(value.real), _grpokit_encode(value.imag)]}
    # Subclasses of builtins (Counter, defaultdict, OrderedDict, namedtuples, an int subclass) and numpy values
    # cross as the plain value they hold: whatever this side sends is only the solution's answer, and the judge
    # compares the plain data it decodes, never the solution's object.
    plain = _grpokit_base_value(value)
    if plain is not None:
        return _grpokit_encode(plain, depth + 1)
    if isinstance(value, dict):
        return _grpokit_encode(dict(dict.items(value)), depth + 1)
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return _grpokit_encode(base(base.__iter__(value)), depth + 1)
    module = getattr(kind, "__module__", "") or ""
    if module == "numpy" and callable(getattr(value, "tolist", None)):  # numpy scalars and arrays: their values
        return _grpokit_encode(value.tolist(), depth + 1)
    raise _grpokit_NotPlainData("a %s is not plain data (None, bool, int, float, str, bytes, complex, list, tuple, "
                                "dict, set)" % getattr(kind, "__qualname__", "value"))


def _grpokit_base_value(value):
    """The exact builtin a subclass of int, float, str, bytes or complex holds, read by the base type's own
    methods (never the subclass's); None for anything else."""
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bytes):
        return bytes(memoryview(value))
    if isinstance(value, complex):
        return complex(complex.real.__get__(value), complex.imag.__get__(value))
    return None


def _grpokit_decode(tree, depth=0):
    """JSON tree -> plain data, strictly: anything but what _grpokit_encode writes is refused."""
    if depth > _GRPOKIT_MAX_DEPTH + 2:
        raise _grpokit_NotPlainData("nested too deep")
    kind = type(tree)
    if tree is None or kind is bool or kind is int or kind is str or kind is float:
        return tree
    if kind is list:
        return [_grpokit_decode(item, depth + 1) for item in tree]
    if kind is not dict or set(tree) != {"$", "v"} or tree["$"] not in _GRPOKIT_TAGS:
        raise _grpokit_NotPlainData("malformed value")
    tag, body = tree["$"], tree["v"]
    try:
        if tag == "float":
            if body not in ("nan", "inf", "-inf"):
                raise _grpokit_NotPlainData("malformed float")
            return float(body)
        if tag == "bytes":
            return bytes.fromhex(body)
        if type(body) is not list:
            raise _grpokit_NotPlainData("malformed %s" % tag)
        if tag == "complex":
            real, imag = (_grpokit_decode(part, depth + 1) for part in body)
            if type(real) is not float and type(real) is not int or type(imag) is not float and type(imag) is not int:
                raise _grpokit_NotPlainData("malformed complex")
            return complex(real, imag)
        if tag == "dict":
            out = {}
            for pair in body:
                if type(pair) is not list or len(pair) != 2:
                    raise _grpokit_NotPlainData("malformed dict")
                out[_grpokit_decode(pair[0], depth + 1)] = _grpokit_decode(pair[1], depth + 1)
            return out
        items = [_grpokit_decode(item, depth + 1) for item in body]
        return {"tuple": tuple, "set": set, "frozenset": frozenset}[tag](items)
    except (TypeError, ValueError) as exc:  # unhashable set items or dict keys, bad hex, wrong arity
        if isinstance(exc, _grpokit_NotPlainData):
            raise
        raise _grpokit_NotPlainData("malformed %s: %s" % (tag, exc)) from None


def _grpokit_refuse_constant(name):
    raise _grpokit_NotPlainData("bare %s in a message" % name)


def _grpokit_dumps(tree):
    return _grpokit_json.dumps(tree, allow_nan=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def _grpokit_loads(data):
    return _grpokit_json.loads(data.decode("utf-8", "surrogatepass"), parse_constant=_grpokit_refuse_constant)


def _grpokit_send(fd, tree):
    data = _grpokit_dumps(tree)
    if len(data) > _GRPOKIT_MAX_MESSAGE:
        raise _grpokit_NotPlainData("a message of %d bytes (at most %d)" % (len(data), _GRPOKIT_MAX_MESSAGE))
    view = memoryview(len(data).to_bytes(8, "big") + data)
    while view:
        view = view[_grpokit_os.write(fd, view):]


def _grpokit_read_exactly(fd, n):
    chunks, left = [], n
    while left:
        chunk = _grpokit_os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the solution's process ended before it answered")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _grpokit_receive(fd):
    size = int.from_bytes(_grpokit_read_exactly(fd, 8), "big")
    if size > _GRPOKIT_MAX_MESSAGE:
        raise _grpokit_NotPlainData("a message of %d bytes (at most %d)" % (size, _GRPOKIT_MAX_MESSAGE))
    try:
        return _grpokit_loads(_grpokit_read_exactly(fd, size))
    except (ValueError, RecursionError) as exc:
        raise _grpokit_NotPlainData("a message that is not JSON: %s" % exc) from None


# ---------------------------------------------------------------------------------------------
# the judge's side: calls go out, plain data comes back

_GRPOKIT_EXCEPTIONS = {name: getattr(_grpokit_builtins, name) for name in (
    "ArithmeticError", "AssertionError", "AttributeError", "EOFError", "Exception", "IndexError", "KeyError",
    "LookupError", "MemoryError", "NameError", "NotImplementedError", "OverflowError", "RecursionError",
    "RuntimeError", "TypeError", "UnboundLocalError", "UnicodeError", "ValueError",
    "ZeroDivisionError")}


class _grpokit_Remote:
    """A function of the solution's, called from the judge: arguments out, plain data back."""

    __slots__ = ("_name", "_fds", "_dead")

    def __init__(self, name, fds, dead):
        self._name, self._fds, self._dead = name, fds, dead  # dead: a list shared by every proxy of one link

    def __call__(self, *args, **kwargs):
        if self._dead:
            raise EOFError("the solution's process has ended: %s" % self._dead[0])
        request = {"n": self._name, "a": [_grpokit_encode(a) for a in args],
                   "k": [[k, _grpokit_encode(v)] for k, v in kwargs.items()]}
        read_fd, write_fd = self._fds
        try:
            _grpokit_send(write_fd, request)
            reply = _grpokit_receive(read_fd)
        except (OSError, EOFError, _grpokit_NotPlainData) as exc:
            self._dead.append(str(exc))  # the stream is out of step or gone: later calls fail at once
            raise
        if type(reply) is not dict:
            self._dead.append("malformed reply")
            raise _grpokit_NotPlainData("malformed reply")
        if set(reply) == {"v"}:
            return _grpokit_decode(reply["v"])
        if set(reply) == {"e", "m"} and type(reply["e"]) is str and type(reply["m"]) is str:
            raise _GRPOKIT_EXCEPTIONS.get(reply["e"], _grpokit_RemoteError)(reply["m"][:1000])
        self._dead.append("malformed reply")
        raise _grpokit_NotPlainData("malformed reply")

    def __repr__(self):
        return "<the solution's %s>" % self._name


def _grpokit_link(channel):
    """(read_fd, write_fd) -> a function name -> its proxy; all proxies share one pipe pair."""
    dead = []
    return lambda name: _grpokit_Remote(name, tuple(channel), dead)


# ---------------------------------------------------------------------------------------------
# the solution's side: answer calls until the judge closes the pipe, then leave


def _grpokit_lookup(namespace, name):
    if name in namespace and callable(namespace[name]):
        return namespace[name]
    holder = namespace.get("Solution")  # LeetCode style: class Solution with the method
    if isinstance(holder, type) and callable(getattr(holder, name, None)):
        return getattr(holder(), name)
    raise NameError("the solution defines no function %r" % name)


def _grpokit_describe(exc):
    try:
        return type(exc).__name__, str(exc)[:1000]
    except BaseException:  # noqa: BLE001 - an exception whose __str__ fails
        return type(exc).__name__, ""


def _grpokit_serve(namespace, channel):
    read_fd, write_fd = channel
    while True:
        try:
            request = _grpokit_receive(read_fd)
        except (EOFError, OSError):
            _grpokit_os._exit(0)
        try:
            function = _grpokit_lookup(namespace, request["n"])
            args = [_grpokit_decode(a) for a in request["a"]]
            kwargs = {k: _grpokit_decode(v) for k, v in request["k"]}
            reply = {"v": _grpokit_encode(function(*args, **kwargs))}
        except BaseException as exc:  # noqa: BLE001 - the solution's failure is the judge's to see
            name, message = _grpokit_describe(exc)
            reply = {"e": name, "m": message}
        try:
            try:
                _grpokit_send(write_fd, reply)
            except (_grpokit_NotPlainData, ValueError, RecursionError) as exc:
                _grpokit_send(write_fd, {"e": "TypeError", "m": _grpokit_describe(exc)[1]})
        except OSError:
            _grpokit_os._exit(0)
