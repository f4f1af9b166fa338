"""Decoding: cached/batched parity, CFG, CD-K against the formula, top-p, mixed, instruct-CFG,
exact image token counts, infilling (text and image), CLIP re-ranking helpers."""

import numpy as np
import pytest
import torch

from cm3leon.data.sequences import Document, edit_prompts, infill_prompt, text_to_image_prompt, unconditional_prompt
from cm3leon.generation.rerank import best_per_prompt
from cm3leon.generation.sampling import (
    DecodingConfig,
    Picker,
    cdk_candidates,
    cdk_scores,
    filter_top_k,
    filter_top_p,
    guided_logits,
    id_mask,
    instruct_cfg_logits,
    mixed_rows,
)
from cm3leon.generation.session import DecodeSession, sample_fixed, sample_until
from cm3leon.generation.tasks import (
    caption_images,
    edit_images,
    generate,
    generate_images,
    image_region_spans,
    infill_images,
)
from cm3leon.model import CM3LeonLM, ModelConfig
from cm3leon.vocab import EOS_ID, UNK_ID, Vocab
from project import CONF_DIR

VOCAB = Vocab(text_size=40, n_image_codes=32, n_sentinels=4)  # 72 base ids + specials -> 80 rows
TPI = 16  # tokens per image of the toy tokenizer (a 4x4 code grid)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: more threads only add synchronisation on a shared CPU. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(attn_impl: str = "sdpa", seed: int = 0) -> CM3LeonLM:
    """A small random model with non-zero residual outputs, so that every layer does something."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        n_layer=2,
        d_model=32,
        n_head=2,
        vocab_size=VOCAB.size,
        max_seq_len=128,
        zero_init_residual_out=False,
        init_std=0.1,
        pos_init_std=0.1,
        attn_impl=attn_impl,
    )
    return CM3LeonLM(cfg).eval()


def rand_text(n: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(4, VOCAB.text_size, n).tolist()


def last_logits(model, seq: list[int]) -> torch.Tensor:
    """Reference: the full (uncached) forward's next-token logits [V]."""
    with torch.no_grad():
        return model(torch.tensor([seq]))[0, -1]


def greedy_reference(model, prompt: list[int], n: int, allowed: torch.Tensor, stop: int | None = None) -> list[int]:
    """Reference greedy decoding by repeated full forwards (no cache), restricted to `allowed`."""
    seq, out = list(prompt), []
    for _ in range(n):
        tok = int(last_logits(model, seq).masked_fill(~allowed, float("-inf")).argmax())
        if tok == stop:
            break
        out.append(tok)
        seq.append(tok)
    return out


