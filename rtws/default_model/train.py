"""Train the bundled default model: a byte-level BPE tokenizer and a small
Llama-architecture causal LM on Tiny Shakespeare, saved as a standard
Hugging Face folder (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
``generation_config.json`` and a ``README.md`` model card).

Run from the repository root::

    nice -n 5 python -m rtws.default_model.train --seed 0

The first 90 % of the corpus (by characters) is used for training (of both
the tokenizer and the model); the last 10 % is held out and only used to
report the loss.

Learning-rate schedule: linear warmup, constant, then linear decay over the
last ``--decay-frac`` of the steps (warmup-stable-decay). Everything is
seeded (``torch.manual_seed``, and training windows come from a
``torch.Generator`` with the same seed), so ``--steps N --decay-start D``
with the same seed, torch version and thread count gives the same weights.

With ``--minutes M`` the run is time-budgeted instead (the CPU may be
shared, so throughput is not known in advance): the stable phase ends when
``(1 - decay_frac)`` of the budget has elapsed (or at ``--steps``' decay
start, if earlier) and the decay then runs for the matching number of
steps. The step counts are printed and written into the model card together
with the equivalent deterministic ``--steps/--decay-start`` command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from rtws.default_model import DEFAULT_MODEL_PATH
from rtws.default_model.corpus import SHAKESPEARE_PATH

EOT = "<|endoftext|>"
USER_SPEAKER = "ROMEO"
ASSISTANT_SPEAKER = "JULIET"
DEFAULT_DATA = SHAKESPEARE_PATH

# Renders messages in the corpus's own speaker format ("NAME:\ntext\n\n").
# Speaker = message['name'] upper-cased if given, else user -> ROMEO,
# assistant -> JULIET, any other role -> the role upper-cased; a system (or
# developer) message without a name is rendered as its text alone followed
# by a blank line. Content is trimmed of surrounding whitespace; a list of
# content parts contributes the text of its {"type": "text"} parts.
# add_generation_prompt appends "JULIET:\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set parts = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = parts.text -%}"
    "{%- endif -%}"
    "{%- if message['name'] is defined and message['name'] -%}"
    "{{- message['name'] | trim | upper + ':\\n' + content | trim + '\\n\\n' -}}"
    "{%- elif message['role'] == 'system' or message['role'] == 'developer' -%}"
    "{{- content | trim + '\\n\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '" + USER_SPEAKER + ":\\n' + content | trim + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '" + ASSISTANT_SPEAKER + ":\\n' + content | trim + '\\n\\n' -}}"
    "{%- else -%}"
    "{{- message['role'] | upper + ':\\n' + content | trim + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + ASSISTANT_SPEAKER + ":\\n' -}}{%- endif -%}"
)

OUTPUT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "README.md",
)
SAMPLE_PROMPTS = ("ROMEO:\n", "First Citizen:\nWhat news", "KING HENRY VI:\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m rtws.default_model.train",
        description="Train the bundled default model (tokenizer + Llama LM) on Tiny Shakespeare.",
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="corpus text file (default: %(default)s)")
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_PATH, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=None,
                   help="time budget for the training loop; ends the stable LR phase by wall clock (default: none)")
    p.add_argument("--steps", type=int, default=3000,
                   help="total optimizer steps (an upper bound when --minutes is given)")
    p.add_argument("--decay-frac", type=float, default=0.25, help="fraction of the run spent in LR decay")
    p.add_argument("--decay-start", type=int, default=None,
                   help="step at which LR decay starts (default: steps * (1 - decay-frac)); "
                        "with --steps, reproduces a --minutes run exactly")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=256, help="context length in tokens")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688, help="SwiGLU intermediate size")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final LR as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--dropout", type=float, default=0.1, help="training-only residual/embedding dropout")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=250, help="print held-out loss every N steps (0: never)")
    p.add_argument("--threads", default="auto",
                   help="torch threads, or 'auto': re-measure every 100 steps whether 1 thread or all of "
                        "torch's default is faster right now (on a shared CPU, oversubscribed OpenMP "
                        "threads are much slower than one); default %(default)s")
    p.add_argument("--no-bf16-autocast", dest="bf16_autocast", action="store_false",
                   help="train in plain float32 instead of bfloat16 autocast")
    p.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    return p.parse_args(argv)


def build_tokenizer(train_text: str, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Byte-level: every string maps to bytes first, so any valid Unicode
    # round-trips exactly. No normalizer, no post-processor (no BOS/EOS added).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([train_text], trainer=trainer)
    return tok, PreTrainedTokenizerFast


def wrap_tokenizer(tok: Any, cls: Any, context: int) -> Any:
    hf = cls(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        clean_up_tokenization_spaces=False,
        model_max_length=context,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def heldout_nll(model: Any, ids: Any, context: int, eot_id: int, batch_size: int = 16,
                autocast: bool = False) -> float:
    """Summed NLL (nats) of every token of ``ids``: the stream, prefixed with
    EOT as context for the first token, is cut into non-overlapping windows of
    ``context`` inputs; each token is predicted once, context resets per window."""
    import torch
    import torch.nn.functional as F

    stream = torch.tensor([eot_id] + list(ids), dtype=torch.long)
    n_targets = len(stream) - 1
    starts = list(range(0, n_targets, context))
    total = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(0, len(starts), batch_size):
            chunk = starts[b : b + batch_size]
            # windows may be ragged at the end: evaluate the last one alone
            full = [s for s in chunk if s + context <= n_targets]
            rest = [s for s in chunk if s + context > n_targets]
            groups = []
            if full:
                groups.append(full)
            groups.extend([s] for s in rest)
            for g in groups:
                n = min(context, n_targets - g[0])
                x = torch.stack([stream[s : s + n] for s in g])
                y = torch.stack([stream[s + 1 : s + n + 1] for s in g])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = model(input_ids=x).logits
                total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum").item()
    model.train(was_training)
    return total


def add_training_dropout(model: Any, p: float) -> list[Any]:
    """Training-only dropout on the embedding output and on each residual
    branch (attention o_proj, MLP down_proj), GPT-2 style, via forward hooks
    so the saved model stays a stock LlamaForCausalLM."""
    import torch.nn.functional as F

    if p <= 0:
        return []

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        return F.dropout(output, p=p, training=module.training)

    handles = [model.model.embed_tokens.register_forward_hook(hook)]
    for layer in model.model.layers:
        handles.append(layer.self_attn.o_proj.register_forward_hook(hook))
        handles.append(layer.mlp.down_proj.register_forward_hook(hook))
    return handles


def tune_malloc() -> None:
    """Keep freed memory in the process (glibc): the per-step activations are
    large, short-lived buffers, and returning them to the OS each step costs
    page faults (measured ~15 % of step time on a 2-core box). Speed only."""
    if sys.platform != "linux":
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class ThreadTuner:
    """Picks the faster torch thread count while training on a shared CPU.

    Every ``period`` steps it times ``probe`` steps with the other candidate
    and keeps whichever had the lower median step time. Thread count does not
    change the arithmetic of the ops used here (bitwise-identical weights for
    1 and 2 threads in a check on the training machine with this architecture),
    so this affects speed only."""

    def __init__(self, torch: Any, candidates: list[int], period: int = 100, probe: int = 6) -> None:
        self.torch = torch
        self.candidates = candidates
        self.period, self.probe = period, probe
        self.current = candidates[-1]
        self.times: dict[int, list[float]] = {c: [] for c in candidates}
        self.probing: int | None = None
        self.probe_start = 0
        self.used: set[int] = set()
        torch.set_num_threads(self.current)

    def before_step(self, step: int) -> None:
        if len(self.candidates) < 2 or step == 0:
            return
        if self.probing is None and step % self.period == 0:
            other = [c for c in self.candidates if c != self.current]
            self.probing, self.probe_start = other[step // self.period % len(other)], step
            self.times[self.probing] = []
            self.torch.set_num_threads(self.probing)
        elif self.probing is not None and step - self.probe_start >= self.probe:
            med = lambda xs: sorted(xs)[len(xs) // 2] if xs else float("inf")  # noqa: E731
            probe_t, cur_t = med(self.times[self.probing]), med(self.times[self.current][-self.probe * 3:])
            if probe_t < cur_t:
                self.current = self.probing
                self.times[self.current] = self.times[self.current][-self.probe:]
            self.probing = None
            self.torch.set_num_threads(self.current)

    def after_step(self, seconds: float) -> None:
        n = self.torch.get_num_threads()
        self.used.add(n)
        self.times.setdefault(n, []).append(seconds)
        self.times[n] = self.times[n][-50:]


def machine_description(threads: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs visible, {threads}, no GPU ({platform.system()} {platform.machine()})"


def command_line(argv: list[str]) -> str:
    cmd = "python -m rtws.default_model.train" + ("" if not argv else " " + shlex.join(argv))
    try:
        niceness = os.nice(0)
    except OSError:
        niceness = 0
    return (f"nice -n {niceness} " if niceness > 0 else "") + cmd


def repro_command(argv: list[str], steps: int, decay_start: int) -> str:
    """The command line with --minutes dropped and --steps/--decay-start pinned."""
    drop = {"--minutes": 1, "--steps": 1, "--decay-start": 1}
    kept: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in drop:
            i += 1 if "=" in a else 1 + drop[name]
            continue
        kept.append(a)
        i += 1
    return command_line(kept + ["--steps", str(steps), "--decay-start", str(decay_start)])


def write_model_card(out: Path, info: dict[str, Any]) -> None:
    s = info
    samples = "\n\n".join(
        f"Prompt {json.dumps(p)}:\n\n```text\n{p}{c}\n```" for p, c in s["samples"]
    )
    if s["time_budgeted"]:
        repro = (f"- The run was time-budgeted (`--minutes`): the LR decay started at step "
                 f"{s['decay_start']} and training ended at step {s['steps_done']}. Equivalent "
                 f"deterministic command (same weights for the same seed, torch version and "
                 f"thread count): `{s['repro_command']}`\n")
    else:
        repro = ""
    target = "meets" if s["heldout_nats_per_char"] <= 1.6 else "does NOT meet"
    text = f"""---
