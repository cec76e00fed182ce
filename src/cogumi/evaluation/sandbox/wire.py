"""The wire between the trusted harness and the jailed candidate: plain data with exact types, in frames.

Only these cross, each with its exact type (a subclass is not the class): None, bool, int, float (nan and
inf included, bit-exact), complex, str (lone surrogates included), bytes, list, tuple, dict, set, frozenset,
nested. Anything else the candidate produces stays in the jail and crosses as a *handle* (a number): on the
harness side a ``Remote`` that equals nothing, is neither true nor false, hashes to nothing and supports no
arithmetic -- it can only be called, have an attribute read or set, or be passed back (what MBPP's
``test_setup_code`` needs to build trees of the solution's own ``Node`` class). An iterator or generator the
candidate returns is run to the end in the jail and crosses as an iterator over its items.

Why by hand: ``pickle``/``marshal`` rebuild arbitrary objects (the attack this module exists to stop) and
plain JSON loses types (tuple vs list, int keys, nan, bytes, sets). The format is JSON arrays ``[tag,
payload]`` framed by a 4-byte big-endian length; ``decode`` trusts nothing: a malformed, oversized or
over-deep message raises ``WireError`` and never builds anything but the types above.

This file is stdlib-only: the jailed worker imports it inside the jail, the harness outside.
"""

from __future__ import annotations

import base64
import json
import math
import os
import select
import struct
import time

MAX_FRAME = 64 << 20        # bytes in one message
MAX_DEPTH = 100             # nesting of containers
MAX_ITEMS = 2_000_000       # values in one message
MAX_MESSAGE = 2000          # characters kept of an exception's message


class WireError(Exception):
    """A message that is not well-formed plain data (or too big): the sender broke the protocol."""


class Remote:
    """A value that stayed in the jail. It equals nothing and refuses every use but call / attribute access,
    which go back to the jail (see ``Harness``); ``invoke`` is set by the harness that made it."""

    __slots__ = ("_handle", "_type_name", "_invoke")

    def __init__(self, handle: int, type_name: str, invoke=None):
        object.__setattr__(self, "_handle", handle)
        object.__setattr__(self, "_type_name", type_name)
        object.__setattr__(self, "_invoke", invoke)

    def _refuse(self, *_args, **_kwargs):
        raise TypeError(f"a value of the candidate's own type {self._type_name!r} cannot be used here "
                        "(only plain data -- numbers, strings, bytes, lists, tuples, dicts, sets -- is compared)")

    def __call__(self, *args, **kwargs):
        if self._invoke is None:
            self._refuse()
        return self._invoke("call", self._handle, args, kwargs)

    def __getattr__(self, name):
        if name.startswith("__") or self._invoke is None:
            raise AttributeError(name)
        return self._invoke("getattr", self._handle, name)

    def __setattr__(self, name, value):
        if self._invoke is None:
            self._refuse()
        self._invoke("setattr", self._handle, name, value)

    def __repr__(self):
        return f"<candidate's {self._type_name} object>"

    __str__ = __repr__
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __len__ = __iter__ = __contains__ = _refuse
    __hash__ = __index__ = __int__ = __float__ = __complex__ = __getitem__ = __setitem__ = __delitem__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _refuse
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = _refuse
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __invert__ = __lshift__ = __rshift__ = _refuse
    __round__ = __trunc__ = __floor__ = __ceil__ = __format__ = __reversed__ = __enter__ = __exit__ = _refuse


# ---------------------------------------------------------------------------------------------
# values
# ---------------------------------------------------------------------------------------------

def _float(x: float):
    return x.hex() if math.isfinite(x) else repr(x)  # 'nan', 'inf', '-inf'


