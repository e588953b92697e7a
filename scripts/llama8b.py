"""The Llama-3-8B shape the benchmarks use: hidden 4096, 32 layers, intermediate 14336, 8 KV heads."""

HIDDEN, INTERMEDIATE, KV, LAYERS = 4096, 14336, 1024, 32


def linear_shapes(layers: int = LAYERS):
    """(name, shape) of every linear weight, in checkpoint order."""
    for layer in range(layers):
        p = f"model.layers.{layer}."
        yield p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)
        yield p + "self_attn.k_proj.weight", (KV, HIDDEN)
        yield p + "self_attn.v_proj.weight", (KV, HIDDEN)
        yield p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)
        yield p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)
        yield p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)
        yield p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)
