"""Predictions of a trained classifier (`gptforge classify`): label and probability per text.

Legend: B texts per forward pass, T context_length, K n_labels. Texts are encoded with the run's tokenizer,
cut to their first T tokens (as in training), right-padded and scored on their last real token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.checkpoint.io import find_checkpoint, load_checkpoint, load_labels
from gptforge.errors import GptforgeError
from gptforge.finetune.source import Row, collate


@dataclass
class Prediction:
    label: str
    probability: float
    probabilities: dict[str, float]


class Classifier:
    """A loaded classification run: `predict(texts)`."""

    def __init__(self, path: str | Path, *, device: str = "cpu") -> None:
        self.model, self.config, self.tokenizer, _ = load_checkpoint(path, device=device)
        if self.config.model.n_labels <= 0:
            raise GptforgeError(f"{path} is not a classification run (model.n_labels = 0)")
        self.labels = load_labels(find_checkpoint(path))
        if len(self.labels) != self.config.model.n_labels:
            raise GptforgeError(f"{path}: labels.json names {len(self.labels)} labels but the model has "
                                f"{self.config.model.n_labels}")
        self.device = device

    @torch.no_grad()
    def probabilities(self, texts: list[str], *, batch_size: int = 32) -> torch.Tensor:
        """(len(texts), K) float32 class probabilities.

        Raises:
            GptforgeError: an empty text, or one the tokenizer cannot encode.
        """
        T, out = self.config.model.context_length, []
        for start in range(0, len(texts), batch_size):
            rows = []
            for text in texts[start:start + batch_size]:
                ids = self.tokenizer.encode(text.strip())[:T]
                if not ids:
                    raise GptforgeError("cannot classify an empty text")
                rows.append(Row(ids, [-100] * len(ids)))
            batch = collate(rows, pad_id=self.tokenizer.eot_id).to(self.device)
            logits = self.model(batch.tokens, head="classify", lengths=batch.lengths)  # (B, K)
            out.append(torch.softmax(logits.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, len(self.labels))

    def predict(self, texts: list[str]) -> list[Prediction]:
        """The most probable label of each text, with its probability and every label's."""
        probs = self.probabilities(texts)
        return [Prediction(self.labels[int(p.argmax())], float(p.max()),
                           {name: float(v) for name, v in zip(self.labels, p.tolist())}) for p in probs]
