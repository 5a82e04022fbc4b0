"""One module per unlearning method; every method has the signature `unlearn(model, retain, forget, cfg) -> model`."""
