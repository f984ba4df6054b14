"""The networks of the examples and benchmarks (plain nn.Modules, nothing functional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import functorch_pipeline as fp


class Net(nn.Module):
    """The classic example's network (conv 1->10 k5, conv 10->20 k5, fc 320->50->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


class WideNet(nn.Module):
    """The current pytorch/examples network (conv 32, conv 64, fc 9216->128->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout1(x).flatten(1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class TextClassifier(nn.Module):
    """Embedding -> 2-layer bidirectional LSTM -> Dropout -> Linear -> ReLU -> mean over
    time -> Linear(num_classes), with fp.nn.LSTM so per-sample gradients work."""

    def __init__(self, vocab_size: int = 5000, embed_dim: int = 64, hidden: int = 64,
                 num_classes: int = 2, dropout: float = 0.5, rnn: type[nn.Module] = fp.nn.LSTM) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.lstm = rnn(embed_dim, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(2 * hidden, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embedding(tokens))
        h = F.relu(self.fc1(self.dropout(h)))
        return self.fc2(h.mean(dim=1))


class SequenceClassifier(nn.Module):
    """An LSTM over rows of an image (sequential MNIST): 28 steps of 28 pixels, the last
    hidden state to a linear classifier."""

    def __init__(self, input_size: int = 28, hidden: int = 128, num_layers: int = 1,
                 num_classes: int = 10, rnn: type[nn.Module] = fp.nn.LSTM) -> None:
        super().__init__()
        self.lstm = rnn(input_size, hidden, num_layers=num_layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.flatten(0, -3) if x.dim() > 3 else x  # (B, 1, 28, 28) -> (B, 28, 28)
        seq = seq.reshape(x.shape[0], -1, seq.shape[-1])
        h, _ = self.lstm(seq)
        return self.fc(h[:, -1])