def encode_value(value, handle_of=None, *, limit_items: int = MAX_ITEMS):
    """``value`` as a JSON-able tagged tree. Non-plain values become ``["h", id, type name]`` through
    ``handle_of(obj) -> int`` (the jail keeps the object); without it they are an error. Iterators are
    drained into ``["g", [...]]`` (the jail's time limit bounds a generator that never ends)."""
    count = [0]

    def enc(v, depth):
        count[0] += 1
        if count[0] > limit_items:
            raise WireError(f"value too large (more than {limit_items} items)")
        if depth > MAX_DEPTH:
            raise WireError(f"value nested more than {MAX_DEPTH} deep")
        t = type(v)
        if v is None:
            return ["n"]
        if t is bool:
            return ["b", v]
        if t is int:
            return ["i", hex(v)]  # hex is exact for any size (str() is capped at 4300 digits)
        if t is float:
            return ["f", _float(v)]
        if t is complex:
            return ["c", _float(v.real), _float(v.imag)]
        if t is str:
            return ["s", v]
        if t is bytes:
            return ["y", base64.b64encode(v).decode("ascii")]
        if t in (list, tuple, set, frozenset):
            tag = {list: "l", tuple: "t", set: "S", frozenset: "F"}[t]
            return [tag, [enc(x, depth + 1) for x in list(v)]]
        if t is dict:
            return ["d", [[enc(k, depth + 1), enc(x, depth + 1)] for k, x in list(v.items())]]
        stdlib = _encode_stdlib(v, t, lambda x: enc(x, depth + 1))
        if stdlib is not None:
            return stdlib
        if handle_of is not None and _is_iterator(v):
            return ["g", [enc(x, depth + 1) for x in v]]
        if handle_of is None:
            raise WireError(f"cannot send a value of type {t.__name__!r}: only plain data crosses")
        return ["h", handle_of(v), _type_name(v)]

    return enc(value, 0)


def _encode_stdlib(v, t, enc):
    """Values of the standard library's own value types, as plain parts the other side rebuilds with its
    own classes (a subclass is not one of them: it stays a handle)."""
    import collections
    import datetime
    import decimal
    import fractions
    import re
    if t is collections.Counter:
        return ["C", [[enc(k), enc(x)] for k, x in list(v.items())]]
    if t is collections.OrderedDict:
        return ["O", [[enc(k), enc(x)] for k, x in list(v.items())]]
    if t is collections.defaultdict:
        return ["D", [[enc(k), enc(x)] for k, x in list(v.items())]]
    if t is collections.deque:
        return ["q", [enc(x) for x in list(v)], v.maxlen if type(v.maxlen) is int else None]
    if t is collections.UserList:
        return ["UL", [enc(x) for x in list(v.data)]] if type(v.data) is list else None
    if t is collections.UserDict:
        return ["UD", [[enc(k), enc(x)] for k, x in list(v.data.items())]] if type(v.data) is dict else None
    if t is collections.UserString:
        return ["US", v.data] if type(v.data) is str else None
    if t is bytearray:
        return ["ba", base64.b64encode(bytes(v)).decode("ascii")]
    if t is range:
        return ["r", hex(v.start), hex(v.stop), hex(v.step)]
    if t is fractions.Fraction:
        return ["Q", hex(v.numerator), hex(v.denominator)]
    if t is decimal.Decimal:
        return ["M", str(v)]
    if t in (datetime.date, datetime.datetime, datetime.time):
        return ["dt", t.__name__, v.isoformat()]
    if t is datetime.timedelta:
        return ["td", v.days, v.seconds, v.microseconds]
    if t in (type({}.keys()), type({}.values()), type({}.items())):
        kind = {type({}.keys()): "K", type({}.values()): "V", type({}.items()): "I"}[t]
        return [kind, [enc(x) for x in list(v)]]
    if t is re.Match:
        return ["m", enc(v.group(0)), enc(v.groups()), enc(v.span()), enc(v.groupdict())]
    if issubclass(t, tuple) and t.__bases__ == (tuple,) and type(getattr(t, "_fields", None)) is tuple:
        return ["T", t.__name__ if type(t.__name__) is str else "namedtuple",
                [f for f in t._fields if type(f) is str], [enc(x) for x in tuple.__iter__(v)]]
    if builtin_type(v):
        return ["B", v.__name__]
    return None


