"""Configuration of distill's MambaInLlama Mamba-1 export for HF transformers (trust_remote_code).

config.json is the teacher's Llama config plus "mamba_config" (the contents of mamba_config.json: attn_layers,
d_inner, d_xb, ssm_cfg, ...; with d_state 16, d_conv 4 and dt_rank = ceil(d_model / 16) when absent) and an
"auto_map" naming this file and modeling_mambainllama.py. Written for distill (see docs/EXPORTS.md).
"""
from transformers import LlamaConfig


class MambaInLlamaConfig(LlamaConfig):
    def __init__(self, mamba_config=None, **kwargs):
        super().__init__(**kwargs)
        self.mamba_config = dict(mamba_config or {})


__all__ = ["MambaInLlamaConfig"]
