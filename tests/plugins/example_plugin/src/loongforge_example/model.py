"""A provider of its own that builds megatron-core's GPTModel with the layer spec the
``loongforge_layer_spec`` hook gives (``loongforge.model_provider.transformer_layer_spec``).
torch and megatron-core are imported when a model is built, not when the config is checked."""

from loongforge.model_provider import transformer_layer_spec


class TinyGPTProvider:
    def __init__(self, model_cfg):
        self.cfg = model_cfg

    def padded_vocab_size(self, run):
        return self.cfg["vocab_size"]

    def transformer_config(self, run):
        import torch
        from megatron.core.transformer import TransformerConfig

        c = self.cfg
        return TransformerConfig(
            num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
            num_attention_heads=c["num_attention_heads"], ffn_hidden_size=4 * c["hidden_size"],
            normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
            use_cpu_initialization=True, bias_activation_fusion=False, masked_softmax_fusion=False,
            persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False,
            gradient_accumulation_fusion=False, activation_func=torch.nn.functional.gelu,
            tensor_model_parallel_size=run.tp, pipeline_model_parallel_size=run.pp,
            pipeline_dtype=torch.float32,
        )

    def build(self, config, run, *, backend, pre_process, post_process, vp_stage=None):
        from megatron.core.models.gpt import GPTModel

        return GPTModel(config=config, transformer_layer_spec=transformer_layer_spec(config, backend, self.cfg),
                        vocab_size=self.padded_vocab_size(run), max_sequence_length=run.seq_length,
                        pre_process=pre_process, post_process=post_process, position_embedding_type="rope")