def builtin_type(v) -> bool:
    """A builtin *type* (``int``, ``str``, ``ValueError``) -- a value both sides may name. Never a builtin
    function: ``eval``, ``open`` or ``getattr`` sent by name would run in the harness with the tests' args."""
    import builtins
    return isinstance(v, type) and type(getattr(v, "__name__", None)) is str \
        and getattr(builtins, v.__name__, None) is v


class MatchResult:
    """A regular-expression match the candidate returned, rebuilt from its parts: true (as a match is),
    with ``group``, ``groups``, ``span``, ``start``, ``end`` and ``groupdict``; it equals only itself."""

    def __init__(self, group0, groups, span, groupdict):
        self._group0, self._groups, self._span, self._groupdict = group0, tuple(groups), tuple(span), dict(groupdict)

    def group(self, *indices):
        if not indices:
            indices = (0,)
        values = [self._group0 if i == 0 else (self._groupdict[i] if isinstance(i, str) else self._groups[i - 1])
                  for i in indices]
        return values[0] if len(values) == 1 else tuple(values)

    def __getitem__(self, index):
        return self.group(index)

    def groups(self, default=None):
        return tuple(default if g is None else g for g in self._groups)

    def groupdict(self, default=None):
        return {k: default if g is None else g for k, g in self._groupdict.items()}

    def span(self, group=0):
        if group != 0:
            raise ValueError("only the span of the whole match crossed from the candidate")
        return self._span

    def start(self, group=0):
        return self.span(group)[0]

    def end(self, group=0):
        return self.span(group)[1]

    def __bool__(self):
        return True

    def __repr__(self):
        return f"<re.Match object; span={self._span!r}, match={self._group0!r}>"


def _is_iterator(v) -> bool:
    t = type(v)
    return hasattr(t, "__next__") and hasattr(t, "__iter__") and not isinstance(v, (str, bytes))


def _type_name(v) -> str:
    try:
        name = type(v).__name__
    except BaseException:
        name = "?"
    return sanitize(str(name) if type(name) is str else "?", 80)


def decode_value(tree, remote=None, deadline: float | None = None):
    """The plain value a tagged tree describes. ``remote(handle, type_name)`` makes handles (harness side);
    without it a handle is an error (jail side: the harness sends only plain data and handles it was given).
    ``TimeoutError`` when ``deadline`` (``time.monotonic()``) passes while decoding a huge value."""
    count = [0]

    def fail(why):
        raise WireError(why)

    def num(text):
        if type(text) is not str or len(text) > 100_000:
            fail("bad number")
        return text

    def to_float(text):
        try:
            return float.fromhex(num(text)) if text not in ("nan", "inf", "-inf") else float(text)
        except (ValueError, OverflowError):
            fail("bad float")

    def dec(node, depth):
        count[0] += 1
        if count[0] > MAX_ITEMS:
            fail("message has too many values")
        if deadline is not None and count[0] % 4096 == 0 and time.monotonic() > deadline:
            raise TimeoutError("the time limit passed while reading the candidate's value")
        if depth > MAX_DEPTH:
            fail("message nested too deeply")
        if type(node) is not list or not node or type(node[0]) is not str:
            fail("not a tagged value")
        tag, args = node[0], node[1:]
        if tag == "n" and not args:
            return None
        if tag == "b" and len(args) == 1 and type(args[0]) is bool:
            return args[0]
        if tag == "i" and len(args) == 1:
            try:
                return int(num(args[0]), 16)
            except ValueError:
                fail("bad int")
        if tag == "f" and len(args) == 1:
            return to_float(args[0])
        if tag == "c" and len(args) == 2:
            return complex(to_float(args[0]), to_float(args[1]))
        if tag == "s" and len(args) == 1 and type(args[0]) is str:
            return args[0]
        if tag == "y" and len(args) == 1 and type(args[0]) is str:
            try:
                return base64.b64decode(args[0].encode("ascii"), validate=True)
            except (ValueError, UnicodeEncodeError):
                fail("bad bytes")
        if tag in ("l", "t", "S", "F", "g") and len(args) == 1 and type(args[0]) is list:
            items = [dec(x, depth + 1) for x in args[0]]
            if tag == "l":
                return items
            if tag == "t":
                return tuple(items)
            if tag == "g":
                return iter(items)
            try:
                return set(items) if tag == "S" else frozenset(items)
            except TypeError:
                fail("unhashable set element")
        if tag == "d" and len(args) == 1 and type(args[0]) is list:
            out = {}
            for pair in args[0]:
                if type(pair) is not list or len(pair) != 2:
                    fail("bad dict entry")
                key = dec(pair[0], depth + 1)
                try:
                    out[key] = dec(pair[1], depth + 1)
                except TypeError:
                    fail("unhashable dict key")
            return out
        if tag in STDLIB_TAGS:
            return _decode_stdlib(tag, args, lambda x: dec(x, depth + 1), fail, to_float, num)
        if tag == "h" and len(args) == 2 and type(args[0]) is int and type(args[1]) is str and remote is not None:
            return remote(args[0], sanitize(args[1], 80))
        fail(f"unknown tag {tag[:10]!r}")

    return dec(tree, 0)


