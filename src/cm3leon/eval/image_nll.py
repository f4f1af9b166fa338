"""How well a model predicts the image of a caption: the mean negative log-likelihood (nats per
token) of each reference image's codes after the zero-shot prompt `</s> [retrieved docs] caption
<break>`, the very prompt generation continues (`cm3leon.data.sequences.text_to_image_prompt`).

    pipe = load_pipeline(ckpt, retrieval={"k": 2, "dir": ...})          # k documents per caption
    nll = image_nll(pipe, captions, pipe.image_tokenizer.encode(images))  # [N] float64

This is the world's "validation loss with 0, 1, 2 retrieved documents" (the paper's Table 1 in
miniature): the same query tokens are scored whatever k is, so numbers with different k (and of
different models with the same tokenizers) compare example by example. The softmax runs over the
whole vocabulary, as the training loss does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cm3leon.data.sequences import IGNORE_INDEX


@torch.no_grad()
def image_nll(pipe, captions: Sequence[str], codes: torch.Tensor | np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Mean NLL per image token of `codes` [N, tokens_per_image] given each caption (and the
    pipeline's retrieved documents, retrieved by the caption text as at generation) -> [N]."""
    from cm3leon.data.sequences import text_to_image_prompt

    codes = torch.as_tensor(codes, dtype=torch.long).cpu()
    if codes.dim() != 2 or len(codes) != len(captions):
        raise ValueError(f"need codes [N={len(captions)}, tokens], got {tuple(codes.shape)}")
    vocab, model = pipe.vocab, pipe.model
    model.eval()
    out = np.zeros(len(captions), dtype=np.float64)
    for start in range(0, len(captions), batch_size):
        caps = list(captions[start : start + batch_size])
        docs = pipe.retrieve(caps)
        rows, lengths = [], []
        for i, text_ids in enumerate(pipe.encode_captions(caps)):
            prompt = text_to_image_prompt(text_ids, vocab, None if docs is None else docs[i])
            image = vocab.codes_to_ids(codes[start + i].numpy()).tolist()
            rows.append(prompt + image)
            lengths.append(len(prompt))
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), vocab.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        n_img = codes.shape[1]
        for r, (row, p) in enumerate(zip(rows, lengths)):
            ids[r, : len(row)] = torch.as_tensor(row)
            # position t predicts token t + 1: the image tokens are predicted from p - 1 .. p + n - 2
            targets[r, p - 1 : p - 1 + n_img] = ids[r, p : p + n_img]
        _, losses = model(ids.to(pipe.device), targets=targets.to(pipe.device))
        out[start : start + len(rows)] = (losses.double().sum(1) / n_img).cpu().numpy()
    return out
