"""tiny-shakespeare on disk, split into train/validation text, and split across clients by speaker.

Lookup order for `tinyshakespeare/input.txt`: the roots of `fedsparse.data.search_roots` (an explicit data root,
`$FEDSPARSE_DATA`, `../shared/data` beside the checkout).

The corpus is a sequence of speaker turns: a line ending with ':' that opens the text or follows a blank line names
the speaker; the lines after it, up to the next speaker line, are the speech. `parse_turns` cuts the text into spans that tile it exactly (every character in
exactly one turn; any text before the first speaker line is a turn of speaker ''). `partition_by_speaker` gives
every speaker, with all of their turns, to exactly one client, deterministically.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from fedsparse.data import DatasetNotFound, search_roots

SHAKESPEARE_FILE = Path("tinyshakespeare") / "input.txt"
_SPEAKER_LINE = re.compile(r"(?:\A|(?<=\n\n))([^\n:]{1,60}):\n")


def find_shakespeare(data_root: str | os.PathLike | None = None) -> Path:
    """Path of tiny-shakespeare's input.txt, first found in the data lookup order."""
    tried = []
    for root in search_roots(data_root):
        path = root / SHAKESPEARE_FILE
        if path.is_file():
            return path
        tried.append(str(path))
    raise DatasetNotFound("tiny-shakespeare not found; looked for " + ", ".join(tried))


def load_shakespeare(data_root: str | os.PathLike | None = None) -> str:
    """The whole corpus as text."""
    return find_shakespeare(data_root).read_text(encoding="utf-8")


@dataclass(frozen=True)
class TextSplit:
    """Contiguous train/validation text: train is the first `1 - val_fraction` of the corpus."""

    train: str
    val: str


def train_val_split(text: str, val_fraction: float = 0.1) -> TextSplit:
    """Cut `text` at a turn boundary (a blank line) near `(1 - val_fraction) * len(text)`."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    boundary = text.find("\n\n", cut)
    cut = cut if boundary < 0 else boundary + 2
    return TextSplit(train=text[:cut], val=text[cut:])


@dataclass(frozen=True)
class Turn:
    """One speech: `text[start:end]`, the speaker line included."""

    speaker: str
    start: int
    end: int


def parse_turns(text: str) -> list[Turn]:
    """Speaker turns tiling `text` exactly, in order."""
    matches = list(_SPEAKER_LINE.finditer(text))
    turns = []
    if not matches or matches[0].start() > 0:
        turns.append(Turn("", 0, matches[0].start() if matches else len(text)))
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        turns.append(Turn(match.group(1).strip(), match.start(), end))
    return [t for t in turns if t.end > t.start]


@dataclass(frozen=True)
class SpeakerPartition:
    """Which speakers and turns each client holds; `client_text(text, c)` is client c's training text."""

    turns: list[Turn]
    client_speakers: list[list[str]]
    client_turns: list[list[int]]  # indices into `turns`, ascending

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_speakers)

    def client_text(self, text: str, client: int) -> str:
        """The concatenated turns of `client`, in corpus order."""
        return "".join(text[self.turns[i].start:self.turns[i].end] for i in self.client_turns[client])

    def client_chars(self, client: int) -> int:
        """Characters held by `client`."""
        return sum(self.turns[i].end - self.turns[i].start for i in self.client_turns[client])


def partition_by_speaker(text: str, num_clients: int, seed: int = 0) -> SpeakerPartition:
    """Give each speaker to one client, balancing characters per client.

    Speakers are shuffled with `seed`, then sorted by character count (largest first; the shuffle only breaks
    ties), and each goes to the client holding the fewest characters so far (lowest index on ties). Same text,
    `num_clients` and `seed` -> same partition.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    turns = parse_turns(text)
    chars_by_speaker: dict[str, int] = {}
    for turn in turns:
        chars_by_speaker[turn.speaker] = chars_by_speaker.get(turn.speaker, 0) + turn.end - turn.start
    if len(chars_by_speaker) < num_clients:
        raise ValueError(f"only {len(chars_by_speaker)} speakers for {num_clients} clients")
    speakers = sorted(chars_by_speaker)
    random.Random(seed).shuffle(speakers)
    speakers.sort(key=lambda s: -chars_by_speaker[s])  # stable: shuffled order breaks ties
    load = [0] * num_clients
    owner: dict[str, int] = {}
    client_speakers: list[list[str]] = [[] for _ in range(num_clients)]
    for speaker in speakers:
        client = min(range(num_clients), key=lambda c: (load[c], c))
        owner[speaker] = client
        load[client] += chars_by_speaker[speaker]
        client_speakers[client].append(speaker)
    client_turns: list[list[int]] = [[] for _ in range(num_clients)]
    for index, turn in enumerate(turns):
        client_turns[owner[turn.speaker]].append(index)
    return SpeakerPartition(turns=turns, client_speakers=client_speakers, client_turns=client_turns)
