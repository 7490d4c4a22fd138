"""The model layer: FLUX.2 [klein] through diffusers; torch and diffusers live here only."""
