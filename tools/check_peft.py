#!/usr/bin/env python3
"""Checks that a LoRA adapter trained by `kiln finetune --method lora` (or qlora) loads in PEFT and
gives the same loss as kiln, on a GPT-2 and on a Llama (the seed's seven targets with rsLoRA, and
QLoRA), with the libraries of tools/oracle/requirements.txt installed (CI installs them in a
virtual environment and runs this).

Usage: python tools/check_peft.py [path/to/kiln]   (default target/release/kiln)
"""
import json
import os
import random
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

KILN = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target", "release", "kiln")


def kiln(*args):
    r = subprocess.run([KILN, *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def main():
    rng = random.Random(0)
    words = ["red", "blue", "cat", "dog", "one", "two", "three", "river", "hill", "tree"]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus.txt")
        with open(corpus, "w") as f:
            for _ in range(3000):
                f.write(" ".join(rng.choice(words) for _ in range(12)) + "\n")
        tokenizer = os.path.join(tmp, "tokenizer.json")
        kiln("tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--out", tokenizer)
        bases = {}
        for preset in ["tiny", "llama-tiny"]:
            bases[preset] = os.path.join(tmp, "base-" + preset)
            kiln("init", "--preset", preset, "--out", bases[preset])
            with open(tokenizer) as src, open(os.path.join(bases[preset], "tokenizer.json"), "w") as dst:
                dst.write(src.read())
        task = os.path.join(tmp, "task.jsonl")
        with open(task, "w") as f:
            for _ in range(200):
                a, b = rng.choice(words), rng.choice(words)
                f.write(json.dumps({"prompt": f"{a} {b} ->", "completion": f" {b} {a}"}) + "\n")
        ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(0))
        batch = os.path.join(tmp, "batch.safetensors")
        save_file({"input_ids": ids}, batch)
        results = []
        runs = [
            # GPT-2: the default targets (the Conv1D layers), and the token embedding + tied output layer
            ("tiny", "c_attn,c_proj,c_fc", ["--method", "lora"]),
            ("tiny", "wte,lm_head,c_attn", ["--method", "lora", "--targets", "wte,lm_head,c_attn"]),
            # Llama: the default targets (the seven linear layers) with rsLoRA, as QLoRA on an NF4
            # base, and the embedding + tied output layer
            ("llama-tiny", "7 linear layers, rslora", ["--method", "lora", "--rslora"]),
            ("llama-tiny", "7 linear layers, qlora", ["--method", "qlora", "--rslora"]),
            ("llama-tiny", "embed_tokens,lm_head,q_proj", ["--method", "lora", "--targets", "embed_tokens,lm_head,q_proj"]),
        ]
        for i, (preset, name, extra) in enumerate(runs):
            base = bases[preset]
            run = os.path.join(tmp, f"run-{i}")
            kiln("finetune", "--model", base, "--data", task, "--out", run, "--r", "4",
                 "--alpha", "8", "--max-steps", "30", "--set", "train.batch_size=8", "--set", "train.lr=3e-3",
                 *extra)
            ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
            adapter = os.path.join(run, "checkpoints", ckpts[-1])
            out = os.path.join(tmp, "grads.safetensors")
            kiln("grads", "--model", base, "--batch", batch, "--adapter", adapter, "--out", out)
            kiln_loss = load_file(out)["loss"].item()

            with torch.no_grad():
                plain = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager", dtype=torch.float32).eval()
                base_loss = plain(input_ids=ids, labels=ids).loss.item()
                peft_model = PeftModel.from_pretrained(plain, adapter).eval()
                peft_loss = peft_model(input_ids=ids, labels=ids).loss.item()
            # the adapter must matter (else equal losses would prove nothing) and agree with kiln
            ok = abs(kiln_loss - peft_loss) < 1e-4 * max(1.0, abs(peft_loss)) and abs(base_loss - peft_loss) > 1e-3
            print(f"kiln {preset} adapter on {name} in peft: kiln loss {kiln_loss:.6f}, peft loss {peft_loss:.6f} "
                  f"(base without the adapter {base_loss:.6f}) {'ok' if ok else 'MISMATCH'}")
            results.append(ok)
        print(f"{sum(results)} passed, {len(results) - sum(results)} failed")
        sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
