"""The embedded base's GGUF reader: llama.cpp's names and rotary permutation undone,
on a tiny Llama written as a GGUF here (F32, so every value must come back exactly)."""

import numpy as np
import pytest
import torch

from deltastore.embedded import EmbeddedBaseError, llama_gguf_tensors
from tests.conftest import make_model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q / k rows (HF -> GGUF)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


_TO_GGUF = {
    "embed_tokens": "token_embd",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "norm": "output_norm",
}


def _write_gguf(path, state: dict[str, torch.Tensor], n_head: int, n_kv: int, extra=()):
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    for name, t in state.items():
        w = t.detach().float().numpy().copy()
        if name == "lm_head.weight":
            gname = "output.weight"
        else:
            parts = name.removeprefix("model.").removesuffix(".weight")
            if parts.startswith("layers."):
                _, layer, module = parts.split(".", 2)
                gname = f"blk.{layer}.{_TO_GGUF[module]}.weight"
            else:
                gname = f"{_TO_GGUF[parts]}.weight"
        if gname.endswith("attn_q.weight"):
            w = _llama_cpp_permute(w, n_head)
        elif gname.endswith("attn_k.weight"):
            w = _llama_cpp_permute(w, n_kv)
        writer.add_tensor(gname, w)
    for gname, w in extra:
        writer.add_tensor(gname, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_a_llama_gguf_reads_back_as_the_transformers_weights(tmp_path):
    from gguf import GGUFReader

    model = make_model(seed=3, num_key_value_heads=2, tie_word_embeddings=False)
    cfg = model.config
    assert cfg.num_attention_heads != cfg.num_key_value_heads  # grouped-query: k differs
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    _write_gguf(tmp_path / "m.gguf", state, cfg.num_attention_heads, cfg.num_key_value_heads)
    got = llama_gguf_tensors(
        GGUFReader(tmp_path / "m.gguf"), cfg.num_attention_heads, cfg.num_key_value_heads
    )
    assert set(got) == set(state)
    for name, want in state.items():
        assert torch.equal(torch.from_numpy(got[name]), want.float()), name
    # the same rows unpermuted with the wrong head count would differ
    wrong = llama_gguf_tensors(GGUFReader(tmp_path / "m.gguf"), cfg.num_attention_heads, 1)
    k = "model.layers.0.self_attn.k_proj.weight"
    assert not torch.equal(torch.from_numpy(wrong[k]), state[k])


def test_an_unknown_tensor_is_refused(tmp_path):
    from gguf import GGUFReader

    model = make_model(seed=1)
    state = {k: v for k, v in model.state_dict().items() if "rotary" not in k}
    extra = [("blk.0.attn_qkv_bias.weight", np.zeros(4, dtype=np.float32))]
    _write_gguf(tmp_path / "m.gguf", state, 4, model.config.num_key_value_heads, extra)
    with pytest.raises(EmbeddedBaseError, match="attn_qkv_bias"):
        llama_gguf_tensors(GGUFReader(tmp_path / "m.gguf"), 4, model.config.num_key_value_heads)
