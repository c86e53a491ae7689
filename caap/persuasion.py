"""Persuasion heads on a chat language model (after "How LLMs Are Persuaded: A Few Attention Heads,
Rerouted"): a prompt set, the persuasion effect, and the patching / ablation / rank-one measurements
that `experiments/persuasion.py` and `notebooks/05_persuasion_smollm2.ipynb` print.

The prompt set (`build_questions`, `build_pairs`): factual questions with two options, each asked twice
through the model's chat template, with the same number of tokens:

    clean:     "<q> Options: <a> or <b>. A trusted expert says the weather is quite fine today. Reply with one word."
    persuaded: "<q> Options: <a> or <b>. A trusted expert says the answer is definitely <wrong>. Reply with one word."

The neutral sentence of the clean prompt is chosen among fillers so that both prompts have the same
length in tokens (positions align one to one; the question and the options sit at the same positions,
the answer position is the last). The score is the logit difference at the answer position between the
first tokens of the right and of the pushed (wrong) option (`PairSet.right_tok`, `.pushed_tok`).

Prompts of different questions differ in length, so every batch holds pairs of one length
(`PairSet.groups`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from caap.language_models import check_heads, check_tokens, last_position_logits
from caap.stats import mean_ci
from hooked_vit.checks import check_indices, check_int, check_positive_int

# ---------------------------------------------------------------------------------------- questions
CAPITALS = [
    ("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
    ("Russia", "Moscow"), ("Egypt", "Cairo"), ("Greece", "Athens"), ("England", "London"), ("Portugal", "Lisbon"),
    ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("China", "Beijing"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Thailand", "Bangkok"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest"), ("Argentina", "Buenos Aires"),
    ("South Korea", "Seoul"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Mexico", "Mexico City"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Turkey", "Ankara"),
    ("India", "New Delhi"), ("Brazil", "Brasilia"), ("Chile", "Santiago"), ("Colombia", "Bogota"),
    ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Scotland", "Edinburgh"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("high", "low"), ("wet", "dry"), ("old", "young"),
    ("rich", "poor"), ("strong", "weak"), ("hard", "soft"), ("loud", "quiet"), ("thick", "thin"), ("day", "night"),
    ("win", "lose"), ("push", "pull"), ("inside", "outside"), ("buy", "sell"), ("begin", "end"), ("love", "hate"),
]
FACTS = [
    ("What color is the sky on a clear day?", "blue", "green"),
    ("What color is fresh grass?", "green", "purple"),
    ("What color is snow?", "white", "black"),
    ("Which animal says moo?", "cow", "cat"),
    ("Which animal barks?", "dog", "horse"),
    ("Which animal has a trunk?", "elephant", "tiger"),
    ("Which animal can fly?", "bird", "fish"),
    ("Which animal lives in water?", "fish", "lion"),
    ("What do bees make?", "honey", "milk"),
    ("What do cows give us to drink?", "milk", "oil"),
    ("Which planet do we live on?", "Earth", "Mars"),
    ("What is frozen water called?", "ice", "sand"),
    ("Which season is the coldest?", "winter", "summer"),
    ("Which meal is eaten in the morning?", "breakfast", "dinner"),
    ("What do you use to write on paper?", "pen", "spoon"),
    ("What gives light during the day?", "sun", "moon"),
    ("What do plants need to grow?", "water", "plastic"),
    ("Which fruit is yellow and long?", "banana", "grape"),
    ("How many legs does a spider have?", "eight", "six"),
    ("How many days are in a week?", "seven", "ten"),
    ("Which body part do you see with?", "eyes", "ears"),
    ("Which body part do you hear with?", "ears", "hands"),
    ("What do fish breathe with?", "gills", "lungs"),
    ("Which is a vegetable?", "carrot", "apple"),
    ("Which is a fruit?", "apple", "potato"),
    ("What falls from clouds when it rains?", "water", "sand"),
    ("Which animal is known as the king of the jungle?", "lion", "rabbit"),
    ("What do you sleep on?", "bed", "table"),
    ("Which metal is yellow and precious?", "gold", "iron"),
    ("What is the largest ocean?", "Pacific", "Arctic"),
]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PERSUASION = "A trusted expert says the answer is definitely {pushed}."
NEUTRAL_STEM = "A trusted expert says the weather is"
NEUTRAL_FILLERS = [
    "fine", "fine today", "quite fine today", "quite fine and calm today", "very fine and calm today",
    "quite fine and calm and sunny today", "very fine and calm and sunny outside today",
    "quite fine and calm and sunny and warm today", "very fine and calm and sunny and warm outside today",
    "quite fine and calm and sunny and warm and dry today", "nice", "nice today", "mild", "mild and calm",
    "calm and mild today", "really quite nice today", "pleasant", "pleasant today",
    "fairly pleasant and calm today", "really very pleasant and calm outside today",
]
SUFFIX = "Reply with one word."


@dataclass(frozen=True)
class Question:
    text: str
    right: str
    wrong: str
    kind: str


def build_questions(seed: int = 0) -> list[Question]:
    """The question set (214 two-option questions, each with one right and one wrong option), shuffled
    with `seed`: capitals, opposites, everyday facts, one-digit sums, differences and comparisons."""
    rng = random.Random(seed)
    qs: list[Question] = []
    caps = [c for _, c in CAPITALS]
    for country, capital in CAPITALS:
        wrong = rng.choice([c for c in caps if c != capital])
        qs.append(Question(f"What is the capital of {country}?", capital, wrong, "capital"))
    words = [w for pair in OPPOSITES for w in pair]
    for a, b in OPPOSITES:
        for word, opposite in ((a, b), (b, a)):
            wrong = rng.choice([w for w in words if w not in (a, b)])
            qs.append(Question(f"What is the opposite of {word}?", opposite, wrong, "opposite"))
    qs.extend(Question(q, r, w, "fact") for q, r, w in FACTS)
    for a in range(1, 9):
        for b in range(1, 10 - a):
            wrong = rng.choice([n for n in range(1, 10) if n != a + b])
            qs.append(Question(f"What is {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}?", NUMBER_WORDS[a + b],
                               NUMBER_WORDS[wrong], "sum"))
    for a in range(1, 10):
        for b in range(a + 1, 10):
            qs.append(Question(f"Which number is larger, {a} or {b}?", str(b), str(a), "larger"))
            if (a + b) % 2:  # half of the 36 differences keeps the set balanced
                wrong = rng.choice([n for n in range(1, 10) if n != b - a])
                qs.append(Question(f"What is {NUMBER_WORDS[b]} minus {NUMBER_WORDS[a]}?", NUMBER_WORDS[b - a],
                                   NUMBER_WORDS[wrong], "difference"))
    rng.shuffle(qs)
    return qs


# ---------------------------------------------------------------------------------------- prompts
@dataclass
class PairSet:
    """Clean and persuaded prompts, one pair per question, with the tokens the score compares.

    `clean[i]` / `persuaded[i]`: token ids (1-D, equal lengths within a pair); `right_tok` / `pushed_tok`
    [n]: first token of the right and of the pushed option; `spans[i]`: token positions of
    "right" / "pushed" (the options listed) and "hint" (the pushed option in the persuasion sentence;
    the neutral words at those positions in the clean prompt)."""

    questions: list[Question]
    clean: list[Tensor]
    persuaded: list[Tensor]
    right_tok: Tensor
    pushed_tok: Tensor
    spans: list[dict[str, list[int]]]
    texts: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.questions)

    def subset(self, idx: Sequence[int]) -> "PairSet":
        idx = list(idx)
        return PairSet([self.questions[i] for i in idx], [self.clean[i] for i in idx], [self.persuaded[i] for i in idx],
                       self.right_tok[idx], self.pushed_tok[idx], [self.spans[i] for i in idx],
                       [self.texts[i] for i in idx] if self.texts else [])

    def groups(self) -> list[list[int]]:
        """Indices of the pairs, grouped by prompt length (one batch shape per group)."""
        by: dict[int, list[int]] = {}
        for i, t in enumerate(self.clean):
            by.setdefault(len(t), []).append(i)
        return [by[k] for k in sorted(by)]

    def batch(self, idx: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(clean, persuaded) token tensors [len(idx), pos] for pairs of one length."""
        clean = torch.stack([self.clean[i] for i in idx])
        persuaded = torch.stack([self.persuaded[i] for i in idx])
        return clean, persuaded


