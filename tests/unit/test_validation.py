"""Validation scores a fixed set of tokens: the same value for any micro-batch size and any world size."""

import numpy as np
import pytest
import torch

from gptforge.data.dataset import validation_windows
from gptforge.model.gpt import GPT
from gptforge.model.loss import IGNORE_INDEX
from gptforge.train.step import evaluate


def _tokens(n=1000, vocab=256, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, n).astype(np.uint16)


@pytest.mark.parametrize("max_tokens,expected_windows", [(0, 62), (160, 10), (5, 1), (10**9, 62)])
def test_windows_are_fixed_and_dealt_out_once(max_tokens, expected_windows):
    tokens = _tokens()
    T = 16  # (1000 - 1) // 16 = 62 whole windows
    for B, W in [(1, 1), (3, 1), (8, 1), (2, 2), (3, 4)]:
        starts, n_batches = [], []
        for rank in range(W):
            batches = list(validation_windows(tokens, context_length=T, micro_batch_size=B, max_tokens=max_tokens,
                                              rank=rank, world_size=W))
            n_batches.append(len(batches))
            for b in batches:
                assert b.tokens.shape == (B, T)
                for row in range(B):
                    if (b.targets[row] != IGNORE_INDEX).any():
                        starts.append(b.tokens[row].tolist())
        assert len(set(n_batches)) == 1, "every rank runs the same number of forwards"
        expected = [tokens[i * T:(i + 1) * T].tolist() for i in range(expected_windows)]
        assert sorted(starts) == sorted(expected), (B, W)


def test_val_loss_is_independent_of_micro_batch_size_and_world_size(tiny_cfg):
    model = GPT(tiny_cfg).eval()
    tokens = _tokens()
    values = {}
    for B, W in [(1, 1), (4, 1), (16, 1), (3, 2), (5, 3)]:
        # W ranks simulated in one process: each rank's sums are added, as the all-reduce does.
        total_nll, total_n = 0.0, 0
        for rank in range(W):
            sets = {"val": lambda r=rank, B=B, W=W: validation_windows(tokens, context_length=16, micro_batch_size=B,
                                                             max_tokens=0, rank=r, world_size=W)}
            nll = evaluate(model, sets, torch.device("cpu"))["val_loss"]
            n = sum(int((b.targets != IGNORE_INDEX).sum()) for b in sets["val"]())
            total_nll, total_n = total_nll + nll * n, total_n + n
        values[(B, W)] = total_nll / total_n
        assert total_n == 62 * 16
    ref = values[(1, 1)]
    assert all(abs(v - ref) < 1e-6 for v in values.values()), values
    assert 5.0 < ref < 6.0  # a random model: about ln(256) = 5.55 nats per token
