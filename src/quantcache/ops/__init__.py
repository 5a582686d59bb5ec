"""Pure tensor math: quantize, granularity, packing, rotation, RoPE, rounding, observers and bit counts."""
