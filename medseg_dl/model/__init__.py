"""Networks, losses, metrics and optimisers: `model_fn(params)` assembles them into a `ModelSpec`."""
