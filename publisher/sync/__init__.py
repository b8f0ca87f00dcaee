"""Wishlists to published images: one convert pass, the loop, webhooks, thin images, metrics."""
