#!/usr/bin/env python3
"""Makes tests/fixtures/peft-embedding/: PEFT's LoRA on GPT-2's token embedding (transformer.wte),
its tied output layer (lm_head) and c_attn, on the dev-set model and batch.

Run with the oracle's Python (torch, transformers, peft 0.21.2):
    python tools/make_peft_embedding_fixture.py

Writes
    adapter/adapter_config.json, adapter/adapter_model.safetensors   PeftModel.save_pretrained
    grads.safetensors   loss [1], logits [B,T,V], and d loss / d every adapter tensor under its
                        saved name (base_model.model.transformer.wte.lora_embedding_A, ...)
    meta.json           versions, config and the math

Every adapter tensor is set to deterministic nonzero random values (PEFT's own initialisation
zeroes lora_embedding_A and lora_B, which would leave half the gradients zero), so gradients
flow into both factors of every adapter.
"""
import json
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import GPT2LMHeadModel  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DEV = os.path.join(ROOT, "tests", "fixtures", "oracle", "dev-set")
OUT = os.path.join(ROOT, "tests", "fixtures", "peft-embedding")

# fan_in_fan_out=True as kiln writes it: PEFT applies it to the Conv1D layers and (with a
# warning) switches it off for lm_head, an nn.Linear; the Embedding forward ignores it.
LORA = dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte", "lm_head"], lora_dropout=0.0,
            bias="none", fan_in_fan_out=True)
SEED = 4321
STD = {"lora_A": 0.2, "lora_B": 0.05, "lora_embedding_A": 0.2, "lora_embedding_B": 0.05}


def main():
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel.from_pretrained(os.path.join(DEV, "model"), attn_implementation="eager").eval()
    assert model.lm_head.weight is model.transformer.wte.weight, "lm_head must be tied to wte"
    batch = load_file(os.path.join(DEV, "batch.safetensors"))
    ids, labels = batch["input_ids"], batch["labels"]

    pm = get_peft_model(model, LoraConfig(**LORA))
    g = torch.Generator().manual_seed(SEED)
    params = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    with torch.no_grad():
        for n, p in params:
            kind = next(k for k in sorted(STD, key=len, reverse=True) if f".{k}." in n or n.endswith(f".{k}.default"))
            p.copy_(torch.randn(p.shape, generator=g) * STD[kind])

    adir = os.path.join(OUT, "adapter")
    pm.save_pretrained(adir)
    readme = os.path.join(adir, "README.md")
    if os.path.exists(readme):  # peft's auto-generated model card
        os.remove(readme)
    saved = load_file(os.path.join(adir, "adapter_model.safetensors"))
    # With an embedding among the targets PEFT also saves the (tied) base weight under both
    # module names (save_embedding_layers="auto"): X.base_layer.weight, equal to wte.
    base_copies = [k for k in saved if k.endswith(".base_layer.weight")]
    assert sorted(base_copies) == ["base_model.model.lm_head.base_layer.weight",
                                   "base_model.model.transformer.wte.base_layer.weight"], base_copies
    for k in base_copies:
        assert torch.equal(saved.pop(k), model.transformer.wte.weight.detach()), k

    def to_saved(n):  # live 'X.lora_A.default.weight' / 'X.lora_embedding_A.default' -> saved name
        return n.replace(".default.", ".").removesuffix(".default")

    assert sorted(saved) == sorted(to_saved(n) for n, _ in params), (sorted(saved), [n for n, _ in params])
    for n, p in params:
        assert torch.equal(saved[to_saved(n)], p.detach()), n

    pm.eval()  # dropout is 0 anyway; eval keeps the model's own dropout off, as kiln's Mode::Eval
    res = pm(input_ids=ids, labels=labels, use_cache=False)
    res.loss.backward()
    t = {"loss": res.loss.detach().reshape(1), "logits": res.logits.detach()}
    for n, p in params:
        assert p.grad is not None and p.grad.abs().max() > 0, f"{n}: no gradient"
        t[to_saved(n)] = p.grad.detach()
    assert all(p.grad is None for _, p in pm.named_parameters() if not p.requires_grad)
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "grads.safetensors"))

    with torch.no_grad():
        plain = GPT2LMHeadModel.from_pretrained(os.path.join(DEV, "model"), attn_implementation="eager").eval()
        base_loss = plain(input_ids=ids, labels=labels).loss.item()
    meta = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "seed": SEED,
        "peft_config": LORA,
        "init": {k: f"N(0, {v}^2) from torch.Generator().manual_seed({SEED}), in named_parameters order"
                 for k, v in STD.items()},
        "scaling": LORA["lora_alpha"] / LORA["r"],
        "math": ("wte (nn.Embedding [V,C]): x += scaling * A[:, ids]^T @ B^T, A = lora_embedding_A [r,V], "
                 "B = lora_embedding_B [C,r], no dropout; lm_head (nn.Linear tied to wte): logits = h @ wte^T + "
                 "scaling * dropout(h) @ A^T @ B^T, A = lora_A [r,C], B = lora_B [V,r]; c_attn (Conv1D) as usual"),
        "model": "tests/fixtures/oracle/dev-set/model", "batch": "tests/fixtures/oracle/dev-set/batch.safetensors",
        "loss": res.loss.item(),
        "base_loss": base_loss,
        "shapes": {k: list(v.shape) for k, v in saved.items()},
        "base_layer_copies": ("adapter_model.safetensors also holds " + ", ".join(base_copies)
                              + ": PEFT's save_embedding_layers='auto' copy of the tied wte [V,C]"),
    }
    with open(os.path.join(OUT, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"loss {res.loss.item():.6f} (base {base_loss:.6f}); {len(saved)} adapter tensors:")
    for k, v in saved.items():
        print(f"  {k} {list(v.shape)}")


if __name__ == "__main__":
    main()
