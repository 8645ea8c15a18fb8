"""Training: state, pure steps, losses, optimizers, the step loop."""
