"""Model builders that are not in diffusers: the family's frozen random CLIP-L."""
