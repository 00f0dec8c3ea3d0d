"""`make demo-encoders`: train a small BERT and a small T5 on the Python standard library's docstrings, on CPU.

  data   the stdlib's docstrings (English prose) as JSONL; a WordPiece (BERT) and a unigram tokenizer with
         sentinels (T5) trained with ``tokenizers``; ``interop data preprocess --split-sentences`` (offline
         splitter) into sentence-level indexed datasets for each
  bert   ``interop train`` a 2-layer BERT from random init (MLM + next-sentence loss through Megatron-Core's
         BERTMaskedWordPieceDataset), ``interop convert`` to HF, fill-mask predictions through Transformers
  t5     ``interop train`` a 2+2-layer T5 from a random Transformers T5 (``model:``) on span corruption
         (T5MaskedWordPieceDataset), ``interop convert`` to HF, completions of sentinel prompts through
         Transformers' ``generate``

A few minutes on 2 cores; outputs in demo-out/encoders.
"""
from __future__ import annotations

import ast
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tools.demo import DemoContext, banner  # noqa: E402
from tools.demo_stages.data import stdlib_files  # noqa: E402

STEPS = int(os.environ.get("DEMO_ENCODER_STEPS", "300"))
VOCAB = 4096
FILL_MASK = ["return the [MASK] of the file.", "raise an [MASK] if the value is not valid.",
             "this module provides functions for working with [MASK]."]
T5_PROMPTS = ["Return the <extra_id_0> of the file.", "Raise an <extra_id_0> if the value is not <extra_id_1>."]


def docstrings(files: list[str]) -> list[str]:
    """Module, class and function docstrings of at least two sentences, whitespace collapsed."""
    out = []
    for path in files:
        try:
            tree = ast.parse(open(path, encoding="utf-8", errors="replace").read())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc.count(". ") >= 1 and len(doc) > 120:
                    out.append(re.sub(r"\s+", " ", doc).strip())
    return out