# ---- the cached, padded, batched forward ---------------------------------------------------------
@pytest.mark.parametrize("attn_impl,static", [("sdpa", False), ("sdpa", True), ("math", False)])
def test_padded_session_matches_full_forward(attn_impl, static):
    """Rows with prompts of different lengths in one cache: every step's logits equal the full forward."""
    model = tiny_model(attn_impl)
    rng = np.random.default_rng(0)
    prompts = [[EOS_ID] + rand_text(n, rng) for n in (9, 1, 5, 12)]
    with torch.no_grad():
        s = DecodeSession(model, prompts, n_streams=1, max_new_tokens=6, static=static)
        assert (s.cache.limit is None) == static
        seqs = [list(p) for p in prompts]
        for step in range(6):
            for r, seq in enumerate(seqs):
                torch.testing.assert_close(s.logits[0, r], last_logits(model, seq), atol=1e-4, rtol=0)
            tok = torch.tensor(rng.integers(0, VOCAB.size, len(prompts)))
            for r in range(len(seqs)):
                seqs[r].append(int(tok[r]))
            if step < 5:
                s.feed(tok)
        # all positions of a padded prefill agree too: the model's own forward with a cache that
        # knows each row's padding
        P = len(prompts[0])
        cache = model.new_cache(2, P, start=torch.tensor([0, P - 2]))
        idx = torch.tensor([prompts[0], [1] * (P - 2) + prompts[1]])
        out = model(idx, torch.arange(P), cache)
        torch.testing.assert_close(out[0], model(torch.tensor([prompts[0]]))[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(out[1, -2:], model(torch.tensor([prompts[1]]))[0], atol=1e-4, rtol=0)
    s.feed(tok)  # the 6th new token: the cache is sized for exactly max_new_tokens
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.feed(tok)


def test_batched_cfg_streams_equal_separate_forwards():
    """cond and uncond streams in one forward batch == each stream decoded on its own."""
    model = tiny_model()
    rng = np.random.default_rng(1)
    caps = [rand_text(7, rng), rand_text(3, rng)]
    cond = [text_to_image_prompt(c, VOCAB) for c in caps]
    uncond = [unconditional_prompt(VOCAB)] * 2
    assert uncond[0] == [EOS_ID, VOCAB.sentinel_id(0), VOCAB.break_id]
    toks = [torch.tensor(VOCAB.codes_to_ids(rng.integers(0, 32, 2))) for _ in range(4)]
    with torch.no_grad():
        both = DecodeSession(model, cond + uncond, n_streams=2, max_new_tokens=4)
        alone = [DecodeSession(model, p, 1, 4) for p in (cond, uncond)]
        for t in toks:
            for s, a in enumerate(alone):
                torch.testing.assert_close(both.logits[s], a.logits[0], atol=1e-5, rtol=0)
            both.feed(t)
            for a in alone:
                a.feed(t)
    # and the guided logits are the formula applied to separate forwards
    w = 3.0
    guided = Picker(DecodingConfig(guidance_scale=w)).expert(both.logits)
    ref = torch.stack([last_logits(model, cond[b] + [int(t[b]) for t in toks]) for b in range(2)])
    ref_u = torch.stack([last_logits(model, uncond[b] + [int(t[b]) for t in toks]) for b in range(2)])
    torch.testing.assert_close(guided, ref_u + w * (ref - ref_u), atol=1e-4, rtol=0)


def test_guidance_scale_one_reproduces_plain_conditional_sampling():
    model = tiny_model()
    rng = np.random.default_rng(2)
    caps = [rand_text(5, rng) for _ in range(3)]
    allowed = id_mask(VOCAB.size, [VOCAB.image_id_range])

    def run(with_uncond: bool, w: float) -> torch.Tensor:
        prompts = [text_to_image_prompt(c, VOCAB) for c in caps]
        if with_uncond:
            prompts += [unconditional_prompt(VOCAB)] * len(caps)
        with torch.no_grad():
            s = DecodeSession(model, prompts, 2 if with_uncond else 1, TPI)
            gen = torch.Generator().manual_seed(7)
            return sample_fixed(s, Picker(DecodingConfig(guidance_scale=w, top_p=0.9), gen), TPI, allowed)

    plain = run(False, 1.0)
    assert torch.equal(run(True, 1.0), plain)  # two batched streams, weight 1 == the cond stream alone
    assert not torch.equal(run(True, 3.0), plain)  # guidance does change the samples
    # generate_images with weight 1 skips the unconditional stream and gives the same samples
    codes = generate_images(model, VOCAB, caps, TPI, decoding=DecodingConfig(top_p=0.9), seed=7)
    assert torch.equal(codes, VOCAB.ids_to_codes(plain))


def test_truncation_on_the_conditional_stream_samples_guided_probabilities_over_its_top_p_set():
    """truncate_on=conditional: candidates = the cond stream's top-p set; each candidate's chance =
    its guided probability renormalised over that set (checked by counting 20,000 draws)."""
    torch.manual_seed(3)
    cond, uncond = torch.randn(1, 12) * 2, torch.randn(1, 12) * 2
    cond[0, 0], uncond[0, 0] = -3.0, -12.0  # implausible under cond, far likelier than uncond thinks
    w, p = 3.0, 0.8
    guided = uncond + w * (cond - uncond)
    keep = torch.isfinite(filter_top_p(cond, p))[0]
    assert not keep[0] and guided[0].argmax() == 0  # guided-first truncation would favour token 0
    expect = torch.zeros(12).masked_scatter(keep, guided[0][keep].softmax(-1))
    n = 20000
    streams = torch.stack([cond, uncond]).expand(2, n, 12)
    picked = Picker(
        DecodingConfig(guidance_scale=w, top_p=p, truncate_on="conditional"), torch.Generator().manual_seed(0)
    )(streams)
    freq = torch.bincount(picked, minlength=12).double() / n
    assert freq[~keep].sum() == 0
    torch.testing.assert_close(freq, expect.double(), atol=0.015, rtol=0)
    default = Picker(DecodingConfig(guidance_scale=w, top_p=p), torch.Generator().manual_seed(0))(streams)
    assert (default == 0).double().mean() > 0.5  # the default (guided) order: token 0 dominates
    # weight 1: both orders are the same sampler
    one = [
        Picker(DecodingConfig(guidance_scale=1.0, top_p=p, truncate_on=t), torch.Generator().manual_seed(1))(streams)
        for t in ("guided", "conditional")
    ]
    assert torch.equal(one[0], one[1])
    with pytest.raises(ValueError, match="truncate_on"):
        DecodingConfig(truncate_on="amateur")


# ---- pure processors against direct implementations ------------------------------------------------
def test_top_p_keeps_the_smallest_set_reaching_p():
    torch.manual_seed(0)
    logits = torch.randn(64, 50) * 2
    for p in (0.05, 0.3, 0.8, 0.95):
        kept = torch.isfinite(filter_top_p(logits, p))
        probs = logits.softmax(-1).double()
        for row in range(logits.shape[0]):
            order = probs[row].argsort(descending=True)
            m = int((probs[row][order].cumsum(0) < p).sum()) + 1  # smallest m with mass >= p
            expect = torch.zeros(50, dtype=torch.bool)
            expect[order[:m]] = True
            assert torch.equal(kept[row], expect), (p, row)
            assert probs[row][kept[row]].sum() >= p - 1e-6
    assert torch.isfinite(filter_top_k(logits, 5)).sum(-1).eq(5).all()


def direct_cdk(cond: np.ndarray, uncond: np.ndarray, alpha: float, k: int, tau: float):
    """PAPER.md section 5 written out per row with numpy: (candidate mask, scores)."""

    def log_softmax(x):
        x = x - x.max()
        return x - np.log(np.exp(x).sum())

    masks, scores = [], []
    for c, u in zip(cond.astype(np.float64), uncond.astype(np.float64)):
        p = np.exp(log_softmax(c))
        kth = np.sort(p)[::-1][k - 1]
        keep = p >= alpha * kth
        s = np.where(keep, log_softmax(c) - log_softmax(u / tau), -np.inf)
        masks.append(keep)
        scores.append(s)
    return np.array(masks), np.array(scores)


@pytest.mark.parametrize("alpha,k,tau", [(0.5, 1, 0.5), (0.5, 5, 0.5), (0.1, 3, 1.0), (0.9, 10, 0.25)])
def test_cdk_candidates_and_scores_match_the_formula(alpha, k, tau):
    torch.manual_seed(1)
    cond, uncond = torch.randn(16, 40) * 3, torch.randn(16, 40) * 3
    mask, scores = direct_cdk(cond.numpy(), uncond.numpy(), alpha, k, tau)
    assert np.array_equal(cdk_candidates(cond, alpha, k).numpy(), mask)
    got = cdk_scores(cond, uncond, alpha=alpha, k=k, amateur_temperature=tau).double().numpy()
    assert np.array_equal(np.isfinite(got), mask) and mask.sum(1).min() >= min(k, 40) * (alpha <= 1)
    np.testing.assert_allclose(got[mask], scores[mask], atol=1e-5)
    # the picker (cfg weight 1: the expert is the conditional stream), greedy: argmax of the scores
    picker = Picker(
        DecodingConfig(strategy="cdk", temperature=0.0, cdk_alpha=alpha, cdk_k=k, cdk_amateur_temperature=tau)
    )
    assert np.array_equal(picker(torch.stack([cond, uncond])).numpy(), scores.argmax(1))
    # CD-K draws only from the candidate set
    picker = Picker(
        DecodingConfig(strategy="cdk", temperature=1.0, cdk_alpha=alpha, cdk_k=k, cdk_amateur_temperature=tau),
        torch.Generator().manual_seed(0),
    )
    for _ in range(5):
        ids = picker(torch.stack([cond, uncond]))
        assert mask[np.arange(16), ids.numpy()].all()


def test_cdk_with_guidance_and_restriction():
    """With CFG the expert is the guided stream; with a restriction both distributions live on it."""
    torch.manual_seed(2)
    cond, uncond = torch.randn(4, 80), torch.randn(4, 80)
    allowed = id_mask(80, [VOCAB.image_id_range])
    lo, hi = VOCAB.image_id_range
    guided = guided_logits(cond, uncond, 3.0)
    _, scores = direct_cdk(guided[:, lo:hi].numpy(), uncond[:, lo:hi].numpy(), 0.5, 5, 0.5)
    picker = Picker(DecodingConfig(strategy="cdk", temperature=0.0, guidance_scale=3.0))
    assert np.array_equal(picker(torch.stack([cond, uncond]), allowed).numpy(), scores.argmax(1) + lo)


def test_mixed_strategy_splits_samples_half_and_half():
    torch.manual_seed(3)
    cond, uncond = torch.randn(8, 40) * 3, torch.randn(8, 40) * 3
    rows = mixed_rows(0, 8)
    assert rows.tolist() == [False, True] * 4 and mixed_rows(1, 2).tolist() == [True, False]
    cfg = DecodingConfig(strategy="mixed", temperature=0.0, guidance_scale=2.0)
    got = Picker(cfg, cdk_rows=rows)(torch.stack([cond, uncond]))
    topp = guided_logits(cond, uncond, 2.0).argmax(-1)
    cdk = cdk_scores(guided_logits(cond, uncond, 2.0), uncond).argmax(-1)
    assert torch.equal(got, torch.where(rows, cdk, topp))
    assert not torch.equal(topp, cdk)  # the two halves really differ here


def test_instruct_cfg_three_streams():
    model = tiny_model()
    rng = np.random.default_rng(4)
    src = torch.tensor(rng.integers(0, 32, (2, TPI)))
    prefix, instr = rand_text(3, rng), [rand_text(4, rng), rand_text(2, rng)]
    full, img_cond, uncond = edit_prompts(prefix, src[0], instr[0], VOCAB)
    assert full[-len(instr[0]) - 1 :] == instr[0] + [VOCAB.break_id]
    assert img_cond[-2:] == [VOCAB.sentinel_id(0), VOCAB.break_id] and uncond == unconditional_prompt(VOCAB)
    # the three-stream expert equals the formula on three separate forwards
    streams = [edit_prompts(prefix, src[i], instr[i], VOCAB) for i in range(2)]
    with torch.no_grad():
        s = DecodeSession(model, [st[j] for j in range(3) for st in streams], 3, 1)
    cfg = DecodingConfig(image_weight=1.5, text_weight=7.5)
    ref = [torch.stack([last_logits(model, st[j]) for st in streams]) for j in range(3)]
    torch.testing.assert_close(Picker(cfg).expert(s.logits), instruct_cfg_logits(*ref, 1.5, 7.5), atol=1e-4, rtol=0)
    # weights 1 / 1 reduce to the full stream: greedy edits equal greedy continuation of the full prompt
    codes = edit_images(
        model, VOCAB, prefix, src, instr, decoding=DecodingConfig(temperature=0.0, image_weight=1.0, text_weight=1.0)
    )
    allowed = id_mask(VOCAB.size, [VOCAB.image_id_range])
    for i in range(2):
        ref_ids = greedy_reference(model, streams[i][0], TPI, allowed)
        assert VOCAB.codes_to_ids(codes[i]).tolist() == ref_ids
    edited = edit_images(model, VOCAB, prefix, src, instr, decoding=DecodingConfig(top_p=0.9))
    assert edited.shape == (2, TPI) and int(edited.min()) >= 0 and int(edited.max()) < 32


# ---- tasks -------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["topp", "cdk", "mixed"])
def test_generated_images_have_exactly_tokens_per_image_valid_codes(strategy):
    model = tiny_model()
    rng = np.random.default_rng(5)
    caps = [rand_text(n, rng) for n in (2, 9, 5)]
    docs = [[Document(np.array(rand_text(3, rng)), rng.integers(0, 32, TPI))] for _ in caps]
    dec = DecodingConfig(strategy=strategy, guidance_scale=3.0, top_p=0.9)
    codes = generate_images(model, VOCAB, caps, TPI, decoding=dec, seed=1, retrieved=docs[:2] + [[]], batch_size=2)
    assert codes.shape == (3, TPI) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < VOCAB.n_image_codes


def test_batching_does_not_change_samples_and_break_follows_when_continuing():
    model = tiny_model()
    rng = np.random.default_rng(9)
    caps = [rand_text(n, rng) for n in (2, 9, 5)]
    greedy = DecodingConfig(strategy="mixed", guidance_scale=3.0, temperature=0.0)
    a = generate_images(model, VOCAB, caps, TPI, decoding=greedy, batch_size=2)
    b = generate_images(model, VOCAB, caps, TPI, decoding=greedy)
    assert torch.equal(a, b)
    # continuing: the image is followed by <break> (ids, not codes)
    ids = generate_images(model, VOCAB, caps, TPI, decoding=greedy, then_break=True)
    assert ids.shape == (3, TPI + 1) and (ids[:, -1] == VOCAB.break_id).all()
    assert torch.equal(VOCAB.ids_to_codes(ids[:, :-1]), a)


def test_retrieved_documents_go_before_the_prompt_and_stay_unconditional():
    rng = np.random.default_rng(6)
    d = Document(np.array([5, 6]), np.array([1, 2]))
    cap = rand_text(3, rng)
    brk, img = VOCAB.break_id, VOCAB.image_offset
    doc = [5, 6, brk, img + 1, img + 2, brk]
    assert text_to_image_prompt(cap, VOCAB, [d]) == [EOS_ID, *doc, *cap, brk]
    assert unconditional_prompt(VOCAB, [d]) == [EOS_ID, *doc, VOCAB.sentinel_id(0), brk]


def test_plain_generate_matches_greedy_reference():
    model = tiny_model()
    prompt = torch.tensor([[EOS_ID, 5, 6, 7, VOCAB.break_id]])
    out = generate(model, prompt, TPI, temperature=0.0, allowed_range=VOCAB.image_id_range)
    allowed = id_mask(VOCAB.size, [VOCAB.image_id_range])
    assert out[0].tolist() == greedy_reference(model, prompt[0].tolist(), TPI, allowed)


def test_captioning_by_infilling():
    model = tiny_model()
    rng = np.random.default_rng(7)
    codes = torch.tensor(rng.integers(0, 32, (3, TPI)))
    s0, brk = VOCAB.sentinel_id(0), VOCAB.break_id
    img = VOCAB.codes_to_ids(codes[0]).tolist()
    # the prompt: `</s> <sentinel:0> <break> I </s> <sentinel:0>` (CM3 with the caption masked)
    seq = [EOS_ID, UNK_ID, brk, *img, EOS_ID]
    assert infill_prompt(seq, [(1, 2)], VOCAB) == [EOS_ID, s0, brk, *img, EOS_ID, s0]
    # VQA keeps the text around the span
    q, dot = [10, 11], [12]
    assert infill_prompt([EOS_ID, *q, UNK_ID, *dot, brk, *img, EOS_ID], [(3, 4)], VOCAB) == [
        EOS_ID,
        *q,
        s0,
        *dot,
        brk,
        *img,
        EOS_ID,
        s0,
    ]
    max_len = 6
    out = caption_images(model, VOCAB, codes, max_len=max_len)  # greedy
    allowed = id_mask(VOCAB.size, [(UNK_ID + 1, VOCAB.text_size), (VOCAB.eoss_id, VOCAB.eoss_id + 1)])
    for i in range(3):
        prompt = [EOS_ID, s0, brk, *VOCAB.codes_to_ids(codes[i]).tolist(), EOS_ID, s0]
        assert out[i] == greedy_reference(model, prompt, max_len, allowed, stop=VOCAB.eoss_id)
        assert len(out[i]) <= max_len and all(UNK_ID < t < VOCAB.text_size for t in out[i])
    vqa = caption_images(model, VOCAB, codes, text_before=q, text_after=dot, max_len=4, temperature=1.0, seed=3)
    assert all(len(t) <= 4 for t in vqa)


class _ScriptedSession:
    """A stand-in session whose next-token logits follow a script (to test the stop logic)."""

    def __init__(self, script: list[list[int]], V: int = 10):
        self.script, self.V, self.t, self.B, self.device, self.fed = script, V, 0, len(script), "cpu", []
        self._set()

    def _set(self):
        ids = torch.tensor([row[min(self.t, len(row) - 1)] for row in self.script])
        self.logits = torch.nn.functional.one_hot(ids, self.V).float()[None] * 10

    def feed(self, tokens):
        self.fed.append(tokens.tolist())
        self.t += 1
        self._set()


def test_sample_until_stops_each_sample_at_its_stop_token():
    stop = 9
    s = _ScriptedSession([[1, 2, 9, 3], [4, 9, 5, 5], [6, 7, 8, 1]])
    out = sample_until(s, Picker(DecodingConfig(temperature=0.0)), stop, max_len=4, allowed=None)
    assert out == [[1, 2], [4], [6, 7, 8, 1]]
    assert s.fed[-1] == [9, 9, 8]  # finished samples keep emitting the stop token
    s = _ScriptedSession([[9], [9]])
    assert sample_until(s, Picker(DecodingConfig(temperature=0.0)), stop, 5, None) == [[], []] and s.fed == []


def test_image_infilling_regenerates_only_the_region():
    model = tiny_model()
    rng = np.random.default_rng(8)
    codes = torch.tensor(rng.integers(0, 32, (2, TPI)))
    spans = image_region_spans(4, 1, 1, 3, 3)  # the centre 2x2 of a 4x4 grid
    assert spans == [(5, 7), (9, 11)] and image_region_spans(4, 2, 0, 4, 4) == [(8, 16)]
    with pytest.raises(ValueError, match="inside"):
        image_region_spans(4, 0, 0, 5, 1)
    out = infill_images(model, VOCAB, codes, spans, temperature=0.0, text_ids=[[5, 6], [7]])
    inside = torch.zeros(TPI, dtype=torch.bool)
    for s, e in spans:
        inside[s:e] = True
    assert torch.equal(out[:, ~inside], codes[:, ~inside])
    assert int(out.min()) >= 0 and int(out.max()) < 32
    # reference: greedy with full forwards, teacher-forcing `<eoss> <sentinel:1>` between the spans
    allowed = id_mask(VOCAB.size, [VOCAB.image_id_range])
    s0, s1, brk = VOCAB.sentinel_id(0), VOCAB.sentinel_id(1), VOCAB.break_id
    img = VOCAB.codes_to_ids(codes[0]).tolist()
    prompt = [EOS_ID, 5, 6, brk, *img[:5], s0, *img[7:9], s1, *img[11:], EOS_ID, s0]
    first = greedy_reference(model, prompt, 2, allowed)
    second = greedy_reference(model, prompt + first + [VOCAB.eoss_id, s1], 2, allowed)
    assert VOCAB.codes_to_ids(out[0, 5:7]).tolist() == first
    assert VOCAB.codes_to_ids(out[0, 9:11]).tolist() == second


def test_decoding_config_validation_and_yaml():
    from pathlib import Path

    from omegaconf import OmegaConf

    for name in ("topp_cfg", "cdk", "mixed"):
        node = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "decoding" / f"{name}.yaml")
        cfg = DecodingConfig.from_dict(OmegaConf.to_container(node))
        assert cfg.needs_uncond and cfg.guidance_scale == 3.0
    with pytest.raises(ValueError, match="unknown keys"):
        DecodingConfig.from_dict({"cfg_scale": 3})
    with pytest.warns(FutureWarning, match="use decoding.guidance_scale"):  # the old name still works
        assert DecodingConfig.from_dict({"cfg_weight": 2.0, "guidance_scale": 3.0}).guidance_scale == 2.0
    with pytest.raises(ValueError, match="strategy"):
        DecodingConfig(strategy="beam")
    with pytest.raises(ValueError, match="amateur"):
        Picker(DecodingConfig(strategy="cdk"))(torch.randn(1, 2, 10))


def test_best_per_prompt():
    scores = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.3])
    assert best_per_prompt(scores, 3).tolist() == [1, 3]
    assert best_per_prompt(scores, 2).tolist() == [1, 3, 4]
    with pytest.raises(ValueError):
        best_per_prompt(scores, 4)