MAX_FIELDS = 256


def _plain_identifier(name: str) -> bool:
    import keyword
    return 0 < len(name) <= 64 and name.isascii() and name.isidentifier() and not keyword.iskeyword(name) \
        and not name.startswith("_")


_NAMEDTUPLES: dict = {}


def _namedtuple(typename: str, fields: tuple):
    import collections
    key = (typename, fields)
    if key not in _NAMEDTUPLES:
        _NAMEDTUPLES[key] = collections.namedtuple(typename, fields)
    return _NAMEDTUPLES[key]


STDLIB_TAGS = {"C", "O", "D", "q", "UL", "UD", "US", "ba", "r", "Q", "M", "dt", "td", "K", "V", "I", "m", "T", "B"}


def _decode_stdlib(tag, args, dec, fail, to_float, num):
    """Rebuild a standard-library value from plain parts, with this process's own classes."""
    import builtins
    import collections
    import datetime
    import decimal
    import fractions

    def items(node):
        if type(node) is not list:
            fail("bad container")
        return [dec(x) for x in node]

    def pairs(node):
        if type(node) is not list or any(type(p) is not list or len(p) != 2 for p in node):
            fail("bad mapping")
        try:
            return {dec(k): dec(x) for k, x in node}
        except TypeError:
            fail("unhashable key")

    def integer(text):
        try:
            return int(num(text), 16)
        except ValueError:
            fail("bad int")

    try:
        if tag == "C" and len(args) == 1:
            return collections.Counter(pairs(args[0]))
        if tag == "O" and len(args) == 1:
            return collections.OrderedDict(pairs(args[0]))
        if tag == "D" and len(args) == 1:
            return collections.defaultdict(None, pairs(args[0]))
        if tag == "q" and len(args) == 2 and (args[1] is None or type(args[1]) is int):
            return collections.deque(items(args[0]), args[1])
        if tag == "UL" and len(args) == 1:
            return collections.UserList(items(args[0]))
        if tag == "UD" and len(args) == 1:
            return collections.UserDict(pairs(args[0]))
        if tag == "US" and len(args) == 1 and type(args[0]) is str:
            return collections.UserString(args[0])
        if tag == "ba" and len(args) == 1 and type(args[0]) is str:
            return bytearray(base64.b64decode(args[0].encode("ascii"), validate=True))
        if tag == "r" and len(args) == 3:
            return range(integer(args[0]), integer(args[1]), integer(args[2]))
        if tag == "Q" and len(args) == 2:
            return fractions.Fraction(integer(args[0]), integer(args[1]))
        if tag == "M" and len(args) == 1 and type(args[0]) is str and len(args[0]) < 10_000:
            return decimal.Decimal(args[0])
        if tag == "dt" and len(args) == 2 and args[0] in ("date", "datetime", "time") and type(args[1]) is str:
            return getattr(datetime, args[0]).fromisoformat(args[1][:100])
        if tag == "td" and len(args) == 3 and all(type(a) is int for a in args):
            return datetime.timedelta(days=args[0], seconds=args[1], microseconds=args[2])
        if tag in ("K", "V", "I") and len(args) == 1:
            values = items(args[0])
            if tag == "K":
                return dict.fromkeys(values).keys()
            if tag == "V":
                return dict(enumerate(values)).values()
            if any(type(p) is not tuple or len(p) != 2 for p in values):
                fail("bad dict items")
            return dict(values).items()
        if tag == "m" and len(args) == 4:
            group0, groups, span, groupdict = (dec(a) for a in args)
            if not (type(groups) is tuple and type(span) is tuple and type(groupdict) is dict):
                fail("bad match")
            return MatchResult(group0, groups, span, groupdict)
        if tag == "T" and len(args) == 3 and type(args[0]) is str and type(args[1]) is list:
            names = [args[0], *args[1]]
            if len(names) > MAX_FIELDS or not all(type(n) is str and _plain_identifier(n) for n in names):
                fail("bad namedtuple")
            return _namedtuple(args[0], tuple(args[1]))(*items(args[2]))
        if tag == "B" and len(args) == 1 and type(args[0]) is str:
            value = getattr(builtins, args[0], None)
            if builtin_type(value):
                return value
    except WireError:
        raise
    except Exception:  # noqa: BLE001 -- whatever a constructor objects to, the sender broke the protocol
        fail(f"bad {tag} value")
    fail(f"bad {tag} value")


