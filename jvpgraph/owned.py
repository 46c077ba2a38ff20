"""Side tables whose entries live exactly as long as the graphs that use them.

jvpgraph's custom ops (a user's ``autograd.Function`` run opaquely, PyTorch's forward-AD formula of one node)
carry Python state that a graph cannot hold as an argument: the Function's class and how to rebuild its
arguments. The graph's node holds an integer key; the state sits in an :class:`OwnedTable` under that key.

Ownership: :func:`own` puts each entry in the ``meta`` of the nodes that call it, so an entry is alive while
some graph that can call it is (copies of a graph and graphs built from its nodes share the entry) and is
freed with the last of them: a value-specialized model traced on every call does not grow the tables. Between
:meth:`OwnedTable.add` and :func:`own`, inside a :func:`collecting` block, the block holds the entry; outside any
block (a rule called by hand) an entry is kept for the process.

Example:
    >>> import torch, torch.fx as fx
    >>> from jvpgraph.owned import OwnedTable, collecting, own
    >>> table = OwnedTable("example")
    >>> @torch.library.custom_op("jvpgraph_doc::scaled", mutates_args=())
    ... def scaled(x: torch.Tensor, key: int) -> torch.Tensor:
    ...     return x * table[key]
    >>> table.bind(torch.ops.jvpgraph_doc.scaled.default, key_arg=1)
    >>> with collecting():
    ...     key = table.add(3.0)
    ...     gm = fx.symbolic_trace(lambda x: torch.ops.jvpgraph_doc.scaled.default(x, key))
    ...     own(gm.graph)
    >>> gm(torch.ones(2))
    tensor([3., 3.])
    >>> del gm
    >>> import gc; _ = gc.collect()
    >>> key in table
    False
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import weakref
from typing import Any, Iterator

__all__ = ["OwnedTable", "collecting", "own"]

_META = "jvpgraph_owned"
_BOUND: dict[Any, tuple["OwnedTable", int]] = {}  # custom op -> (its table, the position of its key argument)
# The entries added inside each active collecting() block (every block holds them, until own() hands them to the
# graph nodes that call them; the graph being run while another is recorded owns its entries already)
_COLLECTORS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("jvpgraph_owned", default=())


class _Entry:
    __slots__ = ("value", "__weakref__")

    def __init__(self, value):
        self.value = value

    def __repr__(self):  # node.meta is printed in fx's error messages
        return "<jvpgraph owned entry>"

    def __deepcopy__(self, memo):  # a copied graph shares its entries (the keys in its code are the same)
        return self

    def __copy__(self):
        return self


def _hold(entry: _Entry) -> None:
    for held in _COLLECTORS.get():
        held.append(entry)


class OwnedTable:
    """``key -> value`` for custom ops' Python state; an entry is freed when no graph holds it any more."""

    def __init__(self, name: str):
        self.name = name
        self._entries: weakref.WeakValueDictionary[int, _Entry] = weakref.WeakValueDictionary()
        self._unowned: dict[int, _Entry] = {}  # added outside any collecting() block
        self._keys = itertools.count()

    def bind(self, op, key_arg: int) -> None:
        """Declare that the custom op ``op`` (an ``OpOverload``) calls this table with its argument ``key_arg``."""
        _BOUND[op] = (self, key_arg)

    def add(self, value: Any) -> int:
        """Store ``value``; returns its key (held by the graphs recorded around this call)."""
        key, entry = next(self._keys), _Entry(value)
        self._entries[key] = entry
        if _COLLECTORS.get():
            _hold(entry)
        else:
            self._unowned[key] = entry
        return key

    def _entry(self, key: int) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"jvpgraph: {self.name} entry {key} is gone: every graph that owned it was freed, "
                           "yet a graph still calls it (a graph built without jvpgraph.owned.own: a jvpgraph bug, "
                           "please report it)")
        return entry

    def __getitem__(self, key: int) -> Any:
        return self._entry(key).value

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


@contextlib.contextmanager
def collecting() -> Iterator[list]:
    """Hold the table entries added in this block (and in any block nested in it) until the block ends."""
    held: list = []
    token = _COLLECTORS.set(_COLLECTORS.get() + (held,))
    try:
        yield held
    finally:
        _COLLECTORS.reset(token)


def own(graph) -> None:
    """Put the entry each custom-op node of ``graph`` (an ``fx.Graph``) calls in that node's ``meta``."""
    for node in graph.nodes:
        bound = _BOUND.get(node.target) if node.op == "call_function" else None
        if bound is not None:
            table, key_arg = bound
            node.meta[_META] = table._entry(node.args[key_arg])
