"""Video diffusion pieces for ConFiner (trainers/confiner.py): experts loaded from diffusers directories, the
coordinated sampler, video metrics and media files."""
