from __future__ import annotations

from worker_node.hardware import Gpu, Hardware, detect, gpu_loads, propose_engine


def test_detects_this_cpu_machine() -> None:
    hardware = detect()
    assert hardware.gpus == ()  # no NVIDIA driver on the CI machines
    assert hardware.cpu_count >= 1
    assert hardware.memory_total_mib > 512
    assert hardware.cpu_model
    assert hardware.summary().startswith("no GPU;")
    assert hardware.advert_fields()["gpu_count"] == "0"
    assert gpu_loads() == []


def test_cpu_proposal_is_eager_bf16_with_a_bounded_context() -> None:
    proposal = propose_engine(detect())
    assert proposal.dtype == "bfloat16"
    assert proposal.enforce_eager
    assert proposal.tensor_parallel_size == 1
    assert proposal.max_model_len == 2048


def _gpus(n: int) -> Hardware:
    gpus = tuple(Gpu(i, "NVIDIA H100 80GB HBM3", 81_559) for i in range(n))
    return Hardware(gpus, "580.1", "13.0", "x", 32, 256_000)


def test_gpu_proposal_uses_the_largest_power_of_two_for_tensor_parallelism() -> None:
    assert [propose_engine(_gpus(n)).tensor_parallel_size for n in (1, 2, 3, 4, 6, 8)] == [
        1,
        2,
        2,
        4,
        4,
        8,
    ]
    proposal = propose_engine(_gpus(1))
    assert proposal.gpu_memory_utilization == 0.90
    assert not proposal.enforce_eager


def test_gpu_advert_names_the_gpu_it_prices() -> None:
    fields = _gpus(2).advert_fields()
    assert fields["gpu_model"] == "NVIDIA H100 80GB HBM3"
    assert fields["gpu_count"] == "2"
    assert fields["driver_version"] == "580.1"
    assert _gpus(2).summary() == "2x NVIDIA H100 80GB HBM3 (79 GiB), driver 580.1"
