"""`phiedge bench`: llama-bench-style pp/tg records, their comparison and plots."""
