"""``nn.Module`` wrappers of the ops and the fused PixelCNN layers."""
