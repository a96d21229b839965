"""The ``torch`` backend of every op family: pure PyTorch on any device, the fallback when no kernel can run."""
