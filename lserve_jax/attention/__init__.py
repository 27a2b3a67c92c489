"""Attention dispatch: pick a kernel or reference implementation and validate shapes."""
