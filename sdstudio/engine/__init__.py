"""The torch side: noise, conditioning, samplers, the denoiser wrapper, VAE, the txt2img pipeline."""
