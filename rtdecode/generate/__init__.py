"""Image generation from MindEye2 brain embeddings: SDXL unCLIP, GIT captions, SDXL refinement, blending.

Every model loads from a local folder named in the config (``[models]``); nothing is downloaded.
"""
