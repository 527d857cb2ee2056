"""Experimental attention paths, loaded only when configured.

``fa3``: FlashAttention-3 attends stage 1's kept blocks over per-row virtual contexts
(``attention_kernel: "fa3"``); the only kernels module that uses vLLM (its FA3 op, imported on
first use).
"""
