"""The Wan text-to-video pipeline.

Kept light on purpose: importing ``pipeline`` (or ``pipeline.params`` / ``pipeline.config``) must not
import torch, because the producer validates requests with it on machines without torch.
"""
