from kvarn_jax.reference import dequantize, quantize, rotate
unrotate = rotate
