"""Generation speed: our KV-cached sampler vs Hugging Face `generate` on an OPT of the same dims.

    from cm3leon.bench.generate import bench_generate
    bench_generate("cpu", conf_dir="conf", vocab_size=world_vocab_size(bpe, vqgan))    # {'ours_tok_s': ..., 'hf_tok_s': ..., 'speedup': ..., 'same_tokens': True, ...}

Both models hold the SAME weights (ours copied into `OPTForCausalLM` configured as the paper's
architecture, `hf_opt_reference`), see the same prompt, and generate the same number of new tokens
at batch 1, greedy, so the two token sequences must agree (`same_tokens`). tokens/s = new tokens /
wall time of the whole call (prefill included), median of `repeats` calls, ours and HF alternated.
Also: CFG weight 3 (greedy) with our two streams batched in one forward vs HF's `guidance_scale`
(an extra unbatched forward per step), again checked token for token; top-p 0.9 sampling speed.

On CUDA, additionally (each guarded; they cannot run on a CPU-only machine):
- `gpu_350m`: 350M, paper vocabulary, bf16, one 1024-token image at batch 1 with CFG
  (2 rows), eager and with the decode step captured as a CUDA graph (static cache): seconds per
  image (issue goal: <= 1.5 s); HF generate on the same model for `hf_tokens` tokens (tokens/s).
- `gpu_350m_batch`: many prompts with CFG at once, CUDA graph: images/s (goal >= 25 on an H200).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from cm3leon.bench.train_step import hf_opt_reference
from cm3leon.config import load_model_config
from cm3leon.generation.sampling import DecodingConfig, Picker
from cm3leon.generation.session import DecodeSession, sample_fixed
from cm3leon.generation.tasks import generate, generate_images
from cm3leon.model import CM3LeonLM
from cm3leon.vocab import Vocab


def world_vocab_size(text_tokenizer: str | Path, image_tokenizer: str | Path, n_sentinels: int = 16) -> int:
    """The embedded world's table (the tiny model's real setting): the BPE's ids + the VQGAN's codes +
    <break>, <eoss>, `n_sentinels` sentinels (conf/data/world.yaml: 16), padded to a multiple of 8.
    `src/bench.py` passes the shipped tokenizers; bench_train_step uses 16,384."""
    from cm3leon.tokenizers.image_tokenizer import ImageTokenizer
    from cm3leon.tokenizers.text_tokenizer import TextTokenizer

    text_size = TextTokenizer.from_file(text_tokenizer).vocab_size
    n_codes = ImageTokenizer.from_checkpoint(image_tokenizer).n_codes
    return Vocab(text_size=text_size, n_image_codes=n_codes, n_sentinels=n_sentinels).size


def copy_weights_to_opt(model: CM3LeonLM, hf) -> None:
    """Copy our weights into an `hf_opt_reference(model.config)`: the export's mapping
    (`cm3leon.export_hf.opt_state_dict`, OPT's positions offset by 2)."""
    from cm3leon.export_hf import opt_state_dict

    with torch.no_grad():
        missing, unexpected = hf.load_state_dict(opt_state_dict(model), strict=False)
    # the reference ties its head to the token table, so lm_head.weight may be absent from ours
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"OPT reference and export mapping disagree: missing {missing}, unexpected {unexpected}")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str):
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _alternate(ours, theirs, device: str, repeats: int):
    """Median seconds of `repeats` calls each, alternated so that a noisy neighbour hits both alike;
    plus the last outputs of each."""
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t, a = _timed(ours, device)
        t_ours.append(t)
        t, b = _timed(theirs, device)
        t_theirs.append(t)
    return statistics.median(t_ours), statistics.median(t_theirs), a, b


def _hf_generate(hf, prompt: torch.Tensor, n: int, do_sample: bool = False, top_p: float | None = None, **kw):
    """HF generate of exactly n new tokens (no EOS stop) -> new tokens [B, n]."""
    kw.update(dict(do_sample=True, top_p=top_p) if do_sample else dict(do_sample=False))
    out = hf.generate(
        prompt,
        max_new_tokens=n,
        min_new_tokens=n,
        use_cache=True,
        pad_token_id=1,
        eos_token_id=None,
        attention_mask=torch.ones_like(prompt),
        **kw,
    )
    return out[:, prompt.shape[1] :]


