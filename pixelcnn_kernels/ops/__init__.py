"""The public ops as ``torch.library`` custom ops (validation, backend dispatch, fake, autograd)."""
