"""Text sources: AG News (4 classes of news), as token ids of a vocabulary built from its training split.

The distributed files are ``train.csv`` (120,000 rows) and ``test.csv`` (7,600): one item per row,
``"class","title","description"``, classes 1-4 (World, Sports, Business, Sci/Tech), fields quoted
where needed, no header (a header line, as some copies carry, is skipped). A text is its title and
description, lower-cased and cut into words (runs of letters, digits and apostrophes). The
vocabulary is the ``max_vocab - 2`` most frequent words of the training texts seen at least
``min_count`` times, most frequent first and ties in alphabetical order, so it is a pure function
of the training file; id 0 pads, id 1 stands for a word outside it. Every text becomes ``seq_len``
ids: its first ``seq_len`` words, padded with 0.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from fedmoe_pl.data.inputs import TextInput
from fedmoe_pl.data.sources import FileSource, SourceData

log = logging.getLogger(__name__)

AG_NEWS_CLASSES = ["World", "Sports", "Business", "Sci/Tech"]
AG_NEWS_URL = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv/"
FOLDER = "ag_news_csv"  # the folder the distributed archive unpacks to
PAD, UNKNOWN = 0, 1
WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """A text's words: lower-cased runs of letters, digits and apostrophes."""
    return WORD.findall(text.lower())


def read_csv(path: Path, num_classes: int) -> tuple[list[list[str]], np.ndarray]:
    """(words of each text, 0-based labels) of a file in the AG News format; bad rows are named."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if not row or (reader.line_num == 1 and not row[0].strip().isdigit()):
                    continue  # an empty line; a header ("Class Index","Title","Description" in some copies)
                if len(row) != 3 or not row[0].strip().isdigit() or not 1 <= int(row[0]) <= num_classes:
                    raise ValueError(
                        f"{where}: {row[:3]!r} is not a row of the AG News format (three fields: a class "
                        f"1-{num_classes}, the title, the description; this row has {len(row)}); the file is damaged "
                        "or another format: fetch it again"
                    )
                labels.append(int(row[0]) - 1)
                texts.append(words(f"{row[1]} {row[2]}"))
        except csv.Error as err:
            raise ValueError(f"{path}:{reader.line_num}: {err}; the file is damaged: fetch it again") from None
    if not texts:
        raise ValueError(f"{path} holds no rows; the file is empty or damaged: fetch it again")
    return texts, np.asarray(labels, dtype=np.int64)


def build_vocabulary(texts: list[list[str]], max_vocab: int, min_count: int) -> list[str]:
    """The words that get their own id (ids 2, 3, ... in this order)."""
    counts = Counter(word for text in texts for word in text)
    ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return ranked[: max_vocab - 2]


def encode(texts: list[list[str]], vocabulary: list[str], seq_len: int) -> torch.Tensor:
    """Token ids (N, seq_len): each text's first ``seq_len`` words, unknown ones 1, padded with 0."""
    index = {w: i + 2 for i, w in enumerate(vocabulary)}
    out = np.full((len(texts), seq_len), PAD, dtype=np.int64)
    for row, text in enumerate(texts):
        ids = [index.get(w, UNKNOWN) for w in text[:seq_len]]
        out[row, : len(ids)] = ids
    return torch.from_numpy(out)


class AGNews(FileSource):
    """AG News: 120,000 training and 7,600 test news items in 4 classes.

    Args:
        root: data root; ``train.csv`` and ``test.csv`` are read from ``root/ag_news_csv/`` or from
            ``root`` itself.
        download: fetch missing files into ``root/ag_news_csv/``.
        seq_len: ids per text (longer texts are cut, shorter ones padded).
        max_vocab: vocabulary size including the padding and unknown ids.
        min_count: how often a training word must occur to get its own id.
    """

    name, folder, url, files = "AG News", FOLDER, AG_NEWS_URL, ("train.csv", "test.csv")
    what = "the distributed train.csv and test.csv"

    def __init__(
        self, root: str = "data", download: bool = False, seq_len: int = 64, max_vocab: int = 20000, min_count: int = 2
    ) -> None:
        for name, value, low in (("seq_len", seq_len, 1), ("max_vocab", max_vocab, 3), ("min_count", min_count, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"AGNews {name}={value!r} must be an integer of at least {low}")
        super().__init__(root, download)
        self.seq_len, self.max_vocab, self.min_count = seq_len, max_vocab, min_count

    def load(self) -> SourceData:
        folder = self.located()
        classes = len(AG_NEWS_CLASSES)
        train_texts, train_labels = read_csv(folder / "train.csv", classes)
        test_texts, test_labels = read_csv(folder / "test.csv", classes)
        vocabulary = build_vocabulary(train_texts, self.max_vocab, self.min_count)
        digest = hashlib.sha256("\n".join(vocabulary).encode()).hexdigest()[:12]
        return SourceData(
            encode(train_texts, vocabulary, self.seq_len),
            torch.from_numpy(train_labels),
            encode(test_texts, vocabulary, self.seq_len),
            torch.from_numpy(test_labels),
            num_classes=classes,
            identity=f"agnews|{self.seq_len}|{self.max_vocab}|{self.min_count}|{digest}",
            classes=list(AG_NEWS_CLASSES),
            inputs=TextInput(vocab_size=len(vocabulary) + 2, length=self.seq_len),
        )