license: mit
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny-shakespeare, rtws]
---

# rtws default model: tiny Llama trained on Tiny Shakespeare

A small GPT-style causal language model bundled with rtws so that the server
works out of the box, offline. It is a toy: it writes Shakespeare-flavoured
text, not answers.

## Data

Tiny Shakespeare (`{s['data_name']}`, {s['n_chars']:,} characters). The first
90 % by characters ({s['n_train_chars']:,} characters) trains both the tokenizer
and the model; the last 10 % ({s['n_heldout_chars']:,} characters) is held out and
only used to report the loss below.

## Tokenizer

Byte-level BPE trained with the `tokenizers` library: {s['vocab_size']:,} tokens
including the single special token `{EOT}` (id {s['eot_id']}), which is the BOS,
EOS and PAD token. No normalizer and no post-processor: encoding adds no special
tokens and decoding does not clean up spaces (`clean_up_tokenization_spaces=False`),
so `tok.decode(tok.encode(s)) == s` for any valid Unicode string. Training text is
{s['train_chars_per_token']:.2f} characters per token, held-out text
{s['heldout_chars_per_token']:.2f}.

## Architecture

Stock `LlamaForCausalLM` (`LlamaConfig`): {s['layers']} layers, hidden size
{s['d_model']}, {s['heads']} attention heads (head dim {s['d_model'] // s['heads']}),
SwiGLU MLP of {s['ffn']}, RMSNorm, RoPE, context length {s['context']} tokens,
tied input/output embeddings. **{s['n_params']:,} parameters.** Weights are stored
in {s['save_dtype']}; load with an explicit dtype, e.g.
`AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)` (or
`torch.float32`, which upcasts the same values).

Folder size: **{s['folder_bytes']:,} bytes** ({s['folder_bytes'] / 1e6:.2f} MB).

## Held-out loss

**{s['heldout_nats_per_char']:.4f} nats per character** on the held-out 10 %
({s['heldout_nats_per_token']:.4f} nats per token, {s['n_heldout_tokens']:,} tokens),
computed with the saved {s['save_dtype']} weights in float32: the held-out text is
tokenised as one stream, prefixed with `{EOT}`, evaluated in non-overlapping windows
of {s['context']} tokens (every token predicted once), and the summed token NLL is
divided by the number of held-out characters. The float32 master weights at the
end of training gave {s['heldout_nats_per_char_fp32']:.4f} nats per character. The
project's target is at most 1.6; this model {target} it.

## Training

- Command (from the repository root): `{s['command']}`
- Seed: {s['seed']} (`torch.manual_seed`; training windows are drawn from a
  `torch.Generator` seeded with the same value, so the data order is fixed)
{repro}- {s['steps_done']} AdamW steps (betas 0.9/0.95, weight decay {s['weight_decay']} on
  matrices), batch {s['batch_size']} x {s['context']} tokens, peak LR {s['lr']}:
  {s['warmup']} warmup steps, constant until step {s['decay_start']}, then linear
  decay to {s['min_lr_ratio']} x peak at step {s['steps_done']},
  gradient clipping {s['grad_clip']}, training-only dropout {s['dropout']}
  (embeddings and residual branches, applied with forward hooks),
  {'bfloat16 autocast' if s['bf16_autocast'] else 'float32'} on CPU.
  {s['tokens_seen']:,} training tokens seen (about {s['epochs']:.1f} passes over the
  training split).
- Machine: {s['machine']}
- Wall time: {s['wall_minutes']:.1f} minutes in total ({s['train_minutes']:.1f} of
  them in the training loop), torch {s['torch_version']}, transformers
  {s['transformers_version']}, tokenizers {s['tokenizers_version']}.

## Chat template

`tokenizer_config.json` carries a Jinja chat template that renders messages in
the corpus's own speaker format: a speaker line ending with a colon, the text,
then a blank line.

- speaker = `message['name']` upper-cased, if present;
- otherwise role `user` -> `{USER_SPEAKER}`, role `assistant` -> `{ASSISTANT_SPEAKER}`,
  any other role -> the role upper-cased;
- a `system` (or `developer`) message without a name renders as its text alone
  followed by a blank line;
- the text is trimmed of surrounding whitespace; a list of content parts
  contributes the text of its `{{"type": "text"}}` parts;
- `add_generation_prompt=True` appends `{ASSISTANT_SPEAKER}:\\n`.

For example `[{{"role": "user", "content": "Hello there."}}, {{"role": "assistant",
"content": "Good morrow."}}]` with `add_generation_prompt=True` renders as

```text
{USER_SPEAKER}:
Hello there.

{ASSISTANT_SPEAKER}:
Good morrow.

{ASSISTANT_SPEAKER}:
```

The corpus never contains `{EOT}`, so the model rarely emits EOS: it ends a
speech by starting the next speaker line (`\\n\\nNAME:`). Stop on that, or on a
token budget.

## Samples

Sampled with temperature 0.8, top-k 50, `torch.manual_seed({s['seed']})`, 80 new
tokens, from the saved weights:

{samples}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    t_start = time.time()
    tune_malloc()

    import tokenizers
    import torch
    import torch.nn.functional as F
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM

    default_threads = torch.get_num_threads()
    if args.threads == "auto":
        tuner = ThreadTuner(torch, sorted({1, default_threads}))
    else:
        tuner = ThreadTuner(torch, [int(args.threads)])
    torch.manual_seed(args.seed)

    data_path = args.data.resolve()
    text = data_path.read_text(encoding="utf-8")
    split = int(len(text) * 0.9)
    train_text, heldout_text = text[:split], text[split:]
    print(f"corpus {data_path}: {len(text):,} chars, train {len(train_text):,}, held-out {len(heldout_text):,}", flush=True)

    tok, tok_cls = build_tokenizer(train_text, args.vocab_size)
    hf_tok = wrap_tokenizer(tok, tok_cls, args.context)
    eot_id = tok.token_to_id(EOT)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    heldout_ids = tok.encode(heldout_text).ids
    assert tok.decode(train_ids.tolist()) == train_text and tok.decode(heldout_ids) == heldout_text
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train_ids):,} tokens "
          f"({len(train_text) / len(train_ids):.3f} chars/token), held-out {len(heldout_ids):,} tokens", flush=True)

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.d_model,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        pad_token_id=eot_id,
        attention_dropout=0.0,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    dropout_hooks = add_training_dropout(model, args.dropout)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )

    # Warmup-stable-decay. decay_start/total_steps may be fixed at run time by --minutes.
    total_steps = args.steps
    decay_start = args.decay_start if args.decay_start is not None else round(args.steps * (1 - args.decay_frac))
    decay_start = max(args.warmup, min(decay_start, total_steps))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        if step < decay_start:
            return args.lr
        frac = (step - decay_start + 1) / max(1, total_steps - decay_start)
        return args.lr * (1 - (1 - args.min_lr_ratio) * min(1.0, frac))

    gen = torch.Generator().manual_seed(args.seed)
    n_windows = len(train_ids) - args.context - 1
    offsets = torch.arange(args.context + 1)
    model.train()
    t_train = time.time()
    decay_deadline = t_train + args.minutes * 60 * (1 - args.decay_frac) if args.minutes else None
    steps_done = 0
    ema = None
    step = 0
    while step < total_steps:
        if decay_deadline is not None and step < decay_start and time.time() >= decay_deadline:
            decay_start = max(step, args.warmup)
            total_steps = min(total_steps, decay_start + round(decay_start * args.decay_frac / (1 - args.decay_frac)))
            decay_deadline = None
            print(f"time budget: LR decay starts at step {decay_start}, training ends at step {total_steps}", flush=True)
        tuner.before_step(step)
        t_step = time.time()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        starts = torch.randint(0, n_windows, (args.batch_size,), generator=gen)
        w = train_ids[starts[:, None] + offsets]
        x, y = w[:, :-1], w[:, 1:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tuner.after_step(time.time() - t_step)
        steps_done = step + 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 50 == 0 or steps_done == total_steps:
            el = time.time() - t_train
            print(f"step {steps_done}/{total_steps} loss {loss.item():.4f} (ema {ema:.4f}) lr {lr_at(step):.2e} "
                  f"{el / 60:.1f} min, {steps_done * x.numel() / el:.0f} tok/s, {torch.get_num_threads()} threads", flush=True)
        if args.eval_every and steps_done % args.eval_every == 0 and steps_done < total_steps:
            nll = heldout_nll(model, heldout_ids, args.context, eot_id, autocast=args.bf16_autocast)
            print(f"  held-out @ {steps_done}: {nll / len(heldout_text):.4f} nats/char (bf16 autocast)", flush=True)
        step += 1
    train_seconds = time.time() - t_train
    for h in dropout_hooks:
        h.remove()
    model.eval()

    fp32_nll = heldout_nll(model, heldout_ids, args.context, eot_id)
    print(f"final held-out (fp32 master weights): {fp32_nll / len(heldout_text):.4f} nats/char", flush=True)

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:  # remove stale outputs only, never anything else in --out
        (out / name).unlink(missing_ok=True)
    save_dtype = getattr(torch, args.save_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id, do_sample=False,
    )
    model.to(save_dtype).save_pretrained(out)
    hf_tok.save_pretrained(out, save_jinja_files=False)
    for name in OUTPUT_FILES:  # safetensors writes 0600; package data should be world-readable
        if (out / name).exists():
            (out / name).chmod(0o644)

    # Evaluate and sample from exactly what was saved (bf16 values, fp32 compute).
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    saved.eval()
    nll = heldout_nll(saved, heldout_ids, args.context, eot_id)
    per_char = nll / len(heldout_text)
    print(f"HELD-OUT LOSS (saved {args.save_dtype} weights): {per_char:.4f} nats/char, "
          f"{nll / len(heldout_ids):.4f} nats/token", flush=True)

    samples = []
    torch.manual_seed(args.seed)
    for prompt in SAMPLE_PROMPTS:
        enc = hf_tok(prompt, return_tensors="pt")
        with torch.no_grad():
            gen_ids = saved.generate(**enc, max_new_tokens=80, do_sample=True, temperature=0.8, top_k=50)
        cont = hf_tok.decode(gen_ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append((prompt, cont))
        print(f"--- sample {prompt!r}\n{prompt}{cont}", flush=True)

    import safetensors

    info = dict(
        data_name=f"{data_path.parent.name}/{data_path.name}", n_chars=len(text), n_train_chars=len(train_text),
        n_heldout_chars=len(heldout_text), vocab_size=tok.get_vocab_size(), eot_id=eot_id,
        train_chars_per_token=len(train_text) / len(train_ids), heldout_chars_per_token=len(heldout_text) / len(heldout_ids),
        layers=args.layers, d_model=args.d_model, heads=args.heads, ffn=args.ffn, context=args.context,
        n_params=n_params, save_dtype=args.save_dtype, heldout_nats_per_char=per_char,
        heldout_nats_per_token=nll / len(heldout_ids), n_heldout_tokens=len(heldout_ids),
        heldout_nats_per_char_fp32=fp32_nll / len(heldout_text), command=command_line(argv), seed=args.seed,
        steps=total_steps, steps_done=steps_done, decay_start=decay_start, time_budgeted=args.minutes is not None,
        repro_command=repro_command(argv, steps_done, decay_start), weight_decay=args.weight_decay, batch_size=args.batch_size,
        lr=args.lr, warmup=args.warmup, min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip,
        dropout=args.dropout, bf16_autocast=args.bf16_autocast,
        tokens_seen=steps_done * args.batch_size * args.context,
        epochs=steps_done * args.batch_size * args.context / len(train_ids),
        machine=machine_description(
            f"torch threads: {args.threads} (used {sorted(tuner.used)}; results do not depend on it)"
            if args.threads == "auto" else f"{args.threads} torch threads"), train_minutes=train_seconds / 60,
        torch_version=torch.__version__, transformers_version=transformers.__version__,
        tokenizers_version=tokenizers.__version__, safetensors_version=safetensors.__version__,
        samples=samples, folder_bytes=0,
    )
    # The card states the folder size, which includes the card itself: iterate to a fixed point.
    for _ in range(5):
        info["wall_minutes"] = (time.time() - t_start) / 60
        write_model_card(out, info)
        size = folder_size(out)
        if size == info["folder_bytes"]:
            break
        info["folder_bytes"] = size
    print(f"saved to {out} ({folder_size(out):,} bytes); wall time {(time.time() - t_start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
