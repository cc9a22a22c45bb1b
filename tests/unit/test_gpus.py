"""The known-GPU table and the peak FLOP/s that MFU is computed against."""

import pytest
import torch

from gptforge.errors import GptforgeError
from gptforge.utils import gpus


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA H200", "h200"), ("NVIDIA GH200 480GB", "gh200"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA A100 80GB PCIe", "a100"), ("NVIDIA A10G", "a10g"),
    ("NVIDIA A10", "a10"), ("NVIDIA L4", "l4"), ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("h200", "h200"), ("A100", "a100"),
])
def test_device_names_match_the_right_entry(name, key):
    assert gpus.match_gpu(name).key == key


def test_unknown_and_mig_devices_are_not_matched():
    assert gpus.match_gpu("Tesla T4") is None
    assert gpus.match_gpu("NVIDIA A100-SXM4-40GB MIG 1g.5gb") is None
    with pytest.raises(GptforgeError, match="unknown GPU 'tpu'"):
        gpus.gpu_spec("tpu")
    assert gpus.gpu_spec("h100").bf16_tflops == 989.0 and gpus.gpu_spec("a100").bf16_tflops == 312.0


def test_peak_flops_for_uses_the_table_on_cuda(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert gpus.peak_flops_for(torch.device("cuda"), torch.bfloat16) == (989e12, "H100 SXM datasheet")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    monkeypatch.setattr(gpus, "measure_peak_flops", lambda device, dtype: 1.5e12)
    assert gpus.peak_flops_for(torch.device("cuda"), torch.bfloat16) == (1.5e12, "measured now")


def test_measured_peak_is_cached_per_machine_and_only_ever_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTFORGE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(gpus, "measure_peak_flops", lambda device, dtype: calls.append((device, dtype)) or 7e10)
    cpu = torch.device("cpu")
    assert gpus.peak_flops_for(cpu, torch.float32) == (7e10, "measured now")
    assert gpus.peak_flops_for(cpu, torch.float32) == (7e10, "measured on this machine earlier, cached")
    assert calls == [(cpu, torch.float32)]  # the second run did not measure
    peak = gpus.PeakFlops.for_device(cpu, torch.float32)
    assert not peak.raise_to(6e10) and peak.flops == 7e10
    assert peak.raise_to(9e10) and peak.flops == 9e10  # achieved beats the (busy-machine) peak: MFU stays <= 1
    assert gpus.peak_flops_for(cpu, torch.float32)[0] == 9e10  # and the cache remembers the better figure
    (tmp_path / gpus.PEAK_CACHE_FILE).write_text("{not json")  # a damaged cache is re-measured, not an error
    assert gpus.peak_flops_for(cpu, torch.float32) == (7e10, "measured now")
