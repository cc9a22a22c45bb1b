"""Tensor parallelism on CPU ranks (gloo): 2 ranks (tp 2) and 4 ranks (FSDP2 over dp 2 x tp 2, a 2-D mesh) give
the losses and gradients of one process, from the same seeded initialisation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.distributed


def run(out: Path, ranks: int) -> dict:
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)] if ranks > 1 else []
    proc = subprocess.run([sys.executable, *prefix, str(HERE / "tp_worker.py"), str(out)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return run(tmp_path_factory.mktemp("tp") / "one.pt", 1)


@pytest.mark.parametrize("ranks", [2, 4], ids=["tp2", "fsdp2xtp2"])
def test_tensor_parallel_matches_one_process(single, tmp_path, ranks):
    got = run(tmp_path / "tp.pt", ranks)
    assert len(got["losses"]) == 3 and single["losses"][0] > 5.0  # untrained: about ln(256)
    assert all(abs(a - b) < 1e-6 for a, b in zip(got["losses"], single["losses"])), (got["losses"], single["losses"])
    assert sorted(got["grads"]) == sorted(single["grads"])
    for name, grad in single["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-6, msg=name)
