"""Tabular sources: the four hospitals of the UCI Heart Disease database.

Each hospital's ``processed.<site>.data`` file holds one patient per line: 13 comma-separated
features and the diagnosis ``num`` (0 no disease, 1-4 disease), ``?`` where a value was not
recorded. The hospitals differ in size, label balance and in what they recorded, which makes them
a natural non-IID federation (``data.partitioner: Natural``, one client per hospital).

Choices the data leaves to us, all documented in the README:

- **Missing values.** ``?`` is missing; so is a cholesterol or resting blood pressure of 0 (no
  living patient has either; most Swiss records carry ``chol = 0``). A missing value stays NaN
  here and becomes the training rows' mean when the data module standardizes (see
  :class:`~fedmoe_pl.data.transforms.FeatureTransform`). With ``missing_indicators`` a 0/1 column
  per feature says whether the value was missing, since which tests a hospital ran is itself
  informative.
- **Categorical codes** (chest pain type, ECG result, slope, thal) are kept as their numeric codes
  and standardized like the rest.
- **Train and test.** The files have no split: each hospital's patients are split per label, a
  ``test_fraction`` of each label to the test set, by a generator seeded with ``split_seed``. The
  split is the source's, like the official split of an image dataset, and the same in every run.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from fedmoe_pl.data.inputs import TabularInput
from fedmoe_pl.data.sources import FileSource, SourceData

log = logging.getLogger(__name__)

UCI_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
#: (file, hospital) in client order under the Natural partition.
HOSPITALS = (
    ("processed.cleveland.data", "Cleveland"),
    ("processed.hungarian.data", "Hungary"),
    ("processed.switzerland.data", "Switzerland"),
    ("processed.va.data", "Long Beach VA"),
)
FEATURES = (
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
)
ZERO_IS_MISSING = ("trestbps", "chol")  # a recorded 0 means "not measured"
FOLDER = "heart-disease"


def parse_hospital(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One hospital's file: features (N, 13) float with NaN for missing values, and ``num`` (N,) in 0-4."""
    rows, labels = [], []
    for lineno, line in enumerate(path.read_text(encoding="ascii", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        where = f"{path}:{lineno}"
        if len(fields) != len(FEATURES) + 1:
            raise ValueError(
                f"{where}: {len(fields)} comma-separated values where the UCI 'processed' format has "
                f"{len(FEATURES) + 1} (13 features and num); the file is damaged or another format: fetch it again"
            )
        bad = next((f for f in fields if f != "?" and not _is_number(f)), None)
        if bad is not None:
            raise ValueError(
                f"{where}: {bad!r} is neither a number nor '?' (missing); the file is damaged: fetch it again"
            )
        values = [math.nan if f == "?" else float(f) for f in fields]
        num = values[-1]
        if not math.isfinite(num) or num != int(num) or not 0 <= num <= 4:
            raise ValueError(f"{where}: diagnosis num={fields[-1]!r} is not one of 0-4; the file is damaged")
        rows.append(values[:-1])
        labels.append(int(num))
    if not rows:
        raise ValueError(f"{path} holds no records; the file is empty or damaged: fetch it again")
    features = np.asarray(rows, dtype=np.float64)
    for name in ZERO_IS_MISSING:
        column = features[:, FEATURES.index(name)]
        column[column == 0] = np.nan
    return features, np.asarray(labels, dtype=np.int64)


def _is_number(text: str) -> bool:
    """A finite decimal number ("nan" and "inf" parse as floats but are not values of this format)."""
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


class HeartDisease(FileSource):
    """The UCI Heart Disease database: 920 patients of four hospitals (303 Cleveland, 294 Hungary,
    123 Switzerland, 200 Long Beach VA), 13 features each.

    Args:
        root: data root; the four files are read from ``root/heart-disease/`` or from ``root``
            itself.
        download: fetch missing files from the UCI repository into ``root/heart-disease/``.
        binary: predict disease (``num > 0``) against none, as most studies do; else the five
            values of ``num``.
        missing_indicators: add a 0/1 column per feature marking a missing value (26 inputs, not 13).
        test_fraction: the share of each hospital's patients of each label held out for testing.
        split_seed: seeds the train/test split.
    """

    name, folder, url = "Heart Disease", FOLDER, UCI_URL
    files = tuple(file for file, _ in HOSPITALS)
    what = "the four processed.*.data files from the UCI repository"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        binary: bool = True,
        missing_indicators: bool = True,
        test_fraction: float = 1 / 3,
        split_seed: int = 0,
    ) -> None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"HeartDisease test_fraction={test_fraction} must lie strictly between 0 and 1")
        super().__init__(root, download)
        self.binary, self.missing_indicators = binary, missing_indicators
        self.test_fraction, self.split_seed = test_fraction, split_seed

    def load(self) -> SourceData:
        folder = self.located()
        rng = np.random.default_rng(self.split_seed)
        parts: dict[str, list[np.ndarray]] = {
            "train_x": [],
            "train_y": [],
            "train_s": [],
            "test_x": [],
            "test_y": [],
            "test_s": [],
        }
        for site, (name, _) in enumerate(HOSPITALS):
            features, num = parse_hospital(folder / name)
            labels = (num > 0).astype(np.int64) if self.binary else num
            test = np.zeros(len(labels), dtype=bool)
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                test[idx[: round(self.test_fraction * len(idx))]] = True
            for split, rows in (("train", ~test), ("test", test)):
                parts[f"{split}_x"].append(features[rows])
                parts[f"{split}_y"].append(labels[rows])
                parts[f"{split}_s"].append(np.full(int(rows.sum()), site, dtype=np.int64))
        x = {split: np.concatenate(parts[f"{split}_x"]) for split in ("train", "test")}
        if self.missing_indicators:
            x = {split: np.concatenate([rows, np.isnan(rows).astype(np.float64)], axis=1) for split, rows in x.items()}
        classes = ["no disease", "disease"] if self.binary else [f"num={k}" for k in range(5)]
        return SourceData(
            torch.from_numpy(x["train"]).float(),
            torch.from_numpy(np.concatenate(parts["train_y"])),
            torch.from_numpy(x["test"]).float(),
            torch.from_numpy(np.concatenate(parts["test_y"])),
            num_classes=len(classes),
            identity=(
                f"heart-disease|{'binary' if self.binary else 'num'}|{'indicators' if self.missing_indicators else ''}"
                f"|{self.test_fraction}|{self.split_seed}"
            ),
            classes=classes,
            inputs=TabularInput(x["train"].shape[1]),
            train_sites=np.concatenate(parts["train_s"]),
            test_sites=np.concatenate(parts["test_s"]),
            sites=[hospital for _, hospital in HOSPITALS],
        )
