"""DIViTA: Dual Image and Video Transformer Architecture in JAX/Flax."""
