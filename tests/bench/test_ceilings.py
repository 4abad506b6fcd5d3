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


@pytest.fixture
def fake_clocks(monkeypatch):
    """Both clocks replaced by counters that tick a known amount per reading: which one a timing used shows."""
    ticks = {"thread_time": 0.0, "perf_counter": 0.0}
    steps = {"thread_time": 2.0, "perf_counter": 7.0}

    def reader(name):
        def read() -> float:
            ticks[name] += steps[name]
            return ticks[name]

        return read

    monkeypatch.setattr(cl.time, "thread_time", reader("thread_time"))
    monkeypatch.setattr(cl.time, "perf_counter", reader("perf_counter"))
    return ticks


def test_clock_for_picks_thread_cpu_only_for_one_cpu_thread():
    assert cl.clock_for("cpu", 1) == "thread_cpu"
    assert cl.clock_for("cpu", 2) == "wall"
    assert cl.clock_for("cuda", 1) == "wall"  # the host thread waits for the device
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cl.clock_for("cpu") == "thread_cpu"
    finally:
        torch.set_num_threads(threads)
    assert cl.clock_for("cpu") == ("thread_cpu" if threads == 1 else "wall")


def test_timed_reads_the_clock_it_is_given(fake_clocks):
    calls = []
    assert cl.timed(lambda: calls.append(1), "thread_cpu") == 2.0
    assert fake_clocks["perf_counter"] == 0.0
    assert cl.timed(lambda: calls.append(1), "wall") == 7.0
    assert fake_clocks["thread_time"] == 4.0 and len(calls) == 2
    assert cl.timed(lambda: None) == 7.0  # wall by default


def test_best_time_and_measure_use_the_clock_and_record_it(fake_clocks):
    assert cl.best_time(lambda: None, torch.device("cpu"), 3, "thread_cpu") == 2.0
    assert fake_clocks["perf_counter"] == 0.0
    c = cl.measure("cpu", bandwidth_bytes=1 << 20, gemm_shape=(16, 16, 16), repeats=1, clock="thread_cpu")
    assert c.clock == "thread_cpu" and c.as_dict()["clock"] == "thread_cpu"
    # 1 MiB read in 2 "seconds" of thread time: the bandwidth is computed from that clock
    assert c.bandwidth_gbs == pytest.approx((1 << 20) / 2.0 / 1e9)
    assert c.peak_gflops["bf16"] == pytest.approx(2 * 16**3 / 2.0 / 1e9)
    wall = cl.measure("cpu", bandwidth_bytes=1 << 20, gemm_shape=(16, 16, 16), repeats=1, clock="wall")
    assert wall.clock == "wall" and wall.bandwidth_gbs == pytest.approx((1 << 20) / 7.0 / 1e9)


def test_measure_defaults_to_the_clock_for_its_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cl.measure("cpu", bandwidth_bytes=1 << 20, gemm_shape=(16, 16, 16), repeats=1)
        torch.set_num_threads(2)
        two = cl.measure("cpu", bandwidth_bytes=1 << 20, gemm_shape=(16, 16, 16), repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert (one.clock, two.clock) == ("thread_cpu", "wall")
    assert cl.Ceilings(device="cpu", threads=2, bandwidth_gbs=1.0).clock == "wall"  # stored ceilings without one


def test_unknown_clock_or_thread_cpu_on_cuda_is_a_clear_error():
    with pytest.raises(cl.BenchError, match="allowed: wall, thread_cpu"):
        cl.timed(lambda: None, "cpu_time")
    with pytest.raises(cl.BenchError, match="thread_cpu cannot time work on cuda"):
        cl.timed(lambda: None, "thread_cpu", torch.device("cuda"))
