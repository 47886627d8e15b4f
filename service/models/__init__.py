"""Model runtimes (Falcon Perception detector, Gemma 4 reasoner), the model host that loads,
swaps and frees them under a memory budget, and tiny test checkpoints."""
