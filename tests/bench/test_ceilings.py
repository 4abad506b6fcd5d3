from __future__ import annotations

import pytest
import torch

from metaembed.bench import ceilings as cl


def test_roofline_is_the_larger_of_compute_and_memory_time():
    c = cl.Ceilings(device="cpu", threads=1, bandwidth_gbs=20.0, peak_gflops={"fp32": 100.0, "bf16": 500.0})
    # memory-bound: 2e9 bytes / 20 GB/s = 100 ms; 1e9 flops / 100 GFLOP/s = 10 ms
    assert c.roofline_ms(1e9, 2e9, "fp32") == pytest.approx(100.0)
    # compute-bound: 1e11 flops / 500 GFLOP/s = 200 ms
    assert c.roofline_ms(1e11, 1e6, torch.bfloat16) == pytest.approx(200.0)
    assert c.peak("float16") == 100.0  # fp16 has no CPU fast path: fp32 peak
    with pytest.raises(cl.CeilingError, match="no int8 GEMM peak"):
        c.peak("int8")
    with pytest.raises(cl.CeilingError, match="allowed: fp32, bf16, fp16, int8"):
        c.peak("fp8")


def test_measure_small_gives_positive_ceilings():
    c = cl.measure("cpu", bandwidth_bytes=1 << 22, gemm_shape=(64, 32, 32), repeats=1)
    assert c.bandwidth_gbs > 0 and c.threads == torch.get_num_threads()
    assert {"fp32", "bf16"} <= set(c.peak_gflops) and all(v > 0 for v in c.peak_gflops.values())
    assert c.roofline_ms(0, 1e6, "fp32") == pytest.approx(1e6 / (c.bandwidth_gbs * 1e9) * 1e3)


def test_bytes_per_value_and_names():
    assert [cl.bytes_per_value(d) for d in ("fp32", torch.bfloat16, "float16", "int8")] == [4, 2, 2, 1]
    with pytest.raises(cl.CeilingError):
        cl.dtype_name(torch.int64)


def test_cuda_without_cuda_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(cl.CeilingError, match="cuda"):
        cl.measure("cuda")