@pytest.mark.slow
def test_bench_matches_hugging_face_token_for_token():
    """Same weights in HF OPT: greedy plain and CFG decoding give the same tokens as HF generate."""
    from cm3leon.bench.generate import bench_generate

    r = bench_generate("cpu", conf_dir=CONF_DIR, vocab_size=256, prompt_len=8, new_tokens=12, repeats=1)
    assert r["same_tokens"] and r["cfg_same_tokens"]
    assert r["ours_tok_s"] > 0 and r["hf_tok_s"] > 0 and r["speedup"] == r["ours_tok_s"] / r["hf_tok_s"]


def test_image_progress_is_reported_every_n_tokens_without_changing_samples():
    model = tiny_model()
    rng = np.random.default_rng(3)
    caps = [rand_text(n, rng) for n in (3, 6, 4)]
    dec = DecodingConfig(top_p=0.9)
    calls = []
    a = generate_images(model, VOCAB, caps, TPI, decoding=dec, seed=2, batch_size=2)
    b = generate_images(
        model,
        VOCAB,
        caps,
        TPI,
        decoding=dec,
        seed=2,
        batch_size=2,
        progress=lambda *c: calls.append(c),
        progress_every=5,
    )
    assert torch.equal(a, b)
    # chunk of 2 samples: steps 5, 10, 15, 16 (x2 tokens); then the chunk of 1 sample after its 32 tokens
    assert calls == [(10, 48), (20, 48), (30, 48), (32, 48), (37, 48), (42, 48), (47, 48), (48, 48)]
