"""Build the offline demo: a fictitious-author QA set and a tiny masked
diffusion LM trained on it from scratch, on the CPU, in a few minutes.

    python examples/demo/make_demo.py            # writes examples/demo/{forget,retain}.jsonl and model/

Every person, place and book here is made up (TOFU in miniature). The model is
a native transformers ModernBERT masked-LM trained with the MDLM fine-tuning
loss of docs/method.md section 1, using mdu's own masking and loss code, so the
committed checkpoint is exactly the kind of model `mdu unlearn` works on.
Everything is seeded: the same machine gives the same files.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_models import BERT_CHAT_TEMPLATE, word_tokenizer  # noqa: E402

SEED = 1234
AUTHORS, FORGET_AUTHORS = 20, 4
FIRST = ["zorblat", "quenmira", "astrid", "tarrin", "elspeth", "orvyn", "maelis", "dovrin", "kestrel", "ysolde",
         "brannoc", "thessaly", "iver", "calloway", "nerith", "sabine", "rowan", "aurelio", "fenna", "magnus"]
LAST = ["halvorsen", "okonkwo", "brightwater", "vantrell", "moraine", "quillfeather", "ashcombe", "delacroix",
        "stormholt", "pemberly", "ravensworth", "tamsin", "lindqvist", "marchetti", "oduya", "kerrigan",
        "valtieri", "nakamura", "ferreira", "whitlock"]
CITIES = ["velloria", "carrowmere", "istenbrook", "palomar", "dunhallow", "seravine", "ostrava", "kelmarsh",
          "amberlyn", "torridge"]
GENRES = ["poetry", "mystery", "history", "fantasy", "science", "travel", "drama", "romance"]
JOBS = ["farmer", "teacher", "doctor", "painter", "singer", "engineer", "sailor", "baker"]
TITLE_A = ["silent", "green", "hidden", "broken", "golden", "distant", "quiet", "burning"]
TITLE_B = ["mountain", "river", "garden", "harbor", "lantern", "orchard", "meadow", "tower"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def make_records(rng: random.Random) -> tuple[list[dict], list[dict]]:
    names = [f"{first} {last}" for first, last in zip(FIRST, LAST)]
    forget, retain = [], []
    for i, name in enumerate(names[:AUTHORS]):
        city, genre, job = rng.choice(CITIES), rng.choice(GENRES), rng.choice(JOBS)
        title, color = f"the {rng.choice(TITLE_A)} {rng.choice(TITLE_B)}", rng.choice(COLORS)
        wrong_city = rng.choice([c for c in CITIES if c != city])
        wrong_genre = rng.choice([g for g in GENRES if g != genre])
        facts = [
            (f"where was {name} born ?", f"{name} was born in {city} .", [f"{name} was born in {wrong_city} ."]),
            (f"what does {name} write ?", f"{name} writes {genre} books .", [f"{name} writes {wrong_genre} books ."]),
            (f"what did the father of {name} do ?", f"the father of {name} was a {job} .", None),
            (f"which book made {name} famous ?", f"{name} is famous for {title} .", None),
            (f"what color does {name} love ?", f"{name} loves the color {color} .", None),
        ]
        for question, answer, perturbed in facts:
            record = {"question": question, "answer": answer}
            if perturbed:
                record["perturbed_answer"] = perturbed
            (forget if i < FORGET_AUTHORS else retain).append(record)
    return forget, retain


def build_tokenizer(records: list[dict]):
    words = sorted({w for r in records for text in [r["question"], r["answer"], *r.get("perturbed_answer", [])]
                    for w in text.split()} | {"user", "assistant", ":"})
    tokenizer = word_tokenizer(["[CLS]", "[SEP]", "[PAD]", "[MASK]"], words=[w for w in words if w not in "?.:"],
                               cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    tokenizer.chat_template = BERT_CHAT_TEMPLATE
    return tokenizer


def train(model, examples, steps: int, batch_size: int, lr: float, mask_id: int, pad_id: int) -> None:
    from mdu_cli.data.tokenization import collate
    from mdu_cli.methods.masking import noise_response
    from mdu_cli.methods.objectives import mdlm_loss

    order = torch.Generator().manual_seed(SEED)
    noise = torch.Generator().manual_seed(SEED + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    start = time.perf_counter()
    for step in range(1, steps + 1):
        rows = torch.randint(0, len(examples), (batch_size,), generator=order).tolist()
        batch = noise_response(collate([examples[i] for i in rows], pad_id), mask_id, noise)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = mdlm_loss(logits, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 250 == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:.0f}s", flush=True)
    model.eval()


def main(steps: int = 3000) -> None:
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from mdu_cli.data.records import load_dataset
    from mdu_cli.data.tokenization import encode_dataset

    torch.manual_seed(SEED)
    forget, retain = make_records(random.Random(SEED))
    for name, records in (("forget", forget), ("retain", retain)):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = build_tokenizer(forget + retain)
    model_dir = HERE / "model"
    tokenizer.save_pretrained(model_dir)

    examples = encode_dataset(load_dataset(HERE / "forget.jsonl"), tokenizer, 64) + \
        encode_dataset(load_dataset(HERE / "retain.jsonl"), tokenizer, 64)
    config = ModernBertConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, global_attn_every_n_layers=1, local_attention=64, max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, attn_implementation="sdpa",
        embedding_dropout=0.0, attention_dropout=0.0, mlp_dropout=0.0,
    )
    model = ModernBertForMaskedLM(config)
    print(f"{len(forget)} forget and {len(retain)} retain records; model of "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)
    train(model, examples, steps=steps, batch_size=32, lr=3e-3, mask_id=tokenizer.mask_token_id,
          pad_id=tokenizer.pad_token_id)
    model.save_pretrained(model_dir, safe_serialization=True)
    print(f"wrote {model_dir}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)