def data_stage(ctx: DemoContext) -> dict:
    from interop.data.train_encoder_tokenizers import train_unigram_tokenizer, train_wordpiece_tokenizer

    docs = docstrings(stdlib_files())
    corpus = ctx.path("docstrings.jsonl")
    with open(corpus, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    print(f"{len(docs)} docstrings ({sum(map(len, docs)) / 1e6:.1f} MB) from the stdlib", flush=True)
    out = {}
    for name, train in (("bert", train_wordpiece_tokenizer), ("t5", train_unigram_tokenizer)):
        tok = train(iter(docs), ctx.path(f"{name}-tokenizer"), vocab_size=VOCAB)
        prefix = ctx.path(f"{name}-docs")
        ctx.interop("data", "preprocess", "--input", corpus, "--tokenizer", tok, "--output-prefix", prefix,
                    "--split-sentences", "--workers", "2", "--force")
        out[name] = (tok, prefix + "_text_sentence")
    return out


def _losses(save: str) -> list[float]:
    return [json.loads(line)["loss"] for line in open(os.path.join(save, "metrics.jsonl")) if '"loss"' in line]


def _falling(name: str, losses: list[float]) -> None:
    k = max(1, len(losses) // 10)
    print(f"{name} loss: first {k} steps {sum(losses[:k]) / k:.3f} -> last {k} steps {sum(losses[-k:]) / k:.3f}",
          flush=True)


def train_and_convert(ctx: DemoContext, name: str, label: str, config: dict) -> str:
    """``interop train`` on ``config`` (written as ``<name>.yaml``) into a fresh ``<name>-megatron``, the loss
    summary, then ``interop convert`` to ``<name>-hf``; returns the HF directory."""
    import shutil

    save, hf_out = ctx.path(f"{name}-megatron"), ctx.path(f"{name}-hf")
    shutil.rmtree(save, ignore_errors=True)
    path = ctx.path(f"{name}.yaml")
    with open(path, "w") as fh:
        json.dump(config, fh, indent=1)  # JSON is YAML
    print(open(path).read(), flush=True)
    ctx.interop("train", path, "--save", save, "--no-progress")
    _falling(label, _losses(save))
    ctx.interop("convert", save, hf_out, "--force")
    return hf_out


def bert_stage(ctx: DemoContext, tok: str, data: str) -> None:
    import torch
    from transformers import AutoTokenizer, MegatronBertForPreTraining

    config = {
        "arch": {"family": "bert", "num_layers": 2, "hidden_size": 128, "num_attention_heads": 4,
                 "vocab_size": len(AutoTokenizer.from_pretrained(tok)), "max_position_embeddings": 128},
        "seq_length": 64, "micro_batch_size": 16, "global_batch_size": 16, "train_iters": STEPS,
        "lr": 2e-3, "min_lr": 2e-4, "lr_warmup_iters": 20, "weight_decay": 0.01, "seed": 1234,
        "data_path": [data], "split": "98,2,0", "tokenizer": tok, "mask_prob": 0.15, "short_seq_prob": 0.1,
        "eval_interval": STEPS, "eval_iters": 2, "log_interval": 1,
    }
    hf_out = train_and_convert(ctx, "bert", "BERT (MLM + NSP)", config)
    tokenizer = AutoTokenizer.from_pretrained(tok)
    model = MegatronBertForPreTraining.from_pretrained(hf_out).eval()  # MLM + NSP heads, as trained
    for text in FILL_MASK:
        enc = tokenizer(text, return_tensors="pt")
        ids = torch.cat([torch.tensor([[tokenizer.cls_token_id]]), enc.input_ids,
                         torch.tensor([[tokenizer.sep_token_id]])], dim=1)  # the layout BERT was trained on
        with torch.no_grad():
            logits = model(ids).prediction_logits[0]
        where = (ids[0] == tokenizer.mask_token_id).nonzero()[0, 0]
        top = logits[where].topk(5).indices.tolist()
        print(f"  {text!r}: [MASK] -> {tokenizer.convert_ids_to_tokens(top)}", flush=True)


def t5_stage(ctx: DemoContext, tok: str, data: str) -> None:
    import torch
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tok)
    init = ctx.path("t5-init")
    torch.manual_seed(0)
    # a random Transformers T5 (v1.0: ReLU, tied embeddings) as the starting point: `model:` takes any HF checkpoint
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, dropout_rate=0.0,
        feed_forward_proj="relu", pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id)).save_pretrained(init)
    config = {
        "model": init, "tokenizer": tok, "data_path": [data], "split": "98,2,0", "seq_length": 64,
        "decoder_seq_length": 32, "micro_batch_size": 8, "global_batch_size": 8, "train_iters": STEPS,
        "lr": 2e-3, "min_lr": 2e-4, "lr_warmup_iters": 20, "mask_prob": 0.15, "masking_max_ngram": 3,
        "seed": 1234, "eval_interval": STEPS, "eval_iters": 2, "log_interval": 1,
    }
    hf_out = train_and_convert(ctx, "t5", "T5 (span corruption)", config)
    model = T5ForConditionalGeneration.from_pretrained(hf_out).eval()
    for text in T5_PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        ids = torch.cat([ids, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        print(f"  {text!r} -> {tokenizer.decode(out[0], skip_special_tokens=False)!r}", flush=True)


def main() -> None:
    ctx = DemoContext(out=os.path.join(ROOT, "demo-out", "encoders"))
    os.makedirs(ctx.out, exist_ok=True)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    start = time.time()
    for name, stage in (("data", None), ("bert", bert_stage), ("t5", t5_stage)):
        banner(f"stage: {name}")
        t0 = time.time()
        if stage is None:
            made = data_stage(ctx)
        else:
            stage(ctx, *made[name])
        print(f"--- stage {name} took {time.time() - t0:.0f} s", flush=True)
    print(f"\nencoder demo finished in {time.time() - start:.0f} s; outputs in {ctx.out}")


if __name__ == "__main__":
    main()
