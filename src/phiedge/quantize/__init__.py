"""phiedge's own int4: block scales (quantizer), calibration, and the quantized checkpoint (prequant)."""
