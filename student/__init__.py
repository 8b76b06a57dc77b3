"""Student side of genrecal: train a Recalibrator and a small VLM against a teacher cache."""
