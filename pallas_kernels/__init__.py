"""Attention, grouped-matmul (MoE) and weight-only quantized matmul kernels in Pallas, each beside
its plain-JAX reference. Imports only jax."""

from pallas_kernels.attention import attention, attention_path, cached_attention
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference
from pallas_kernels.quantized_matmul import (dequantize, quantized_matmul,
                                             quantized_matmul_reference, unpack_int4)
