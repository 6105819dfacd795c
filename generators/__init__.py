"""Text-to-image generators behind one interface (aMUSEd, Stable Diffusion, synthetic world). Not built yet."""