@torch.no_grad()
def bench_generate(
    device: str = "cpu",
    *,
    conf_dir: str | Path,
    size: str = "tiny",
    vocab_size: int | None = None,
    prompt_len: int = 32,
    new_tokens: int = 128,
    repeats: int = 3,
    seed: int = 0,
    with_350m: bool = True,
    cpu_threads: int = 1,
) -> dict:
    """Tokens/s of our sampler vs HF generate (same weights, prompt, new-token count, batch 1);
    on CUDA also the 350M image-generation numbers (see the module docstring).

    cpu_threads: torch threads for the CPU run (restored after). Batch-1 decoding of the tiny model
    is a chain of small ops; on a shared CPU a second thread mostly adds synchronisation, for HF
    and us alike."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_generate(device='cuda') but no CUDA device is visible; use device='cpu'")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: use 'cpu' or 'cuda'")
    threads = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(cpu_threads)
    try:
        return _bench_generate(device, conf_dir, size, vocab_size, prompt_len, new_tokens, repeats, seed, with_350m)
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def _bench_generate(device, conf_dir, size, vocab_size, prompt_len, new_tokens, repeats, seed, with_350m) -> dict:
    if vocab_size is None:
        raise ValueError("bench_generate needs vocab_size (src/bench.py passes the world's: world_vocab_size(...))")
    torch.manual_seed(seed)
    # non-zero residual outputs so that greedy decoding is not trivially constant
    cfg = load_model_config(conf_dir, size, vocab_size=vocab_size, zero_init_residual_out=False, init_std=0.02)
    ours = CM3LeonLM(cfg).to(device).eval()
    hf = hf_opt_reference(cfg)
    copy_weights_to_opt(ours.cpu(), hf)
    ours, hf = ours.to(device), hf.to(device).eval()
    prompt = torch.randint(4, vocab_size, (1, prompt_len), device=device)
    result = dict(
        device=device,
        size=size,
        vocab_size=vocab_size,
        batch_size=1,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        torch_threads=torch.get_num_threads(),
    )

    ours_greedy = lambda: generate(ours, prompt, new_tokens, temperature=0.0)  # noqa: E731
    hf_greedy = lambda: _hf_generate(hf, prompt, new_tokens)  # noqa: E731
    ours_greedy(), hf_greedy()  # warm-up
    t_ours, t_hf, a, b = _alternate(ours_greedy, hf_greedy, device, repeats)
    result.update(same_tokens=bool(torch.equal(a, b)), ours_tok_s=new_tokens / t_ours, hf_tok_s=new_tokens / t_hf)
    result["speedup"] = result["ours_tok_s"] / result["hf_tok_s"]

    # classifier-free guidance (weight 3), greedy: our two streams batched in one forward vs HF's
    # `guidance_scale` (a second, unbatched forward of the negative prompt each step); HF guides
    # log-probs, we guide logits: the same distribution, so the tokens must agree again
    uncond = torch.tensor([[2, vocab_size - 2, vocab_size - 3]], device=device)
    dec = DecodingConfig(guidance_scale=3.0, temperature=0.0)

    def ours_cfg():
        session = DecodeSession(ours, [prompt[0].tolist(), uncond[0].tolist()], 2, new_tokens)
        return sample_fixed(session, Picker(dec), new_tokens, None)

    def hf_cfg():
        return _hf_generate(
            hf,
            prompt,
            new_tokens,
            guidance_scale=3.0,
            negative_prompt_ids=uncond,
            negative_prompt_attention_mask=torch.ones_like(uncond),
        )

    t_ours, t_hf, a, b = _alternate(ours_cfg, hf_cfg, device, repeats)
    result.update(
        cfg_same_tokens=bool(torch.equal(a, b)), ours_cfg_tok_s=new_tokens / t_ours, hf_cfg_tok_s=new_tokens / t_hf
    )
    result["cfg_speedup"] = result["ours_cfg_tok_s"] / result["hf_cfg_tok_s"]

    # top-p 0.9 sampling (different random streams: speed only)
    gen = torch.Generator(device=device)
    ours_topp = lambda: generate(ours, prompt, new_tokens, top_p=0.9, generator=gen.manual_seed(seed))  # noqa: E731
    hf_topp = lambda: _hf_generate(hf, prompt, new_tokens, do_sample=True, top_p=0.9)  # noqa: E731
    t_ours, t_hf, _, _ = _alternate(ours_topp, hf_topp, device, repeats)
    result.update(ours_topp_tok_s=new_tokens / t_ours, hf_topp_tok_s=new_tokens / t_hf)
    result["topp_speedup"] = result["ours_topp_tok_s"] / result["hf_topp_tok_s"]
    ours = hf = None  # free their memory before the 350M runs
    if device == "cuda" and with_350m:
        result["gpu_350m"] = _guarded(lambda: bench_350m_image(conf_dir))
        result["gpu_350m_batch"] = _guarded(lambda: bench_350m_batch(conf_dir))
    return result


def _guarded(fn) -> dict:
    """Run a GPU section; an error (e.g. out of memory) is recorded instead of ending the bench."""
    try:
        return fn()
    except Exception as e:
        torch.cuda.empty_cache()
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}


def _350m(conf_dir: str | Path, dtype=torch.bfloat16) -> tuple[CM3LeonLM, Vocab]:
    vocab = Vocab.paper()
    torch.manual_seed(0)
    model = CM3LeonLM(load_model_config(conf_dir, "350m", zero_init_residual_out=False)).cuda().to(dtype).eval()
    return model, vocab


@torch.no_grad()
def bench_350m_image(
    conf_dir: str | Path, tokens_per_image: int = 1024, hf_tokens: int = 128, repeats: int = 3
) -> dict:
    """350M bf16, one image (1024 tokens) at batch 1 with CFG: s/image eager and with a CUDA graph;
    HF generate (same dims, bf16, no CFG) tokens/s over hf_tokens new tokens."""
    model, vocab = _350m(conf_dir)
    out = dict(gpu=torch.cuda.get_device_name(), tokens_per_image=tokens_per_image, guidance_scale=3.0)
    for name, graph in (("eager", False), ("cuda_graph", True)):
        out[f"{name}_s_per_image"] = s_per_image(model, vocab, tokens_per_image, graph, repeats)
    hf = hf_opt_reference(model.config)
    copy_weights_to_opt(model.float().cpu(), hf)
    model = None  # free its memory
    hf = hf.cuda().to(torch.bfloat16).eval()
    prompt = torch.randint(4, 1000, (1, 22), device="cuda")
    _hf_generate(hf, prompt, 8)
    t, _ = _timed(lambda: _hf_generate(hf, prompt, hf_tokens, do_sample=True, top_p=0.9), "cuda")
    out["hf_tok_s_no_cfg"] = hf_tokens / t
    out["hf_s_per_image_extrapolated"] = tokens_per_image / out["hf_tok_s_no_cfg"]
    hf = None  # free its memory
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def s_per_image(model: CM3LeonLM, vocab: Vocab, tokens_per_image: int, cuda_graph: bool, repeats: int = 3) -> float:
    """Median seconds for one image at batch 1 with CFG (weight 3, top-p 0.9: two streams), after
    a warm-up (which also captures the CUDA graph)."""
    caption = torch.randint(4, 1000, (20,))
    dec = DecodingConfig(guidance_scale=3.0, top_p=0.9)

    def gen():
        return generate_images(model, vocab, [caption], tokens_per_image, decoding=dec, cuda_graph=cuda_graph)

    gen()
    return statistics.median(_timed(gen, "cuda")[0] for _ in range(repeats))


@torch.no_grad()
def bench_7b_image(conf_dir: str | Path, tokens_per_image: int = 1024, repeats: int = 2) -> dict:
    """7B bf16 (random weights, made on the GPU), one image at batch 1 with CFG, CUDA graph: s/image
    (the paper: 11.8 s on an A100)."""
    torch.manual_seed(0)
    cfg = load_model_config(conf_dir, "7b", zero_init_residual_out=False)
    with torch.device("cuda"):
        model = CM3LeonLM(cfg).to(torch.bfloat16).eval()
    torch.cuda.reset_peak_memory_stats()
    out = dict(
        gpu=torch.cuda.get_device_name(),
        params=model.num_params(),
        tokens_per_image=tokens_per_image,
        cuda_graph_s_per_image=s_per_image(model, Vocab.paper(), tokens_per_image, True, repeats),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    model = None  # free its memory
    torch.cuda.empty_cache()
    return out


@torch.no_grad()
def bench_350m_batch(conf_dir: str | Path, n_images: int = 256, tokens_per_image: int = 1024) -> dict:
    """350M bf16, n_images prompts with CFG (2 n_images rows) in one batch, CUDA graph: images/s."""
    model, vocab = _350m(conf_dir)
    captions = [torch.randint(4, 1000, (20,)) for _ in range(n_images)]
    dec = DecodingConfig(guidance_scale=3.0, top_p=0.9)
    torch.cuda.reset_peak_memory_stats()
    t, _ = _timed(
        lambda: generate_images(model, vocab, captions, tokens_per_image, decoding=dec, cuda_graph=True), "cuda"
    )
    out = dict(
        n_images=n_images,
        rows=2 * n_images,
        seconds=t,
        images_per_s=n_images / t,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30,
    )
    model = None  # free its memory
    torch.cuda.empty_cache()
    return out
