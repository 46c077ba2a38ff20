"""Guards: what a trace baked in, checked before the trace answers another call.

A trace is a graph of one call. Everything the model's Python code decided during that call — a
``self.temperature`` it divided by, a flag that chose ``tanh`` over ``sigmoid``, ``Dropout.p``, a hook that was
registered, a ``getattr(self, "gradient_checkpointing", False)`` that found nothing — is frozen into it. Like
TorchDynamo's guards (``torch/_dynamo/guards.py``), jvpgraph records those reads while it traces and checks them
before it reuses the trace; a trace whose reads no longer hold is never used (the caller traces again).

What is recorded: reads of the instance attributes (and class attributes holding plain values) of every
module of the model and of the plain Python objects its modules hold (a ``config``), including reads that found
no such attribute (properties are not read again: the attributes they read are recorded); the forward hooks each module's call consulted; for a function, the simple values of its closure
cells and of the globals it names. Values are compared by value when they are numbers, strings, enums, dtypes
and containers of those (bounded), by identity otherwise (functions, hooks, objects; tensors by identity and
version). What is *not* guarded: state a forward reads through other paths (``self.__dict__[...]``, module-level
globals of nested functions, objects two levels down) — documented in ``docs/bad-input.md``.

Tracing must also leave the model as it was: :func:`watch` snapshots those objects' attributes (and the
contents of their dicts, lists and sets, two levels deep) and puts them back after the traced call, so a
forward that caches tensors in Python attributes (timm's ``attention_bias_cache``) keeps none of the trace's.

Example:
    >>> import torch, torch.nn as nn
    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.temperature = 1.0
    ...     def forward(self, x):
    ...         return x / self.temperature
    >>> m = Scaled()
    >>> with watch([m]) as rec:
    ...     _ = m(torch.ones(2))
    >>> guards = rec.guards()
    >>> guards.check() is None
    True
    >>> m.temperature = 10.0
    >>> guards.check()
    'model.temperature changed: 1.0 -> 10.0'
"""

from __future__ import annotations

import contextlib
import enum
import math
import types
import weakref
from functools import partial as functools_partial
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch.utils.module_tracker import ModuleTracker

__all__ = ["Guards", "watch", "global_state", "function_roots"]

_MISSING = object()  # an attribute that was looked up and not found
_MAX_ITEMS = 256  # containers larger than this are compared by identity

_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.memory_format,
           torch.layout, enum.Enum)
# module internals that are structure (compared through the module walk) or not part of a forward
_STRUCTURAL = frozenset({
    "__dict__", "__class__", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
    "training", "_compiled_call_impl",  # (Module.compile() runs the same forward compiled)
})


