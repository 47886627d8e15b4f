"""Model runtimes (Falcon Perception detector, Gemma 4 reasoner), the model host that loads,
swaps and frees them under a memory budget, and tiny test checkpoints."""

from service.models.blas import install_hook

# Whichever module imports mlx first, the CPU BLAS is chosen just before (see blas.py).
install_hook()
