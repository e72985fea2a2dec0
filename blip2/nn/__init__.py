"""Building blocks with no I/O: attention, the EVA ViT, the Q-Former."""
