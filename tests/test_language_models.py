"""Language models: the engine on TransformerLens 4's TransformerBridge, the loader, the persuasion prompts.

The bridge tests build a small random Llama (grouped-query attention, rotary, gated MLP, RMSNorm: the
SmolLM2 architecture) from a config, with a word-level tokenizer (`tiny_llama`): no download. Every engine
result is compared with a plain loop of one full forward pass per intervention (`run_with_hooks`).
Tests of the real SmolLM2 GGUF need ../shared (or $CAAP_SHARED_DIR) and skip without it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from tiny_llama import VOCAB, hf_llama, llama_bridge, word_tokenizer

from caap.language_models import check_heads, check_tokens, load_language_model
from caap.patching import Intervention, Write, logit_diff_score, path_patch, run_interventions, sweep

TOL = 1e-4


@pytest.fixture(scope="module")
def bridge():
    return llama_bridge()


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 7), generator=g), torch.randint(0, VOCAB, (2, 7), generator=g)


def _score():
    return logit_diff_score(torch.tensor([3, 5]), torch.tensor([4, 6]))


def _loop(model, sources, contexts, rows, score):
    """One full forward per intervention: each write copies the source's activation (pos, head) into the
    context run at that hook point."""
    _, src = model.run_with_cache(sources)
    out = []
    for iv in rows:
        def patch(act, hook, iv=iv):
            act = act.clone()
            for w in iv.writes:
                if hook.name != w.hook and not _same_point(model, hook.name, w.hook):
                    continue
                s = src[w.hook][iv.source : iv.source + 1]
                idx = [slice(None)] * act.ndim
                if w.pos is not None:
                    idx[2 if w.hook.endswith("hook_pattern") else 1] = w.pos
                if w.head is not None:
                    idx[1 if w.hook.endswith("hook_pattern") else 2] = w.head
                act[tuple(idx)] = s[tuple(idx)]
            return act

        names = sorted({w.hook for w in iv.writes})
        with torch.no_grad():
            logits = model.run_with_hooks(contexts[iv.context : iv.context + 1], fwd_hooks=[(n, patch) for n in names])
        out.append(score(logits, torch.tensor([iv.context]))[0])
    return torch.stack(out)


def _same_point(model, a, b):
    d = model.hook_dict
    return a in d and b in d and d[a] is d[b]


# ------------------------------------------------------------------------------- the engine on a bridge
def test_bridge_matches_hugging_face_and_starts_at_a_layer(bridge, pair):
    clean = pair[0]
    hf = bridge.original_model
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(clean)
        torch.testing.assert_close(logits, hf(clean).logits, atol=1e-5, rtol=0)
        for layer in range(3):  # blocks before start_at_layer are skipped (caap's fast start), same result
            torch.testing.assert_close(bridge(cache[f"blocks.{layer}.hook_resid_pre"], start_at_layer=layer), logits,
                                       atol=1e-5, rtol=0)
    assert bridge.__dict__.get("_caap_fast_start") is True


def test_sweeps_on_bridge_match_one_forward_per_intervention(bridge, pair):
    clean, corrupt = pair
    score = _score()
    res = sweep(bridge, clean, corrupt, score, component=["resid_pre", "attn_out"], batch_size=5, progress=False)
    assert res.dims == ("pair", "component", "layer", "pos") and res.values.shape == (2, 2, 3, 7)
    rows = [Intervention.single(f"blocks.{layer}.hook_{c}", p, source=i, context=i)
            for i in range(2) for c in ("resid_pre", "attn_out") for layer in range(3) for p in range(7)]
    torch.testing.assert_close(res.values.flatten(), _loop(bridge, clean, corrupt, rows, score), atol=TOL, rtol=0)
    # each head's output at the last position, and over every position
    for per_position, positions in ((True, [-1]), (False, None)):
        heads = sweep(bridge, clean, corrupt, score, component="z", positions=positions, per_position=per_position,
                      batch_size=7, progress=False)
        rows = [Intervention.single(f"blocks.{layer}.attn.hook_z", 6 if per_position else None, h, source=i, context=i)
                for i in range(2) for layer in range(3) for h in range(4)]
        torch.testing.assert_close(heads.values.flatten(), _loop(bridge, clean, corrupt, rows, score), atol=TOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(res.source_score, score(bridge(clean), torch.tensor([0, 1])), atol=TOL, rtol=0)


def test_run_interventions_on_bridge_several_writes_per_row(bridge, pair):
    clean, corrupt = pair
    score = _score()
    rows = [
        Intervention((Write("blocks.0.attn.hook_z", 6, 1), Write("blocks.2.attn.hook_z", 6, 3)), source=0, context=0),
        Intervention((Write("blocks.1.hook_resid_pre", 2), Write("blocks.1.attn.hook_pattern", 6, 0)), source=1, context=1),
        Intervention((Write("blocks.2.hook_mlp_out", None),), source=1, context=0),
        Intervention((Write("blocks.0.attn.hook_v", 3, 1),), source=0, context=1),  # a key/value head (GQA)
    ]
    fast = run_interventions(bridge, rows, clean, corrupt, score, batch_size=2)
    torch.testing.assert_close(fast, _loop(bridge, clean, corrupt, rows, score), atol=TOL, rtol=0)
    # hooks are gone afterwards
    with torch.no_grad():
        torch.testing.assert_close(bridge(clean), bridge.original_model(clean).logits, atol=1e-5, rtol=0)


def test_path_patching_to_logits_on_bridge(bridge, pair):
    clean, corrupt = pair
    score = _score()
    senders = [(layer, h) for layer in range(3) for h in range(4)]
    fast = path_patch(bridge, clean, corrupt, score, senders=senders, receivers="logits", batch_size=5, progress=False)
    _, src = bridge.run_with_cache(clean)
    _, ctx = bridge.run_with_cache(corrupt)
    for i in range(2):
        for j, (sl, sh) in enumerate(senders):
            def freeze(act, hook, i=i, sl=sl, sh=sh):
                name = next(n for n in (f"blocks.{k}.attn.hook_z" for k in range(3)) if _same_point(bridge, n, hook.name))
                out = ctx[name][i : i + 1].clone()
                if name == f"blocks.{sl}.attn.hook_z":
                    out[:, :, sh] = src[name][i : i + 1, :, sh]
                return out

            with torch.no_grad():
                lg = bridge.run_with_hooks(corrupt[i : i + 1], fwd_hooks=[(f"blocks.{k}.attn.hook_z", freeze) for k in range(3)])
            torch.testing.assert_close(fast[i, j], score(lg, torch.tensor([i]))[0], atol=TOL, rtol=0)


def test_unknown_heads_layers_and_hooks_are_refused(bridge, pair):
    clean, corrupt = pair
    score = _score()
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        sweep(bridge, clean, corrupt, score, component="z", layers=[5], progress=False)
    with pytest.raises(ValueError, match="head 9 is out of range"):
        sweep(bridge, clean, corrupt, score, component="z", heads=[9], progress=False)
    with pytest.raises(ValueError, match=r"head \(0, 4\) is out of range"):
        path_patch(bridge, clean, corrupt, score, senders=[(0, 4)], progress=False)
    with pytest.raises(ValueError, match=r"head \(3, 0\) is out of range"):
        path_patch(bridge, clean, corrupt, score, senders=[(3, 0)], progress=False)
    with pytest.raises(ValueError, match="unknown hook name"):
        run_interventions(bridge, [Intervention.single("blocks.0.attn.hook_nope", 1)], clean, corrupt, score)
    with pytest.raises(IndexError, match="head 4 is out of range"):
        run_interventions(bridge, [Intervention.single("blocks.0.attn.hook_z", 1, 4)], clean, corrupt, score)
    with pytest.raises(ValueError, match=r"head \(3, 0\) is out of range"):
        check_heads(bridge, [(3, 0)])
    with pytest.raises(ValueError, match=r"head \(0, 4\) is out of range"):
        check_heads(bridge, [(0, 4)])
    assert check_heads(bridge, [(2, 3)]) == [(2, 3)]


def test_prompts_too_long_or_of_different_lengths_are_refused(bridge, pair):
    clean, corrupt = pair
    score = _score()
    too_long = torch.zeros(1, bridge.cfg.n_ctx + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="longer than the model's context"):
        check_tokens(bridge, too_long)
    with pytest.raises(ValueError, match="differ in length"):
        check_tokens(bridge, clean, corrupt[:, :5])
    check_tokens(bridge, clean, corrupt)
    with pytest.raises(ValueError, match="positions would not align"):
        sweep(bridge, clean, corrupt[:, :5], score, component="z", progress=False)


# ------------------------------------------------------------------------------- the loader
def test_loader_refuses_missing_and_unreadable_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(FileNotFoundError, match="no language model at"):
        load_language_model(tmp_path / "nothing.gguf")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_language_model(tmp_path)  # an empty folder
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a language model file"):
        load_language_model(tmp_path / "notes.txt")
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_language_model(bad)
    truncated = tmp_path / "truncated" / "model.gguf"
    truncated.parent.mkdir()
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic, then nothing
    with pytest.raises(ValueError, match="could not load a causal language model"):
        load_language_model(truncated.parent)  # a folder with one .gguf file
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="needs the `gguf` package"):
        load_language_model(truncated)


def test_loader_reads_a_hugging_face_folder(tmp_path: Path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    model = load_language_model(tmp_path)
    tokens = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-5, rtol=0)
    assert model.tokenizer is not None and model.cfg.n_layers == 3


def _shared_gguf() -> Path:
    from caap.language_models import shared_language_model

    path = shared_language_model()
    if path is None:
        pytest.skip("needs ../shared/models/SmolLM2-135M-Instruct.Q4_1.gguf (or $CAAP_SHARED_DIR)")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("reading GGUF needs the `gguf` package (pip install -e .)")
    return path


@pytest.mark.slow
@pytest.mark.shared_data
def test_smollm2_gguf_loads_and_knows_paris():
    model = load_language_model(_shared_gguf())
    assert (model.cfg.n_layers, model.cfg.n_heads) == (30, 9)
    tokens = model.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(tokens)
        hf_logits = model.original_model(tokens).logits
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=0)
    assert model.tokenizer.decode(logits[0, -1].argmax()) == " Paris"


@pytest.mark.shared_data
def test_persuasion_prompt_pairs_align():
    from transformers import AutoTokenizer

    from caap import persuasion as P

    path = _shared_gguf()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    questions = P.build_questions()
    pairs = P.build_pairs(tok, questions)
    assert len(questions) >= 200 and len(pairs) >= 200
    for i in range(len(pairs)):
        c, p = pairs.clean[i], pairs.persuaded[i]
        assert c.shape == p.shape
        diff = (c != p).nonzero().flatten().tolist()
        assert diff and min(diff) > max(pairs.spans[i]["pushed"] + pairs.spans[i]["right"])  # options align
        q = pairs.questions[i]
        assert tok.decode(p[pairs.spans[i]["hint"]]).strip() == q.wrong
        assert tok.decode(p[pairs.spans[i]["right"]]).strip() == q.right
        assert pairs.right_tok[i] != pairs.pushed_tok[i]
    disc, held = P.split_halves(pairs)
    assert len(disc) + len(held) == len(pairs) and not {q.text for q in disc.questions} & {q.text for q in held.questions}
    with pytest.raises(ValueError, match="longer than the model's context"):
        P.build_pairs(tok, questions[:3], n_ctx=20)


def test_path_patching_to_shared_keys_or_values_is_refused(bridge, pair):
    """Grouped-query attention: k and v belong to a group of query heads, so a k/v receiver is refused
    (q receivers and the logits work)."""
    clean, corrupt = pair
    with pytest.raises(ValueError, match="n_key_value_heads=2"):
        path_patch(bridge, clean, corrupt, _score(), senders=[(0, 1)], receivers=[(1, 0)], receiver_input="k",
                   progress=False)
    path_patch(bridge, clean, corrupt, _score(), senders=[(0, 1)], receivers=[(1, 0)], receiver_input="q",
               progress=False)
