"""MambaInLlama Mamba-1 hybrids (distill's `--format mambainllama --hf-code` export) under HF transformers.

No inference engine implements MambaInLlama's Mamba-1 mixer (B, C and dt come from the layer input, per-group
B/C, dt bias applied twice; docs/EXPORTS.md), so this file runs it in plain PyTorch, written from the formulas
in distill/mamba1_cpu.h (shared/research/mambainllama.md §1a). Load with
    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)
e.g. for lm-evaluation-harness: `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True`.

The model is HF's LlamaForCausalLM with the `self_attn` of every layer not in attn_layers replaced by the mixer
below, stored as `model.layers.N.mamba.*` (MambaInLlama's names). Per token u (after input_layernorm):
  z = W_z u, x = W_x u [d_xb], Bv = W_B u [d_xb], Cv = W_C u [d_inner], dt = dt_proj(dt_proj_down(u)) (with bias)
  xr = repeat_kv(x) (channel c = g*N + n reads x[(g // rep)*N + n], rep = d_inner / d_xb), xc = silu(conv(xr) + b)
  delta = softplus(dt + dt_proj.bias)          (the bias a second time, as MambaInLlama's selective_scan call)
  h[c,n] = exp(delta[c] A[c,n]) h[c,n] + delta[c] Bv[group(c)][n] xc[c],  A = -exp(A_log), group(c) = (c//N)//rep
  y[c] = (sum_n C[c//N][n] h[c,n] + D[c] xc[c]) * silu(z[c]);  out = W_out y
The scan runs in float32. Padded positions (attention_mask 0, left or right padding) are kept out of the
state. There is no recurrent cache: generation must use use_cache=False (each step reruns the sequence);
a call with a non-empty cache raises instead of computing something wrong.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM

from .configuration_mambainllama import MambaInLlamaConfig


class MambaInLlamaMamba1(nn.Module):
    def __init__(self, config, mc):
        super().__init__()
        d = config.hidden_size
        self.d_inner = mc.get("d_inner") or config.num_attention_heads * config.head_dim
        self.d_xb = mc["d_xb"]
        self.N = mc.get("d_state", (mc.get("ssm_cfg") or {}).get("d_state", 16))
        self.d_conv = mc.get("d_conv", 4)
        rank = mc.get("dt_rank", math.ceil(d / 16))
        di, dxb = self.d_inner, self.d_xb
        self.in_proj_z = nn.Linear(d, di, bias=False)
        self.in_proj_x = nn.Linear(d, dxb, bias=False)
        self.B_proj = nn.Linear(d, dxb, bias=False)
        self.C_proj = nn.Linear(d, di, bias=False)
        self.dt_proj_down = nn.Linear(d, rank, bias=False)
        self.dt_proj = nn.Linear(rank, di, bias=True)
        self.conv1d = nn.Conv1d(di, di, self.d_conv, groups=di, padding=self.d_conv - 1, bias=True)
        self.A_log = nn.Parameter(torch.zeros(di, self.N))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=False)

    def forward(self, u, mask=None):  # u [B, L, d]; mask [B, L] (1 = token) or None
        Bsz, L, _ = u.shape
        di, dxb, N = self.d_inner, self.d_xb, self.N
        rep = di // dxb
        f32 = torch.float32
        z = self.in_proj_z(u).to(f32)
        x = self.in_proj_x(u).to(f32)
        Bv = self.B_proj(u).to(f32)
        Cv = self.C_proj(u).to(f32)
        dt = self.dt_proj(self.dt_proj_down(u)).to(f32)
        m = mask.to(f32)[..., None] if mask is not None else None
        xr = x.view(Bsz, L, dxb // N, N).repeat_interleave(rep, dim=2).reshape(Bsz, L, di)
        if m is not None:
            xr = xr * m
        w, b = self.conv1d.weight.to(f32), self.conv1d.bias.to(f32)
        xc = F.silu(F.conv1d(xr.transpose(1, 2), w, b, padding=self.d_conv - 1, groups=di)[..., :L]).transpose(1, 2)
        delta = F.softplus(dt + self.dt_proj.bias.to(f32))
        if m is not None:
            xc, delta = xc * m, delta * m  # padded positions: no input, no decay
        A = -torch.exp(self.A_log.to(f32))  # [di, N]
        Bg = Bv.view(Bsz, L, dxb // N, N).repeat_interleave(rep, dim=2)  # [B, L, di/N, N]
        Cg = Cv.view(Bsz, L, di // N, N)
        h = torch.zeros(Bsz, di // N, N, N, dtype=f32, device=u.device)  # [B, group, channel-in-group, state]
        ys = []
        for t in range(L):
            dl = delta[:, t].view(Bsz, di // N, N, 1)
            h = torch.exp(dl * A.view(di // N, N, N)) * h + (dl * xc[:, t].view(Bsz, di // N, N, 1)) * Bg[:, t, :, None, :]
            ys.append((h * Cg[:, t, :, None, :]).sum(-1).reshape(Bsz, di))
        y = torch.stack(ys, 1) + self.D.to(f32) * xc
        y = y * F.silu(z)
        return self.out_proj(y.to(u.dtype))


class _MixerCall:
    """Stands in for a layer's self_attn (LlamaDecoderLayer calls it) without registering the mixer twice."""

    def __init__(self, mixer):
        self.mixer = mixer

    def __call__(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise NotImplementedError("MambaInLlama Mamba-1 under transformers has no recurrent cache: use use_cache=False")
        mask = kwargs.get("_dl_padding_mask")
        return self.mixer(hidden_states, mask), None


class MambaInLlamaForCausalLM(LlamaForCausalLM):
    config_class = MambaInLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        mc = config.mamba_config
        attn = set(mc.get("attn_layers", []))
        for i, layer in enumerate(self.model.layers):
            if i in attn:
                continue
            layer.mamba = MambaInLlamaMamba1(config, mc)
            del layer.self_attn
            layer.self_attn = _MixerCall(layer.mamba)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs["_dl_padding_mask"] = attention_mask
        if use_cache is None:
            use_cache = False
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
                               use_cache=use_cache, **kwargs)


__all__ = ["MambaInLlamaForCausalLM"]
