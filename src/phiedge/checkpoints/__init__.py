"""Checkpoints: the catalog's shapes made real (synth, train), read (weights, fp32) and described."""
