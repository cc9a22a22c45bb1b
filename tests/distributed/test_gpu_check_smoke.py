"""benchmarks/gpu_check.sh --cpu-smoke: every phase of the GPU check runs on the CPU with tiny shapes (compile with
aot_eager, FSDP2 over a one-rank gloo group, the meta-device build), so the script is known to work before a
GPU machine is lent."""

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


def test_gpu_check_cpu_smoke_runs_every_phase():
    # a generous budget so that no phase is skipped for time on a busy machine (it takes ~25 s on a quiet one)
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--budget-s", "300"],
                          capture_output=True, text=True, timeout=460)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout.split("gptforge GPU check")[-1].splitlines()[2:]
    rows = {line.split()[0]: line for line in table if line.strip()}
    assert sorted(rows) == ["1", "2", "3"], table  # eager + compiled (one key), gpt3-xl stand-in, largest fitting
    for line in table:
        assert int(line[line.index("x64") + 3:].split()[0]) >= 2, line  # at least 2 timed steps in every row
    assert sum("flash SDPA" in line for line in table) == 1 and sum("meta build" in line for line in table) == 1
