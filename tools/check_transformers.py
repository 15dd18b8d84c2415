#!/usr/bin/env python3
"""Checks kiln's checkpoints against Hugging Face transformers both ways, with the libraries of
tools/oracle/requirements.txt installed (CI installs them in a virtual environment and runs this):

  1. a checkpoint `kiln init` writes (f32 and bf16; GPT-2's tiny preset, a Llama's llama-tiny and
     smollm2-135m) loads in transformers, and transformers' loss on a batch equals `kiln eval`'s;
  2. a checkpoint transformers' save_pretrained writes loads in kiln, with the same loss: a GPT-2,
     and Llamas with untied and tied heads, one saved in shards (model.safetensors.index.json).

Usage: python tools/check_transformers.py [path/to/kiln]   (default target/release/kiln)
"""
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

KILN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "release", "kiln")


def kiln(*args):
    r = subprocess.run([KILN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout


def kiln_loss(model_dir, batch):
    return float(kiln("eval", "--model", model_dir, "--batch", batch).split()[1])


def hf_loss(model_dir, ids):
    m = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return m(input_ids=ids, labels=ids).loss.item()


def main():
    torch.manual_seed(0)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        checks = 0
        # 1. kiln -> transformers
        for preset, vocab, dtype in [("tiny", 512, "f32"), ("tiny", 512, "bf16"), ("llama-tiny", 512, "f32"),
                                     ("llama-tiny", 512, "bf16"), ("smollm2-135m", 49152, "bf16")]:
            checks += 1
            d = os.path.join(tmp, f"kiln-{preset}-{dtype}")
            kiln("init", "--preset", preset, "--out", d, "--dtype", dtype, "--seed", "3")
            ids = torch.randint(0, vocab, (2, 24))
            batch = os.path.join(tmp, "batch.safetensors")
            save_file({"input_ids": ids}, batch)
            a, b = kiln_loss(d, batch), hf_loss(d, ids)
            ok = abs(a - b) < 1e-4 * max(1.0, abs(b)) if dtype == "f32" else abs(a - b) < 2e-2
            failures += not ok
            print(f"kiln {preset} {dtype} checkpoint in transformers: kiln loss {a:.6f}, transformers loss {b:.6f} {'ok' if ok else 'MISMATCH'}")
        # 2. transformers -> kiln
        models = {
            "gpt2": (GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=96, n_layer=3, n_head=6,
                                                activation_function="gelu_new", bos_token_id=299,
                                                eos_token_id=299)), None),
            # untied head, 8 query heads over 2 KV heads, theta 500000, saved in shards
            "llama-untied": (LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160,
                                                          num_hidden_layers=3, num_attention_heads=8,
                                                          num_key_value_heads=2, max_position_embeddings=64,
                                                          rope_theta=500000.0, tie_word_embeddings=False)), "40KB"),
            "llama-tied": (LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=96, intermediate_size=256,
                                                        num_hidden_layers=2, num_attention_heads=6,
                                                        num_key_value_heads=3, max_position_embeddings=64,
                                                        tie_word_embeddings=True)), None),
        }
        for name, (m, shard) in models.items():
            checks += 1
            d = os.path.join(tmp, f"hf-{name}")
            if shard:
                m.save_pretrained(d, safe_serialization=True, max_shard_size=shard)
            else:
                m.save_pretrained(d, safe_serialization=True)
            ids = torch.randint(0, 300, (3, 40))
            batch = os.path.join(tmp, f"batch-{name}.safetensors")
            save_file({"input_ids": ids, "labels": ids.clone()}, batch)
            a, b = kiln_loss(d, batch), hf_loss(d, ids)
            ok = abs(a - b) < 1e-4 * max(1.0, abs(b))
            failures += not ok
            print(f"transformers {name} checkpoint in kiln: kiln loss {a:.6f}, transformers loss {b:.6f} {'ok' if ok else 'MISMATCH'}")
    print(f"{checks - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
