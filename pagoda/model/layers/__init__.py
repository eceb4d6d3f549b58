"""The blocks architectures are built from: norms, MLPs, attention, embeddings, linear, rope."""
