"""The GPUs ``megatron-sega plan`` knows, by the name its ``--gpu`` takes.

Memory is what torch reports as the device's total (the marketed GB, in GiB as the driver
reports it); the bf16 peak is the dense Tensor Core figure (half the "with sparsity" one of the
data sheets: A100 312, H100 SXM 989, H200 989 TFLOP/s); the bandwidth is the HBM figure of the
SXM parts (A100 40GB 1,555 GB/s, A100 80GB 2,039 GB/s, H100 3.35 TB/s, H200 4.8 TB/s).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: int
    bf16_tflops: float
    hbm_gbps: float  # GB/s (10^9 bytes)


GPUS: dict[str, GPU] = {
    "a100-40g": GPU("A100-SXM4-40GB", 40 * 2**30, 312.0, 1555.0),
    "a100-80g": GPU("A100-SXM4-80GB", 80 * 2**30, 312.0, 2039.0),
    "h100-80g": GPU("H100-SXM5-80GB", 80 * 2**30, 989.0, 3350.0),
    "h200": GPU("H200-SXM-141GB", 141 * 10**9, 989.0, 4800.0),
}
