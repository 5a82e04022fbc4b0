"""Character tokenizer: one id per distinct character, ids assigned in sorted character order.

Invariants: `decode(encode(text)) == text` for any text made of vocabulary characters; the vocabulary is fixed at
construction (encoding an unknown character raises `UnknownCharacterError`, it is never silently dropped); a saved
tokenizer loads back with identical ids.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch


class UnknownCharacterError(ValueError):
    """A character outside the tokenizer's vocabulary."""

    def __init__(self, character: str, position: int) -> None:
        super().__init__(f"character {character!r} at position {position} is not in the vocabulary")
        self.character = character
        self.position = position


@dataclass(frozen=True)
class CharTokenizer:
    """Maps characters to ids 0..vocab_size-1 and back."""

    chars: str

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("a tokenizer needs at least one character")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("tokenizer characters must be distinct")
        object.__setattr__(self, "_ids", {c: i for i, c in enumerate(self.chars)})

    @classmethod
    def from_texts(cls, *texts: str) -> CharTokenizer:
        """The vocabulary of every character that occurs in any of `texts`, sorted."""
        return cls("".join(sorted(set().union(*(set(t) for t in texts)))))

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids."""
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of `text`."""
        ids = self._ids  # type: ignore[attr-defined]
        try:
            return [ids[c] for c in text]
        except KeyError:
            position = next(i for i, c in enumerate(text) if c not in ids)
            raise UnknownCharacterError(text[position], position) from None

    def encode_tensor(self, text: str) -> torch.Tensor:
        """`encode(text)` as a 1-D int64 tensor."""
        return torch.tensor(self.encode(text), dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The text of `ids`."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(json.dumps({"chars": self.chars}), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        """Read a vocabulary written by `save`."""
        return cls(json.loads(Path(path).read_text(encoding="utf-8"))["chars"])