def sanitize(text: str, limit: int = MAX_MESSAGE) -> str:
    """Printable, length-capped text for messages that came out of the jail (lone surrogates, NULs and
    control characters escaped)."""
    if type(text) is not str:
        text = "<not text>"
    text = text[: limit * 4]
    out = "".join(c if (c.isprintable() or c in "\n\t") and not 0xD800 <= ord(c) <= 0xDFFF
                  else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text)
    return out if len(out) <= limit else out[: limit - 15] + " ...[truncated]"


# ---------------------------------------------------------------------------------------------
# frames
# ---------------------------------------------------------------------------------------------

def send(fd: int, message: dict) -> None:
    data = json.dumps(message, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")
    if len(data) > MAX_FRAME:
        raise WireError(f"message of {len(data)} bytes is over the {MAX_FRAME}-byte limit")
    _write_all(fd, struct.pack(">I", len(data)) + data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def receive(fd: int, deadline: float | None = None) -> dict | None:
    """The next message, or None at end of stream. Raises ``WireError`` on a malformed frame and
    ``TimeoutError`` when ``deadline`` (``time.monotonic()``) passes first."""
    head = _read_exact(fd, 4, deadline)
    if head is None:
        return None
    (size,) = struct.unpack(">I", head)
    if size > MAX_FRAME:
        raise WireError(f"frame of {size} bytes announced (limit {MAX_FRAME})")
    body = _read_exact(fd, size, deadline)
    if body is None:
        raise WireError("stream ended inside a frame")
    try:
        message = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise WireError("frame is not ASCII JSON") from None
    if type(message) is not dict:
        raise WireError("frame is not a JSON object")
    return message


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            _wait_readable(fd, deadline)
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise WireError("stream ended inside a frame")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _wait_readable(fd: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no answer before the deadline")
        if poller.poll(max(1, int(left * 1000))):
            return
