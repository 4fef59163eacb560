"""Integration tier: real uvicorn on port 0, real (tiny random) Hugging Face models, real clients."""
