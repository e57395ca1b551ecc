"""Conversation records: the schema instruction data is normalized to.

LLaVA-style data stores a sample as ``{"id", "image", "conversations": [{"from":
"human"|"gpt", "value": ...}, ...]}``; chat data as ``{"role", "content"}``
turns.  curate keeps every conversation as one column,

``conversations``: ``list<struct<role: string, content: string>>``

with roles ``system`` (optional, first), then ``user`` and ``assistant``
alternating, starting with ``user``.  Contents are kept exactly as given,
including LLaVA's ``<image>`` placeholder, so that a round trip back to LLaVA
JSON is lossless and prompts built from them (mmSSR) match the originals.

The row's ``text`` is :func:`render_text` of the turns (contents joined by a
blank line, ``<image>`` placeholders removed), so text stages (dedup,
decontamination, length filters) work on instruction data unchanged.

:func:`normalize` is strict: a malformed conversation is a ``(reason,
detail)`` pair, which readers turn into a quarantined row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

IMAGE_TOKEN = "<image>"
TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
CONVERSATION_TYPE = pa.list_(TURN_TYPE)

#: LLaVA / ShareGPT / OpenAI role names, normalized.
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
}
#: Back to LLaVA's ``from`` values.
LLAVA_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}

Turn = dict[str, str]


class ConversationError(ValueError):
    """A malformed conversation: ``reason`` is a short category, ``detail`` says where."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def normalize(raw: Any, has_image: bool) -> list[Turn]:
    """Validated ``{role, content}`` turns of one conversation.

    Raises :class:`ConversationError` when ``raw`` is not a non-empty list of
    turns, a turn lacks its role or content, a role is unknown, the roles do
    not alternate user/assistant (after an optional leading system turn), the
    last user turn has no answer, or ``<image>`` placeholders do not
    fit the sample (any without an image; more than one with one image).
    """
    if not isinstance(raw, list) or not raw:
        got = "an empty list" if isinstance(raw, list) else type(raw).__name__
        raise ConversationError("bad_conversation", f"expected a list of turns, got {got}")
    turns: list[Turn] = []
    for i, turn in enumerate(raw):
        if not isinstance(turn, dict):
            raise ConversationError("bad_turn", f"turn {i} is {type(turn).__name__}, not an object")
        role = _field(turn, i, ("from", "role"))
        content = _field(turn, i, ("value", "content"))
        if role not in ROLES:
            raise ConversationError("bad_role", f"turn {i}: unknown role {role[:40]!r}")
        turns.append({"role": ROLES[role], "content": content})
    _check_order(turns)
    placeholders = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
    if placeholders and not has_image:
        raise ConversationError("bad_conversation", f"{IMAGE_TOKEN} placeholder without an image")
    if placeholders > 1:
        raise ConversationError(
            "bad_conversation", f"{placeholders} {IMAGE_TOKEN} placeholders for one image"
        )
    return turns


def _field(turn: dict[str, Any], i: int, names: tuple[str, str]) -> str:
    present = [n for n in names if n in turn]
    if len(present) != 1:
        what = "both" if present else "neither"
        raise ConversationError("bad_turn", f"turn {i} has {what} of {names[0]!r}/{names[1]!r}")
    value = turn[present[0]]
    if not isinstance(value, str):
        raise ConversationError(
            "bad_turn", f"turn {i}: {present[0]!r} is {type(value).__name__}, not a string"
        )
    return value


def _check_order(turns: list[Turn]) -> None:
    body = turns[1:] if turns[0]["role"] == "system" else turns
    for i, turn in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            at = i + len(turns) - len(body)
            raise ConversationError(
                "bad_conversation", f"turn {at} is {turn['role']!r}, expected {expected!r}"
            )
    if not body or body[-1]["role"] != "assistant":
        raise ConversationError("bad_conversation", "the last user turn has no answer")


def render_text(turns: Sequence[Turn]) -> str:
    """The conversation as plain text: contents joined by a blank line, without
    ``<image>`` placeholders (and the newline LLaVA puts after one)."""
    parts = []
    for turn in turns:
        content = turn["content"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
        parts.append(content.strip())
    return "\n\n".join(p for p in parts if p)


def to_llava(turns: Sequence[Turn]) -> list[dict[str, str]]:
    """Turns in LLaVA's ``{"from", "value"}`` form."""
    return [{"from": LLAVA_ROLES[t["role"]], "value": t["content"]} for t in turns]


def pairs(turns: Sequence[Turn]) -> list[tuple[str, str]]:
    """(question, answer) pairs of the user/assistant turns, in order."""
    body = [t for t in turns if t["role"] != "system"]
    return [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body) - 1, 2)]