# --------------------------------------------------------------------------------------------------
# Values as guard specs
# --------------------------------------------------------------------------------------------------
def _ref(obj):
    """A reference that does not keep ``obj`` alive where Python allows (a guard must not leak the model)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda obj=obj: obj


def _spec(value, depth: int = 0):
    """What a guard compares against: ``("v", x)`` by value, ``("seq"|"map", type, items)``, ``("t", ref,
    version)`` for a tensor, ``("id", ref)`` by identity, or ``_MISSING``."""
    if value is _MISSING:
        return _MISSING
    if isinstance(value, _SIMPLE) or isinstance(value, torch.Size):
        return ("v", value)
    t = type(value)
    if depth < 3 and t in (tuple, list) and len(value) <= _MAX_ITEMS:
        return ("seq", t, tuple(_spec(v, depth + 1) for v in value))
    if depth < 3 and isinstance(value, dict) and len(value) <= _MAX_ITEMS \
            and all(isinstance(k, _SIMPLE) for k in value):
        return ("map", t, tuple((k, _spec(v, depth + 1)) for k, v in value.items()))
    if depth < 3 and t in (set, frozenset) and len(value) <= _MAX_ITEMS and all(isinstance(v, _SIMPLE) for v in value):
        return ("set", t, frozenset(value))
    if isinstance(value, torch.Tensor):
        return ("t", _ref(value), value._version)
    return ("id", _ref(value))


def _same_simple(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value whose comparison fails is not the same
        return False


def _matches(spec, value) -> bool:
    if spec is _MISSING:
        return value is _MISSING
    kind = spec[0]
    if kind == "v":
        return _same_simple(spec[1], value)
    if kind == "seq":
        return type(value) is spec[1] and len(value) == len(spec[2]) and all(
            _matches(s, v) for s, v in zip(spec[2], value))
    if kind == "map":
        if type(value) is not spec[1] or len(value) != len(spec[2]):
            return False
        for (k, s), (k2, v) in zip(spec[2], value.items()):
            if not _same_simple(k, k2) or not _matches(s, v):
                return False
        return True
    if kind == "set":
        return type(value) is spec[1] and value == spec[2]
    if kind == "t":
        return spec[1]() is value and value._version == spec[2]
    return spec[1]() is value  # "id"


def _show(spec) -> str:
    if spec is _MISSING:
        return "<not set>"
    kind = spec[0]
    if kind == "v":
        return repr(spec[1])
    if kind in ("seq", "map", "set"):
        return spec[1].__name__ + "(...)"
    obj = spec[1]()
    return f"<{type(obj).__name__} object>" if obj is not None else "<gone>"


def _show_value(value) -> str:
    if value is _MISSING:
        return "<not set>"
    if isinstance(value, _SIMPLE):
        return repr(value)
    return f"another {type(value).__name__}"


# --------------------------------------------------------------------------------------------------
# Guards
# --------------------------------------------------------------------------------------------------
class Guards:
    """The reads a trace depends on; :meth:`check` says whether they still hold.

    Each entry is ``(reference to the object, attribute name, spec, label)``; for a closure cell or a
    global the object is the cell or the globals dict. Objects are held weakly where Python allows: a guard
    never keeps the model (or anything it reads) alive, and a read from an object that is gone fails.
    """

    def __init__(self, entries: list[tuple]):
        self.entries = entries
        self._fast = _compile(entries)

    def __len__(self):
        return len(self.entries)

    def check(self) -> str | None:
        """``None`` if every read still gives what the trace saw, else why not (the first that changed).

        The hot path is one generated function of plain comparisons (about 0.1 us a read); only when it
        finds a change (or a read raises) does the step-by-step check below run, for the message."""
        try:
            if self._fast():
                return None
        except Exception:  # noqa: BLE001 - a read that raises: the slow path says which
            pass
        return self._slow_check() or "a guarded read changed"

    def _slow_check(self) -> str | None:
        for ref, name, spec, label, kind in self.entries:
            obj = ref()
            if obj is None:
                return f"{label}: the object it was read from is gone"
            if kind == "attr":
                try:
                    value = getattr(obj, name)
                except AttributeError:
                    value = _MISSING
                except Exception:  # noqa: BLE001 - a property that raises now: not what the trace saw
                    return f"{label}: reading it raises now"
            elif kind == "cell":
                try:
                    value = obj.cell_contents
                except ValueError:
                    value = _MISSING
            else:  # a global
                value = obj.get(name, _MISSING)
            if not _matches(spec, value):
                if spec is not _MISSING and spec[0] == "t" and spec[1]() is value:
                    return f"{label} was written in place (a tensor the trace holds as a constant)"
                return f"{label} changed: {_show(spec)} -> {_show_value(value)}"
        return None

    def describe(self) -> list[str]:
        """One line per guarded read: ``label == value``."""
        return [f"{label} == {_show(spec)}" for _, _, spec, label, _ in self.entries]


def _compile(entries: list[tuple]):
    """One Python function checking every entry with plain comparisons: ``True`` if all still hold.

    Entries on the same object share one dereference; a simple value is compared by type and value, an
    empty dict (most hook dicts) by type and emptiness, a tuple of simple values by value and element
    types; anything else through :func:`_matches`."""
    env: dict[str, Any] = {"M": _MISSING, "_matches": _matches, "_getattr": getattr, "_type": type,
                           "_tuple": tuple, "_map": map}
    lines = ["def check():"]
    objs: dict[int, str] = {}
    for k, (ref, name, spec, _, kind) in enumerate(entries):
        obj = ref()
        if obj is None:
            return lambda: False
        if id(obj) not in objs:
            objs[id(obj)] = o = f"o{len(objs)}"
            env[f"R{o}"] = ref
            lines += [f"    {o} = R{o}()", f"    if {o} is None: return False"]
        o = objs[id(obj)]
        if kind == "attr":
            lines.append(f"    v = _getattr({o}, {name!r}, M)")
        elif kind == "cell":
            lines.append(f"    v = {o}.cell_contents")
        else:
            lines.append(f"    v = {o}.get({name!r}, M)")
        env[f"S{k}"] = spec
        if spec is _MISSING:
            lines.append("    if v is not M: return False")
        elif spec[0] == "v" and (spec[1] is None or isinstance(spec[1], (bool, enum.Enum))):
            env[f"C{k}"] = spec[1]
            lines.append(f"    if v is not C{k}: return False")
        elif spec[0] == "v" and type(spec[1]) in (int, str, torch.dtype, torch.device) or (
                type(spec[1]) is float and not math.isnan(spec[1])):
            env[f"C{k}"], env[f"T{k}"] = spec[1], type(spec[1])
            lines.append(f"    if _type(v) is not T{k} or v != C{k}: return False")
        elif spec[0] == "map" and not spec[2]:
            env[f"T{k}"] = spec[1]
            lines.append(f"    if _type(v) is not T{k} or v: return False")
        elif spec[0] == "seq" and spec[1] is tuple and all(
                s is not _MISSING and s[0] == "v" and type(s[1]) in (int, str, bool) for s in spec[2]):
            value = tuple(s[1] for s in spec[2])
            env[f"C{k}"], env[f"TT{k}"] = value, tuple(type(x) for x in value)
            lines.append(f"    if _type(v) is not _tuple or v != C{k} or _tuple(_map(_type, v)) != TT{k}: "
                         "return False")
        else:
            lines.append(f"    if not _matches(S{k}, v): return False")
    lines.append("    return True")
    exec(compile("\n".join(lines), "<jvpgraph guards>", "exec"), env)  # noqa: S102 - our own generated code
    return env["check"]


class _Recorder:
    """The reads of one traced call (first read of each attribute, unless the call wrote it first)."""

    def __init__(self, names: dict[int, str], originals: dict[tuple[int, str], Any]):
        self.names = names  # id(obj) -> qualified name for messages
        self.originals = originals  # (id(obj), name) -> the value the caller's model has (tracing changed it)
        self.reads: dict[tuple[int, str], tuple] = {}
        self.written: set[tuple[int, str]] = set()
        self.extra: list[tuple] = []  # closure cells and globals of a traced function
        self.active = True

    def read(self, obj, name, value):
        if not self.active or name in _STRUCTURAL or (name.startswith("__") and name.endswith("__")):
            return
        if id(obj) not in self.names:
            # an object the call made from a watched one's class (``self.layers[:n]`` builds a new ModuleList
            # as ``self.__class__(...)``): it dies with the call, so its reads are nothing to guard
            return
        key = (id(obj), name)
        if key in self.reads or key in self.written:
            return
        if isinstance(value, (nn.Module, types.MethodType, types.BuiltinMethodType)) and value is not _MISSING:
            return  # submodules are structure (the walk); methods are the class's
        if isinstance(value, torch.Tensor) and isinstance(obj, nn.Module) and (
                name in obj._parameters or name in obj._buffers):
            return  # parameters and buffers are graph inputs
        if isinstance(value, torch.Tensor) and type(value).__name__ == "FakeTensor":
            return  # a value the traced call itself put there
        if key in self.originals:
            value = self.originals[key]
        label = f"{self.names.get(id(obj), type(obj).__name__)}.{name}"
        self.reads[key] = (_ref(obj), name, _spec(value), label, "attr")

    def write(self, obj, name):
        if self.active:
            self.written.add((id(obj), name))

    def guards(self) -> Guards:
        return Guards([*self.reads.values(), *self.extra])


_CURRENT: list[_Recorder] = []  # the recorder of the traced call in progress (innermost last)


def _recording_class(cls: type) -> type | None:
    """A subclass of ``cls`` with the same layout whose attribute access reports to the current recorder
    (made per traced call and dropped after it: a class cached here would keep classes that parametrization
    makes per module alive)."""
    base_getattr = getattr(cls, "__getattr__", None)

    def __getattribute__(self, name):
        value = super(sub, self).__getattribute__(name)
        if _CURRENT and not name.startswith("__"):
            try:
                d = object.__getattribute__(self, "__dict__")
            except AttributeError:
                d = {}
            if name in d or _simple_class_attribute(sub, name):
                _CURRENT[-1].read(self, name, value)
        return value

    ns: dict[str, Any] = {"__slots__": (), "__getattribute__": __getattribute__,
                          "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    if base_getattr is not None:
        def __getattr__(self, name):
            try:
                return base_getattr(self, name)
            except AttributeError:
                if _CURRENT:
                    _CURRENT[-1].read(self, name, _MISSING)
                raise
        ns["__getattr__"] = __getattr__

    def __setattr__(self, name, value):
        if _CURRENT:
            _CURRENT[-1].write(self, name)
        super(sub, self).__setattr__(name, value)

    ns["__setattr__"] = __setattr__
    try:
        sub = type(cls)(cls.__name__, (cls,), ns)
    except Exception:  # noqa: BLE001 - a class that cannot be subclassed: its reads are not recorded
        return None
    return sub


def _simple_class_attribute(cls: type, name: str) -> bool:
    """Is ``name`` a plain value of a simple type on the class (``is_causal = True``)? Properties and other
    descriptors are not guarded themselves (reading one at check time could run code with side effects,
    e.g. a parametrization's power iteration); the instance attributes they read are."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return isinstance(klass.__dict__[name], _SIMPLE)
    return False


def _plain_object(v) -> bool:
    """A Python object whose attributes a forward may read (a config), not a value, container or callable."""
    if isinstance(v, (nn.Module, torch.Tensor, type, types.ModuleType, types.FunctionType, types.MethodType,
                      types.BuiltinFunctionType, functools_partial, tuple, list, dict, set, *_SIMPLE)):
        return False
    t = type(v)
    return t.__module__ not in ("builtins", "torch") and not t.__module__.startswith("torch.") \
        and hasattr(v, "__dict__")


def _swappable_module(m: nn.Module) -> bool:
    return not isinstance(m, torch.jit.ScriptModule)  # (RecursiveScriptModule is one)


def _objects(roots: Iterable[nn.Module]) -> tuple[dict[int, Any], dict[int, str]]:
    """Every module under ``roots`` and the plain objects their attributes hold, with names for messages."""
    objs: dict[int, Any] = {}
    names: dict[int, str] = {}
    for r, root in enumerate(roots):
        for prefix, m in root.named_modules(remove_duplicate=False):
            if id(m) in objs:
                continue
            objs[id(m)] = m
            names[id(m)] = ("model" if r == 0 else f"model{r}") + (f".{prefix}" if prefix else "")
            for k, v in vars(m).items():
                if id(v) not in objs and _plain_object(v):
                    objs[id(v)] = v
                    names[id(v)] = f"{names[id(m)]}.{k}"
    return objs, names


class _Snapshot:
    """Attributes of objects, and the contents of the containers they hold (two levels), to put back."""

    def __init__(self, objs: Iterable[Any]):
        self.attrs = []
        self.containers: dict[int, tuple] = {}
        for o in objs:
            d = getattr(o, "__dict__", None)
            if d is None:
                continue
            self.attrs.append((o, dict(d)))
            for k, v in d.items():
                if k not in ("_parameters", "_buffers", "_modules"):
                    self._container(v, 0)

    def _container(self, v, depth):
        if id(v) in self.containers or depth > 1:
            return
        if isinstance(v, dict):
            self.containers[id(v)] = (v, dict(v))
            items = list(v.values())
        elif isinstance(v, list):
            self.containers[id(v)] = (v, list(v))
            items = list(v)
        elif isinstance(v, set):
            self.containers[id(v)] = (v, set(v))
            items = []
        else:
            return
        for item in items[:_MAX_ITEMS]:
            self._container(item, depth + 1)

    def restore(self):
        for c, saved in self.containers.values():
            try:
                if isinstance(c, dict):
                    if c.keys() != saved.keys() or any(c[k] is not saved[k] for k in saved):
                        c.clear()
                        c.update(saved)
                elif isinstance(c, list):
                    if len(c) != len(saved) or any(a is not b for a, b in zip(c, saved)):
                        c[:] = saved
                elif c != saved:
                    c.clear()
                    c.update(saved)
            except Exception:  # noqa: BLE001 - an immutable mapping subclass: nothing was written into it
                pass
        for o, saved in self.attrs:
            d = o.__dict__
            for k in [k for k in d if k not in saved]:
                del d[k]
            for k, v in saved.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v


@contextlib.contextmanager
def watch(roots: Iterable[nn.Module], originals: dict[tuple[int, str], Any] | None = None,
          function=None):
    """Record the reads of a traced call (see :class:`Guards`) and put the objects' attributes back after it.

    ``roots``: the modules the call may read (the model; for a function, the modules it reaches).
    ``originals``: ``{(id(obj), name): value}`` for attributes that tracing itself set for the call (a
    BatchNorm's ``training`` under ``bn="eval"``): the guard compares with the caller's value. ``function``:
    a traced function whose closure cells and globals are guarded too. Yields the recorder (``.guards()``).
    """
    roots = list(roots)
    objs, names = _objects(roots)
    rec = _Recorder(names, originals or {})
    if function is not None:
        rec.extra = _function_reads(function)
    snap = _Snapshot(objs.values())
    swapped = []
    subs: dict[type, type | None] = {}
    try:
        for o in objs.values():
            if isinstance(o, nn.Module) and not _swappable_module(o):
                continue
            cls = type(o)
            if cls not in subs:
                subs[cls] = _recording_class(cls)
            sub = subs[cls]
            if sub is None:
                continue
            try:
                object.__setattr__(o, "__class__", sub)
            except TypeError:
                continue
            swapped.append((o, cls))
        _CURRENT.append(rec)
        try:
            yield rec
        finally:
            _CURRENT.remove(rec)
            rec.active = False
    finally:
        for o, cls in swapped:
            object.__setattr__(o, "__class__", cls)
        snap.restore()


def _function_reads(f) -> list[tuple]:
    """Guards on the simple values a traced function's code reads from its closure and its globals."""
    f = getattr(f, "__func__", f)
    code = getattr(f, "__code__", None)
    if code is None:
        return []
    out = []
    qual = getattr(f, "__qualname__", "function")
    for name, cell in zip(code.co_freevars, f.__closure__ or ()):
        try:
            value = cell.cell_contents
        except ValueError:
            continue
        spec = _spec(value)
        if spec[0] in ("v", "seq", "map", "set"):
            out.append((_ref(cell), name, spec, f"{qual}: closure variable {name}", "cell"))
    g = f.__globals__
    for name in code.co_names:
        if name in g:
            spec = _spec(g[name])
            if spec[0] in ("v", "seq", "map", "set"):
                out.append((lambda g=g: g, name, spec, f"{qual}: global {name}", "global"))
    return out


def function_roots(f) -> list[nn.Module]:
    """The modules a function reaches directly: its bound ``self``, its closure cells, defaults and the
    globals its code names (best effort; these are the modules whose reads are guarded for a function)."""
    seen: dict[int, nn.Module] = {}

    def add(v):
        if isinstance(v, nn.Module):
            seen.setdefault(id(v), v)

    add(getattr(f, "__self__", None))
    fn = getattr(f, "__func__", f)
    if isinstance(fn, functools_partial):
        for a in [fn.func, *fn.args, *fn.keywords.values()]:
            add(a)
            add(getattr(a, "__self__", None))
        fn = fn.func
    code = getattr(fn, "__code__", None)
    if code is not None:
        for cell in fn.__closure__ or ():
            try:
                add(cell.cell_contents)
            except ValueError:
                pass
        for d in fn.__defaults__ or ():
            add(d)
        for name in code.co_names:
            add(fn.__globals__.get(name))
    return list(seen.values())


def global_state() -> tuple:
    """Process-wide settings a trace depends on: the default dtype and device (factory calls inside a
    forward), deterministic algorithms, and the global module hooks (computed on every call: kept cheap)."""
    hooks = tuple(tuple(k for k, h in d.items() if not _observes(h)) for d in _GLOBAL_HOOKS)
    device = _default_device() if _default_device is not None else None
    return (torch.get_default_dtype(), device, torch.are_deterministic_algorithms_enabled(), hooks)


def _observes(hook) -> bool:
    """A global module hook of ``torch.utils.module_tracker.ModuleTracker`` (``FlopCounterMode`` installs one
    per ``with`` block): it records which module runs and returns nothing, so a trace made without it holds
    with it. Any other hook may change what a forward computes, and keys the trace."""
    return isinstance(getattr(hook, "__self__", None), ModuleTracker)


_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, {}) for name in
                      ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called"))
_default_device = getattr(torch, "get_default_device", None)