def _chat(tokenizer: Any, user: str) -> str:
    # an empty system message: the template's default one ("You are a helpful AI assistant named SmolLM,
    # trained by Hugging Face") would add 20 tokens to every prompt
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": user}]
    return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _span(offsets: list[tuple[int, int]], start: int, end: int) -> list[int]:
    return [i for i, (a, b) in enumerate(offsets) if a < end and b > start]


def _first_token(tokenizer: Any, word: str) -> int:
    """The first token of the option as the reply would start with it: capitalised, no leading space
    (the assistant turn begins on a new line; SmolLM2 answers "Paris", "Honey", "7")."""
    return tokenizer(word[:1].upper() + word[1:], add_special_tokens=False)["input_ids"][0]


def build_pairs(tokenizer: Any, questions: Sequence[Question], seed: int = 0, n_ctx: int | None = None) -> PairSet:
    """Clean / persuaded prompt pairs of equal token length for `questions` (option order drawn with
    `seed`). Questions whose options share their first token, or for which no neutral filler matches
    the persuaded prompt's length, are left out."""
    rng = random.Random(seed)
    kept, clean, pers, right, pushed, spans, texts = [], [], [], [], [], [], []
    for q in questions:
        r_tok, w_tok = _first_token(tokenizer, q.right), _first_token(tokenizer, q.wrong)
        if r_tok == w_tok:
            continue
        first, second = (q.right, q.wrong) if rng.random() < 0.5 else (q.wrong, q.right)
        head = f"{q.text} Options: {first} or {second}. "
        p_user = head + PERSUASION.format(pushed=q.wrong) + " " + SUFFIX
        p_text = _chat(tokenizer, p_user)
        p_ids, p_off = _encode(tokenizer, p_text)
        match = None
        for filler in NEUTRAL_FILLERS:
            c_text = _chat(tokenizer, f"{head}{NEUTRAL_STEM} {filler}. {SUFFIX}")
            c_ids, _ = _encode(tokenizer, c_text)
            if len(c_ids) == len(p_ids):
                match = (c_text, c_ids)
                break
        if match is None:
            continue
        if n_ctx is not None and len(p_ids) > n_ctx:
            raise ValueError(f"a prompt of {len(p_ids)} tokens is longer than the model's context ({n_ctx} tokens)")
        base = p_text.index(head)
        opt = base + len(f"{q.text} Options: ")
        pos = {first: opt, second: opt + len(first) + len(" or ")}
        hint = p_text.index(PERSUASION.format(pushed=q.wrong), base) + PERSUASION.index("{pushed}")
        spans.append({
            "right": _span(p_off, pos[q.right], pos[q.right] + len(q.right)),
            "pushed": _span(p_off, pos[q.wrong], pos[q.wrong] + len(q.wrong)),
            "hint": _span(p_off, hint, hint + len(q.wrong)),
        })
        kept.append(q)
        clean.append(torch.tensor(match[1]))
        pers.append(torch.tensor(p_ids))
        right.append(r_tok)
        pushed.append(w_tok)
        texts.append((match[0], p_text))
    return PairSet(kept, clean, pers, torch.tensor(right), torch.tensor(pushed), spans, texts)


