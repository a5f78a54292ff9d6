"""How much memory a recipe's GPUs have, and what one H100 computes.

`gpu_memory(cluster)` takes `cluster.gpu_memory_gib` when the recipe sets it; else the GPU named
by the node selector `nvidia.com/gpu.product` (the label NVIDIA's GPU feature discovery puts on
nodes, e.g. `NVIDIA-A100-SXM4-80GB`): a size in the label wins, else the `GPU_MEMORY_GIB` table;
else `DEFAULT_GPU_MEMORY_GIB`, said so in the plan. Sizes are the nominal ones (what the product
name says); the usable part is 1-3% less, which the plan's 10% headroom covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmjobs.config import ClusterConfig
from mmjobs.train.metrics import GPU_PEAK_BF16_FLOPS

PRODUCT_LABEL = "nvidia.com/gpu.product"
DEFAULT_GPU_MEMORY_GIB = 80.0  # an A100/H100 80GB: what the seeds' 7B recipes were run on
# Nominal memory of GPUs by a name fragment of the product label; first match wins (order).
GPU_MEMORY_GIB: tuple[tuple[str, float], ...] = (
    ("H200", 141.0), ("H100-NVL", 94.0), ("H100", 80.0), ("A100", 40.0),  # A100 without size: 40
    ("L40", 48.0), ("A6000", 48.0), ("A40", 48.0), ("L4", 24.0), ("A10G", 24.0), ("A10", 24.0),
    ("3090", 24.0), ("4090", 24.0), ("V100", 16.0), ("T4", 16.0),
)
_SIZE_IN_LABEL = re.compile(r"(\d+)\s*GB", re.IGNORECASE)
# Fraction of a GPU's memory a plan may fill and still say "fits": the rest is for the CUDA
# context, NCCL buffers, the allocator's fragmentation and what the estimate leaves out.
HEADROOM = 0.9
H100_PEAK_FLOPS = dict(GPU_PEAK_BF16_FLOPS)["H100"]  # dense bf16, SXM
PLANNING_MFU = 0.4  # a typical achieved MFU for 7B fine-tuning with flash attention


@dataclass(frozen=True)
class GpuMemory:
    """Memory per GPU in GiB and how it was decided."""

    gib: float
    source: str
    assumed: bool


def gpu_memory(cluster: ClusterConfig) -> GpuMemory:
    """Memory per GPU of the recipe's cluster (see the module docstring)."""
    if cluster.gpu_memory_gib is not None:
        return GpuMemory(cluster.gpu_memory_gib, "cluster.gpu_memory_gib", False)
    product = cluster.node_selector.get(PRODUCT_LABEL)
    if product:
        size = _SIZE_IN_LABEL.search(product)
        if size:
            return GpuMemory(float(size.group(1)), f"{PRODUCT_LABEL}={product}", False)
        for fragment, gib in GPU_MEMORY_GIB:
            if fragment.lower() in product.lower():
                return GpuMemory(gib, f"{PRODUCT_LABEL}={product} (nominal {fragment})", False)
    return GpuMemory(DEFAULT_GPU_MEMORY_GIB, "assumed: no cluster.gpu_memory_gib and no "
                     f"{PRODUCT_LABEL} node selector", True)
