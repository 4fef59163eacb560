"""Server-held conversations: ordered items (turns) with ids, owned by a session, rendered to a prompt.

Pure: no I/O, no asyncio, no torch, no protocol frames. A msgpack
:class:`~rtws.session.Session` uses it for ``generate {conversation}``, and any
other front door (an OpenAI Realtime ``/v1/realtime`` endpoint, say) can use
the same API: items have ids, can be inserted after a given item, deleted, and
an assistant item's text can be truncated to what was actually heard.

Rendering is deterministic: the same items always give the same messages (or
text), in the same order, so turn *k*'s prompt starts with exactly turn *k-1*'s
prompt plus its reply, and a prefix cache sees the longest possible shared
prefix. Nothing is ever rewritten in place except by an explicit
:meth:`Conversation.truncate`, :meth:`Conversation.delete` or
:meth:`Conversation.drop_oldest`.

Bounds: a store holds at most ``max_conversations`` conversations and each
conversation at most ``max_items`` items (the oldest non-system ones are dropped
beyond that); the session additionally drops the oldest turns so the rendered
prompt fits the model's context (:meth:`Conversation.fit`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from .errors import RtwsError

Mode: TypeAlias = Literal["chat", "text"]
SYSTEM_ROLES = frozenset({"system", "developer"})
MAX_ID_LENGTH = 128


class ConversationError(RtwsError, ValueError):
    """A request a conversation store refuses. ``code`` is the protocol error code to answer with."""


@dataclass(slots=True)
class Item:
    """One turn. ``truncated`` marks an assistant reply cut short and kept as delivered."""

    id: str
    role: str
    content: str
    name: str | None = None
    truncated: bool = False

    def message(self) -> dict[str, str]:
        m = {"role": self.role, "content": self.content}
        if self.name:
            m["name"] = self.name
        return m


@dataclass(frozen=True, slots=True)
class NewItem:
    """An item to add (no id yet): what a client sends."""

    role: str
    content: str
    name: str | None = None


@dataclass(slots=True, eq=False)
class Conversation:
    """An ordered list of items. ``mode`` is fixed at first use: ``chat`` (messages) or ``text`` (raw prompt)."""

    id: str
    mode: Mode | None = None
    max_items: int = 1024
    items: list[Item] = field(default_factory=list)
    live: int = 0  # generations running on it now (the session enforces the limit)
    dropped: int = 0  # items dropped so far to fit the context or max_items
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ items

    def new_id(self) -> str:
        return f"item_{next(self._ids)}"

    def index(self, item_id: str) -> int:
        for i, it in enumerate(self.items):
            if it.id == item_id:
                return i
        raise ConversationError("unknown_id", f"no item {item_id[:64]!r} in conversation {self.id!r}")

    def get(self, item_id: str) -> Item:
        return self.items[self.index(item_id)]

    def add(self, role: str, content: str, *, name: str | None = None, after: str | None = None,
            item_id: str | None = None, truncated: bool = False) -> Item:
        """Append an item, or insert it right after item ``after`` (``""``: at the start). Returns it.

        ``item_id`` must be new in this conversation (default: a fresh ``item_<n>``).
        """
        if item_id is None:
            item_id = self.new_id()
        elif not 0 < len(item_id) <= MAX_ID_LENGTH:
            raise ConversationError("invalid_params", "item ids are 1 to 128 characters")
        elif any(it.id == item_id for it in self.items):
            raise ConversationError("duplicate_id", f"item {item_id[:64]!r} already exists")
        item = Item(id=item_id, role=role, content=content, name=name, truncated=truncated)
        if after is None:
            self.items.append(item)
        else:
            pos = 0 if after == "" else self.index(after) + 1
            self.items.insert(pos, item)
        self._bound()
        return item

    def extend(self, new: Iterable[NewItem]) -> list[Item]:
        return [self.add(n.role, n.content, name=n.name) for n in new]

    def delete(self, item_id: str) -> Item:
        return self.items.pop(self.index(item_id))

    def truncate(self, item_id: str, content: str) -> Item:
        """Replace an assistant item's text with ``content`` (what the user actually got) and mark it truncated."""
        item = self.get(item_id)
        if item.role != "assistant":
            raise ConversationError("invalid_params", "only assistant items can be truncated")
        item.content = content
        item.truncated = True
        return item

    def droppable(self) -> list[int]:
        """Indexes of the items :meth:`drop_oldest` may remove, oldest first (everything but system turns)."""
        return [i for i, it in enumerate(self.items) if it.role not in SYSTEM_ROLES]

    def drop_oldest(self, n: int) -> list[Item]:
        """Remove the ``n`` oldest non-system items; return them."""
        idx = set(self.droppable()[:n])
        gone = [it for i, it in enumerate(self.items) if i in idx]
        self.items = [it for i, it in enumerate(self.items) if i not in idx]
        self.dropped += len(gone)
        return gone

    def _bound(self) -> None:
        extra = len(self.items) - self.max_items
        if extra > 0:
            self.drop_oldest(extra)

    def snapshot(self) -> Conversation:
        """A copy to render elsewhere (another thread): same items, in a list of its own."""
        return Conversation(id=self.id, mode=self.mode, max_items=self.max_items, items=list(self.items),
                            dropped=self.dropped)

    # ------------------------------------------------------------------ rendering

    def messages(self, extra: Sequence[NewItem] = (), skip: int = 0) -> list[dict[str, str]]:
        """Chat messages for the items (after dropping the ``skip`` oldest non-system ones) plus ``extra``."""
        out = [it.message() for it in self._kept(skip)]
        for n in extra:
            m = {"role": n.role, "content": n.content}
            if n.name:
                m["name"] = n.name
            out.append(m)
        return out

    def text(self, extra: Sequence[NewItem] = (), skip: int = 0) -> str:
        """The raw text (``text`` mode): every item's content concatenated, then ``extra``."""
        return "".join([*(it.content for it in self._kept(skip)), *(n.content for n in extra)])

    def _kept(self, skip: int) -> list[Item]:
        if skip <= 0:
            return self.items
        drop = set(self.droppable()[:skip])
        return [it for i, it in enumerate(self.items) if i not in drop]

    def fit(self, extra: Sequence[NewItem], encode: Callable[[Conversation, Sequence[NewItem], int], list[int]],
            limit: int) -> tuple[list[int], int]:
        """Token ids for the history plus ``extra``, dropping the oldest non-system items until at most ``limit``.

        ``encode(conversation, extra, skip)`` renders and tokenizes; it may raise ``ValueError`` (too long
        for the model, template error), which counts as "does not fit". Drops go by whole leading turns:
        after a dropped item, following assistant items go too, so the history never starts mid-exchange.
        Returns ``(ids, n_dropped)`` without changing the conversation (commit with :meth:`drop_oldest`).
        Raises the last ``ValueError`` when even ``extra`` alone (plus system turns) does not encode, and
        returns the shortest prompt when it encodes but stays over ``limit``.
        """
        order = self.droppable()
        skip = 0
        last_err: ValueError | None = None
        best: tuple[list[int], int] | None = None
        while True:
            try:
                ids = encode(self, extra, skip)
            except ValueError as exc:
                last_err = exc
            else:
                best = (ids, skip)
                if len(ids) <= limit:
                    return best
            if skip >= len(order):
                if best is not None:
                    return best
                assert last_err is not None
                raise last_err
            skip += 1
            while skip < len(order) and self.items[order[skip]].role == "assistant":
                skip += 1