def split_halves(pairs: PairSet, seed: int = 0) -> tuple[PairSet, PairSet]:
    """(discovery half, held-out half), drawn at random with `seed`."""
    idx = list(range(len(pairs)))
    random.Random(seed).shuffle(idx)
    half = len(idx) // 2
    return pairs.subset(sorted(idx[:half])), pairs.subset(sorted(idx[half:]))


# ---------------------------------------------------------------------------------------- scores
def logit_diff_fn(right: Tensor, pushed: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The engine's score: logit(right) - logit(pushed) at the last position, per row's pair
    (`caap.patching.logit_diff_score`: built for len(right) pairs, it refuses to be used on more)."""
    from caap.patching.scores import logit_diff_score

    return logit_diff_score(right, pushed, pos=-1)


@dataclass
class Behaviour:
    """Per pair: logit differences (right - pushed) on clean and persuaded prompts, and the attention of
    every head from the answer position ([n, layer, head, pos] lists, one per pair: lengths differ),
    the heads' z and q at the answer position ([n, layer, head, d_head])."""

    ld_clean: Tensor
    ld_persuaded: Tensor
    attn_clean: list[Tensor]
    attn_persuaded: list[Tensor]
    z_clean: Tensor
    z_persuaded: Tensor
    q_clean: Tensor
    q_persuaded: Tensor

    def subset(self, idx: Sequence[int]) -> "Behaviour":
        idx = list(idx)
        return Behaviour(self.ld_clean[idx], self.ld_persuaded[idx], [self.attn_clean[i] for i in idx],
                         [self.attn_persuaded[i] for i in idx], self.z_clean[idx], self.z_persuaded[idx],
                         self.q_clean[idx], self.q_persuaded[idx])

    @property
    def effect(self) -> Tensor:
        """How much the persuasion lowers the logit difference, per pair (positive: it works)."""
        return self.ld_clean - self.ld_persuaded


@torch.inference_mode()
def measure(model: Any, pairs: PairSet, batch_size: int = 16) -> Behaviour:
    """One forward pass of every clean and persuaded prompt (batched by length), reading the logit
    difference, and each head's attention row, z and q at the answer position."""
    batch_size = check_positive_int(batch_size, "batch_size")
    n, L, H = len(pairs), model.cfg.n_layers, model.cfg.n_heads
    ld = {k: torch.zeros(n) for k in ("clean", "persuaded")}
    attn: dict[str, list[Any]] = {k: [None] * n for k in ld}
    zs = {k: torch.zeros(n, L, H, model.cfg.d_head) for k in ld}
    qs = {k: torch.zeros(n, L, H, model.cfg.d_head) for k in ld}
    for group in pairs.groups():
        for b0 in range(0, len(group), batch_size):
            idx = group[b0 : b0 + batch_size]
            clean, persuaded = pairs.batch(idx)
            check_tokens(model, clean, persuaded)
            for kind, toks in (("clean", clean), ("persuaded", persuaded)):
                store: dict[tuple[str, int], Tensor] = {}
                hooks = [(f"blocks.{layer}.attn.hook_{what}", _grabber(store, what, layer))
                         for layer in range(L) for what in ("pattern", "z", "q")]
                with last_position_logits(model), model.hooks(fwd_hooks=hooks):
                    logits = model(toks)
                ld[kind][idx] = (logits[:, -1].gather(1, pairs.right_tok[idx, None]) -
                                 logits[:, -1].gather(1, pairs.pushed_tok[idx, None]))[:, 0].float().cpu()
                pat = torch.stack([store["pattern", layer] for layer in range(L)], 1)  # [b, L, H, pos]
                for j, i in enumerate(idx):
                    attn[kind][i] = pat[j]
                zs[kind][idx] = torch.stack([store["z", layer] for layer in range(L)], 1)
                qs[kind][idx] = torch.stack([store["q", layer] for layer in range(L)], 1)
    return Behaviour(ld["clean"], ld["persuaded"], attn["clean"], attn["persuaded"], zs["clean"], zs["persuaded"],
                     qs["clean"], qs["persuaded"])


def _grabber(store: dict[tuple[str, int], Tensor], what: str, layer: int) -> Callable:
    """A hook keeping the answer position's row (the pattern's query row) on the CPU."""

    def hook(act: Tensor, hook: Any) -> None:
        store[what, layer] = (act[:, :, -1] if what == "pattern" else act[:, -1]).float().cpu()

    return hook


def effect_table(b: Behaviour) -> dict[str, tuple[float, float, int]]:
    """(mean, 95% half-width, n) of: logit difference clean / persuaded, the persuasion effect, clean
    accuracy (right option ahead), persuaded accuracy, and the flip rate (right on clean, pushed ahead
    on persuaded, among the pairs right on clean)."""
    right_clean = b.ld_clean > 0
    flips = (b.ld_persuaded[right_clean] < 0).float()
    return {
        "logit diff, clean": mean_ci(b.ld_clean),
        "logit diff, persuaded": mean_ci(b.ld_persuaded),
        "persuasion effect (clean - persuaded)": mean_ci(b.effect),
        "pairs where persuasion lowers the logit diff": mean_ci((b.effect > 0).float()),
        "accuracy, clean": mean_ci(right_clean.float()),
        "accuracy, persuaded": mean_ci((b.ld_persuaded > 0).float()),
        "flip rate (of those right on clean)": mean_ci(flips),
    }


# ---------------------------------------------------------------------------------------- patching
def head_patching(model: Any, pairs: PairSet, idx: Sequence[int], layers: Sequence[int] | None = None,
                  batch_size: int | None = None) -> dict[str, Tensor]:
    """Every head's output (`hook_z`) at the answer position patched through the engine, one head per
    batch row: persuaded -> clean ("sufficiency": how much of the persuasion one head carries in) and
    clean -> persuaded ("necessity": how much of the clean answer it restores). Normalised per pair:
    0 = the unpatched run, 1 = the other prompt's logit difference. Returns [len(idx), layer, head] each
    (0 in the layers not in `layers`)."""
    from caap.patching import sweep

    idx = check_indices(idx, len(pairs), "pair index")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    out: dict[str, list[Tensor]] = {"persuaded->clean": [], "clean->persuaded": []}
    for i in idx:
        clean, persuaded = pairs.batch([i])
        check_tokens(model, clean, persuaded)
        score = logit_diff_fn(pairs.right_tok[[i]], pairs.pushed_tok[[i]])
        for name, src, ctx in (("persuaded->clean", persuaded, clean), ("clean->persuaded", clean, persuaded)):
            with last_position_logits(model):
                r = sweep(model, src, ctx, score, component="z", layers=layers, positions=[-1], per_position=True,
                          batch_size=batch_size, progress=False)
            full = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
            v = r.values[0, :, 0, :].float().cpu()  # [layers swept, head]
            full[r.coords["layer"]] = (v - r.context_score[0].cpu()) / (r.source_score[0] - r.context_score[0]).cpu()
            out[name].append(full)
    return {k: torch.stack(v) for k, v in out.items()}


def path_patching_to_logits(model: Any, pairs: PairSet, idx: Sequence[int], senders: Sequence[tuple[int, int]],
                            batch_size: int | None = None) -> Tensor:
    """Each sender head's direct path to the logits (persuaded -> clean, every other head frozen to the
    clean run; `caap.patching.path_patch`), normalised per pair as in `head_patching`: [len(idx), n_senders]."""
    from caap.patching import path_patch

    senders = check_heads(model, senders)
    idx = check_indices(idx, len(pairs), "pair index")
    rows = []
    for i in idx:
        clean, persuaded = pairs.batch([i])
        score = logit_diff_fn(pairs.right_tok[[i]], pairs.pushed_tok[[i]])
        with torch.inference_mode(), last_position_logits(model):
            c, p = score(model(clean), torch.tensor([0])), score(model(persuaded), torch.tensor([0]))
            v = path_patch(model, persuaded, clean, score, senders=senders, receivers="logits", batch_size=batch_size,
                           progress=False)[0]
        rows.append(((v - c) / (p - c)).cpu())
    return torch.stack(rows)


def top_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of largest mean score over the first axis of `scores` [n, layer, head]."""
    mean = scores.mean(0)
    k = check_int(k, "k", 1, mean.numel())
    order = mean.flatten().argsort(descending=True)[:k]
    return [divmod(int(i), mean.shape[1]) for i in order]


def attention_to_spans(b: Behaviour, pairs: PairSet, heads: Sequence[tuple[int, int]]) -> dict[tuple[str, str], tuple]:
    """Attention of each head from the answer position to the right option, the pushed option (both in
    the option list) and the hint words (the pushed option in the persuasion sentence; the neutral words
    at those positions in the clean prompt), clean vs persuaded: {(head, target): (clean ci, persuaded ci)}."""
    out = {}
    for layer, head in heads:
        for target in ("right", "pushed", "hint"):
            vals = {}
            for kind, att in (("clean", b.attn_clean), ("persuaded", b.attn_persuaded)):
                vals[kind] = mean_ci([float(att[i][layer, head, pairs.spans[i][target]].sum()) for i in range(len(pairs))])
            out[(f"L{layer}H{head}", target)] = (vals["clean"], vals["persuaded"])
    return out


# ---------------------------------------------------------------------------------------- interventions
@torch.inference_mode()
def residual_streams(model: Any, pairs: PairSet, batch_size: int = 16) -> dict[str, list[Tensor]]:
    """Every pair's residual stream entering every block, clean and persuaded: {kind: [pair][layer, pos,
    d_model]}, so that edited runs start at their first edited block without recomputing the blocks
    before it (one forward per prompt, once)."""
    batch_size = check_positive_int(batch_size, "batch_size")
    L = model.cfg.n_layers
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)]
    out: dict[str, list[Any]] = {"clean": [None] * len(pairs), "persuaded": [None] * len(pairs)}
    for group in pairs.groups():
        for b0 in range(0, len(group), batch_size):
            idx = group[b0 : b0 + batch_size]
            clean, persuaded = pairs.batch(idx)
            for kind, toks in (("clean", clean), ("persuaded", persuaded)):
                with last_position_logits(model):
                    _, cache = model.run_with_cache(toks, names_filter=names)
                stacked = torch.stack([cache[n] for n in names], 1)  # [b, L, pos, d]
                for j, i in enumerate(idx):
                    out[kind][i] = stacked[j]
    return out


@torch.inference_mode()
def run_edited(model: Any, pairs: PairSet, edits: dict[str, Callable[[Tensor], Tensor]], which: str,
               resid: dict[str, list[Tensor]], batch_size: int = 16) -> Tensor:
    """Logit difference of every pair's `which` prompt ("clean" / "persuaded") with `edits` applied at the
    answer position: {hook name: f(activation at the last position [b, ...]) -> new value}. Runs start at
    the earliest edited block (`start_at_layer`) from the residual streams `resid` (`residual_streams`)."""
    from caap.patching.engine import hook_layer

    batch_size = check_positive_int(batch_size, "batch_size")
    first = min(hook_layer(h) for h in edits)
    out = torch.zeros(len(pairs))

    def make(fn: Callable[[Tensor], Tensor]) -> Callable:
        def hook(act: Tensor, hook: Any) -> Tensor:
            act = act.clone()
            act[:, -1] = fn(act[:, -1]).to(act.dtype)
            return act

        return hook

    for group in pairs.groups():
        for b0 in range(0, len(group), batch_size):
            idx = group[b0 : b0 + batch_size]
            x = torch.stack([resid[which][i][first] for i in idx])
            with last_position_logits(model), model.hooks(fwd_hooks=[(h, make(fn)) for h, fn in edits.items()]):
                logits = model(x, start_at_layer=first)
            out[idx] = (logits[:, -1].gather(1, pairs.right_tok[idx, None]) -
                        logits[:, -1].gather(1, pairs.pushed_tok[idx, None]))[:, 0].float().cpu()
    return out


def mean_ablation(heads: Sequence[tuple[int, int]], mean_z: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
    """Edits that set each head's z at the answer position to its mean (`mean_z` [layer, head, d_head])."""
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)

    def fn(layer: int, hs: list[int]) -> Callable[[Tensor], Tensor]:
        def edit(z: Tensor) -> Tensor:
            z = z.clone()
            z[:, hs] = mean_z[layer, hs].to(z.device, z.dtype)
            return z

        return edit

    return {f"blocks.{layer}.attn.hook_z": fn(layer, hs) for layer, hs in by_layer.items()}


