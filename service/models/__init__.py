"""Model runtimes (Falcon Perception detector, Gemma 4 reasoner) and tiny test checkpoints."""
