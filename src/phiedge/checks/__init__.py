"""Checks of a built model folder: files, operators, memory budget, and numbers against transformers."""