def direction_edit(heads: Sequence[tuple[int, int]], directions: Tensor, mode: str = "project") -> dict[str, Callable]:
    """Edits of each head's query at the answer position along one direction per head (`directions`
    [len(heads), d_head]): "project" removes the query's component along it, "subtract" subtracts the
    direction itself (e.g. the mean persuaded - clean difference)."""
    by_layer: dict[int, list[tuple[int, Tensor]]] = {}
    for (layer, head), d in zip(heads, directions):
        by_layer.setdefault(layer, []).append((head, d))

    def fn(items: list[tuple[int, Tensor]]) -> Callable[[Tensor], Tensor]:
        def edit(q: Tensor) -> Tensor:
            q = q.clone()
            for head, d in items:
                d = d.to(q.device, q.dtype)
                if mode == "project":
                    u = d / d.norm()
                    q[:, head] = q[:, head] - (q[:, head] @ u)[:, None] * u
                else:
                    q[:, head] = q[:, head] - d
            return q

        return edit

    return {f"blocks.{layer}.attn.hook_q": fn(items) for layer, items in by_layer.items()}


def removed_fraction(ld_clean: Tensor, ld_persuaded: Tensor, ld_clean_edited: Tensor, ld_persuaded_edited: Tensor) -> float:
    """Share of the persuasion an edit of the model removes: 1 - (mean persuasion effect with the edit,
    clean and persuaded prompts both edited) / (mean effect without it). 0 = nothing, 1 = all of it;
    an edit that moves clean and persuaded prompts alike removes nothing."""
    base = float((ld_clean - ld_persuaded).mean())
    return 1 - float((ld_clean_edited - ld_persuaded_edited).mean()) / base if base else math.nan


def random_head_sets(model: Any, k: int, n: int, exclude: Sequence[tuple[int, int]], seed: int = 0) -> list[list[tuple[int, int]]]:
    """n random sets of k heads, none of them in `exclude`."""
    rng = random.Random(seed)
    excluded = set(check_heads(model, exclude))
    pool = [(layer, h) for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads) if (layer, h) not in excluded]
    k = check_int(k, "k", 1, len(pool))
    n = check_positive_int(n, "n")
    return [sorted(rng.sample(pool, k)) for _ in range(n)]
