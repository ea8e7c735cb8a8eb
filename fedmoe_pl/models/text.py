"""The text model zoo: four families that read token ids (B, L), from a bag of embeddings to a small
Transformer encoder, each ending in the common representation width (64) like the CNN and MLP zoos.

- ``bag``: the mean of the texts' word embeddings (32 wide) -> Linear -> ReLU. The smallest and
  cheapest, pFedMoE's default global expert on text.
- ``textcnn``: embeddings (64) -> 1-D convolution over 3 words (128 filters) -> ReLU -> the maximum
  over the text -> Linear -> ReLU.
- ``gru``: embeddings (64) -> one GRU layer (64) -> the mean of its outputs over the words -> Linear -> ReLU.
- ``transformer``: embeddings (64) plus learned positions -> two encoder layers (4 heads, feed-forward
  128) -> the mean over the words -> Linear -> ReLU.

Id 0 pads: its embedding is zero and every mean, maximum or attention over a text leaves the
padding out (an empty text reads as its first, padding, position).
"""

from __future__ import annotations

import torch
from torch import nn

from fedmoe_pl.models.cnn import SplitModel

WIDTH = 64  # the representation width every zoo model ends in


def _mask(ids: torch.Tensor) -> torch.Tensor:
    return (ids != 0).unsqueeze(-1).float()  # (B, L, 1): 1 on words, 0 on padding


def _mean(states: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    mask = _mask(ids)
    return (states * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)


class BagExtractor(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 32) -> None:
        super().__init__()
        self.out_features = WIDTH
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.fc = nn.Sequential(nn.Linear(embed, WIDTH), nn.ReLU(inplace=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(_mean(self.embed(ids), ids))  # (B, WIDTH)


class ConvExtractor(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 64, filters: int = 128, window: int = 3) -> None:
        super().__init__()
        self.out_features = WIDTH
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.conv = nn.Conv1d(embed, filters, kernel_size=window, padding=window // 2)
        self.fc = nn.Sequential(nn.Linear(filters, WIDTH), nn.ReLU(inplace=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        maps = torch.relu(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)  # (B, L, filters)
        maps = maps * _mask(ids)  # after ReLU every map is >= 0: zeroed padding never wins the maximum
        return self.fc(maps.amax(1))  # (B, WIDTH)


class GRUExtractor(nn.Module):
    def __init__(self, vocab_size: int, embed: int = 64, hidden: int = 64) -> None:
        super().__init__()
        self.out_features = WIDTH
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.fc = nn.Sequential(nn.Linear(hidden, WIDTH), nn.ReLU(inplace=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(self.embed(ids))  # (B, L, hidden)
        return self.fc(_mean(states, ids))  # (B, WIDTH)


class TransformerExtractor(nn.Module):
    def __init__(self, vocab_size: int, seq_len: int, embed: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.out_features = WIDTH
        self.embed = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.position = nn.Parameter(torch.zeros(1, seq_len, embed))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(embed, heads, dim_feedforward=2 * embed, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fc = nn.Sequential(nn.Linear(embed, WIDTH), nn.ReLU(inplace=True))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[:, : ids.shape[1]]  # (B, L, embed)
        padding = ids == 0
        padding[:, 0] = False  # a text of padding alone would leave attention nothing to attend to
        states = self.encoder(x, src_key_padding_mask=padding)  # (B, L, embed)
        return self.fc(_mean(states, ids))  # (B, WIDTH)


class TextModel(SplitModel):
    """A text zoo member: ``extractor`` (ids -> (B, 64)) and ``head`` (-> classes)."""

    def __init__(self, extractor: nn.Module, num_classes: int) -> None:
        super().__init__(extractor, nn.Linear(WIDTH, num_classes))


def build_text_model(name: str, vocab_size: int, seq_len: int, num_classes: int) -> TextModel:
    if vocab_size < 3 or seq_len < 1:
        raise ValueError(
            f"a text model needs a vocabulary of at least 3 ids and texts of at least 1 id, got {vocab_size}, {seq_len}"
        )
    extractors = {
        "bag": lambda: BagExtractor(vocab_size),
        "textcnn": lambda: ConvExtractor(vocab_size),
        "gru": lambda: GRUExtractor(vocab_size),
        "transformer": lambda: TransformerExtractor(vocab_size, seq_len),
    }
    return TextModel(extractors[name](), num_classes)


TEXT_MODELS = ("bag", "textcnn", "gru", "transformer")
