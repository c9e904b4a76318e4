"""Hand-written kernels for hot paths the plain-torch ops run slowly (see cpu.py)."""
