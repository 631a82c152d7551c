"""Configuration of a tiny LLaDA-like model, for tests (loaded as remote code)."""

from transformers import PretrainedConfig


class TinyLLaDAConfig(PretrainedConfig):
    model_type = "tiny_llada"

    def __init__(self, vocab_size=256, d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128,
                 max_sequence_length=512, rope_theta=10000.0, mask_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.mlp_hidden_size = mlp_hidden_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        if mask_token_id is not None:
            self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