class ConversationStore:
    """The conversations of one session, by id. At most ``max_conversations``; ids are 1-128 characters."""

    def __init__(self, max_conversations: int = 16, max_items: int = 1024) -> None:
        self.max_conversations = max_conversations
        self.max_items = max_items
        self._by_id: dict[str, Conversation] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, cid: object) -> bool:
        return cid in self._by_id

    def ids(self) -> list[str]:
        return list(self._by_id)

    def get(self, cid: str) -> Conversation:
        conv = self._by_id.get(cid)
        if conv is None:
            raise ConversationError("unknown_conversation", f"no conversation {cid[:64]!r}")
        return conv

    def get_or_none(self, cid: str) -> Conversation | None:
        return self._by_id.get(cid)

    def get_or_create(self, cid: str) -> Conversation:
        conv = self._by_id.get(cid)
        if conv is not None:
            return conv
        if not 0 < len(cid) <= MAX_ID_LENGTH:
            raise ConversationError("invalid_params", "conversation ids are 1 to 128 characters")
        if len(self._by_id) >= self.max_conversations:
            raise ConversationError("too_many_conversations",
                                    f"at most {self.max_conversations} conversations per session; forget one")
        conv = self._by_id[cid] = Conversation(id=cid, max_items=self.max_items)
        return conv

    def forget(self, cid: str) -> Conversation:
        conv = self.get(cid)
        del self._by_id[cid]
        return conv

    def clear(self) -> None:
        self._by_id.clear()
